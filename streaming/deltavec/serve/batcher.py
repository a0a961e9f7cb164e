"""Concurrent queries' texts embedded together: one encode call for all that are waiting.

A short query costs a small model about as much alone as in a batch of 16 (the
fixed cost of each layer dominates), so under load the server embeds whatever
queued while the previous batch ran, in one call: no added wait when idle,
several times the throughput when busy. One worker thread does all encoding,
with one torch thread: the tokenizer is not safe to call from several threads,
and torch's intra-op threads spin at a barrier after every operator, which on
a loaded machine costs a query ten times its work (benchmarks/serve.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np

# Texts per encode call: past ~64 short queries a batch stops getting cheaper
# per text, and the first request in it waits longer.
MAX_BATCH_TEXTS = 64
# An idle worker exits (a replaced model's batcher then leaves nothing behind);
# the next request starts a new one.
IDLE_SECONDS = 30.0


class QueryBatcher:
    """``embed(texts)`` from any thread; texts of concurrent calls share one encode."""

    def __init__(
        self,
        embed_many: Callable[[Sequence[str]], np.ndarray],
        *,
        max_texts: int = MAX_BATCH_TEXTS,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._embed_many = embed_many
        self._max_texts = max_texts
        self._idle = idle_seconds
        self._pending: list[tuple[list[str], Future[np.ndarray]]] = []
        self._ready = threading.Condition()
        self._worker: threading.Thread | None = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for ``texts``, in order, as ``embed_many`` gives them."""
        done: Future[np.ndarray] = Future()
        with self._ready:
            self._pending.append((list(texts), done))
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._run, name="deltavec-embed", daemon=True
                )
                self._worker.start()
            self._ready.notify()
        return done.result()

    def _run(self) -> None:
        import torch

        torch.set_num_threads(1)
        while True:
            with self._ready:
                while not self._pending:
                    if not self._ready.wait(self._idle) and not self._pending:
                        self._worker = None
                        return
                batch: list[tuple[list[str], Future[np.ndarray]]] = []
                size = 0
                while self._pending:
                    if batch and size + len(self._pending[0][0]) > self._max_texts:
                        break
                    texts, done = self._pending.pop(0)
                    batch.append((texts, done))
                    size += len(texts)
            self._encode(batch)

    def _encode(self, batch: list[tuple[list[str], Future[np.ndarray]]]) -> None:
        try:
            vectors = self._embed_many([t for texts, _ in batch for t in texts])
        except Exception as exc:  # noqa: BLE001 (each caller gets the failure as its own)
            for _, done in batch:
                done.set_exception(exc)
            return
        start = 0
        for texts, done in batch:
            done.set_result(vectors[start : start + len(texts)])
            start += len(texts)
