"""Concurrent queries served together: one encode call, and one matrix product per version.

Under load the server embeds whatever queued while the previous batch ran in
one encode call, then ranks every vector query of one index version with one
matrix product (a filtered one then keeps only its rows' scores). Both steps
cost about as much for 16 queries as for one: a short query's encode is
dominated by each layer's fixed cost, and a matrix-vector product by reading
the whole matrix from memory (side by side on the 2-core VM: 16 threads each
multiplying the 100,000 x 384 matrix by one query answered 5 queries/s; one
thread multiplying it by all 16, 75/s).

One worker thread does this work, with one torch thread: Hugging Face
tokenizers are not safe to call from several threads, and both torch's and
OpenBLAS's threads spin-wait at barriers, which on a loaded machine costs a
query many times its work. No request waits for a batch to fill: a batch is
whatever is pending when the worker is free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from deltavec.search.index import Hit, IndexView, Slots

# Texts per encode call: past ~64 short queries a batch stops getting cheaper
# per text, and the first request in it waits longer.
MAX_BATCH_TEXTS = 64
# An idle worker exits (a replaced model's batcher then leaves nothing behind);
# the next request starts a new one.
IDLE_SECONDS = 30.0


@dataclass
class _Job:
    texts: list[str]
    done: Future[Any]
    # For a search: the version to rank in, hits wanted, the filter's slots.
    view: IndexView | None = None
    k: int = 0
    rows: Slots | None = None


class QueryBatcher:
    """``embed`` and ``search`` from any thread; concurrent calls share the work."""

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
        self._pending: list[_Job] = []
        self._ready = threading.Condition()
        self._worker: threading.Thread | None = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for ``texts``, in order, as ``embed_many`` gives them."""
        result: np.ndarray = self._submit(_Job(list(texts), Future()))
        return result

    def search(
        self, text: str, view: IndexView, k: int, rows: Slots | None = None
    ) -> tuple[np.ndarray, list[Hit]]:
        """The query's vector and its exact top k in ``view`` (only ``rows``, if given)."""
        result: tuple[np.ndarray, list[Hit]] = self._submit(
            _Job([text], Future(), view=view, k=k, rows=rows)
        )
        return result

    def _submit(self, job: _Job) -> Any:
        with self._ready:
            self._pending.append(job)
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._run, name="deltavec-queries", daemon=True
                )
                self._worker.start()
            self._ready.notify()
        return job.done.result()

    def _run(self) -> None:
        import torch

        torch.set_num_threads(1)
        while True:
            with self._ready:
                while not self._pending:
                    if not self._ready.wait(self._idle) and not self._pending:
                        self._worker = None
                        return
                batch: list[_Job] = []
                size = 0
                while self._pending:
                    if batch and size + len(self._pending[0].texts) > self._max_texts:
                        break
                    batch.append(self._pending.pop(0))
                    size += len(batch[-1].texts)
            self._serve(batch)

    def _serve(self, batch: list[_Job]) -> None:
        try:
            vectors = self._embed_many([t for job in batch for t in job.texts])
        except Exception as exc:  # noqa: BLE001 (each caller gets the failure as its own)
            for job in batch:
                job.done.set_exception(exc)
            return
        start = 0
        searches: dict[int, list[tuple[_Job, np.ndarray]]] = {}
        for job in batch:
            mine = vectors[start : start + len(job.texts)]
            start += len(job.texts)
            if job.view is None:
                job.done.set_result(mine)
            else:
                searches.setdefault(id(job.view), []).append((job, mine[0]))
        for group in searches.values():
            view = group[0][0].view
            assert view is not None
            k = max(job.k for job, _ in group)
            try:
                queries = np.stack([q for _, q in group])
                ranked = view.search_many(queries, k, rows=[job.rows for job, _ in group])
            except Exception as exc:  # noqa: BLE001 (as above)
                for job, _ in group:
                    job.done.set_exception(exc)
                continue
            for (job, q), hits in zip(group, ranked, strict=True):
                job.done.set_result((q, hits[: job.k]))
