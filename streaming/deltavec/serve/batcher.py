"""Concurrent queries served together, in two stages: embedding, then ranking.

Under load the server embeds whatever queued while the previous batch ran in
one encode call, then ranks every vector query of one index version with one
matrix product (a filtered one then keeps only its rows' scores), or with one
FAISS search when the snapshot has an approximate index. Both steps
cost about as much for 16 queries as for one: a short query's encode is
dominated by each layer's fixed cost, and a matrix-vector product by reading
the whole matrix from memory (side by side on the 2-core VM: 16 threads each
multiplying the 100,000 x 384 matrix by one query answered 5 queries/s; one
thread multiplying it by all 16, 75/s).

Each stage has one thread of its own, so one batch is ranked while the next is
embedded: on two cores the two steps overlap instead of adding up (side by
side under 16 clients on 100,000 rows, see the README's Serving search). The
embedding thread runs one torch thread: Hugging Face tokenizers are not safe to
call from several threads, and torch's and OpenBLAS's threads spin-wait at
barriers, which on a loaded machine costs a query many times its work. The
ranking stage takes every search that is waiting when it is free, so if it
falls behind, the next product serves more queries for the same pass over the
matrix. No request waits for a batch to fill.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

if TYPE_CHECKING:
    from deltavec.search.index import Hit, Ranker, Slots

# Texts per encode call: past ~64 short queries a batch stops getting cheaper
# per text, and the first request in it waits longer.
MAX_BATCH_TEXTS = 64
# An idle stage's thread exits (a replaced model's batcher then leaves nothing
# behind); the next request starts a new one.
IDLE_SECONDS = 30.0

T = TypeVar("T")


@dataclass
class _Job:
    texts: list[str]
    done: Future[Any]
    # For a search: the version to rank in, hits wanted, the filter's slots.
    view: Ranker | None = None
    k: int = 0
    rows: Slots | None = None


class _Stage(Generic[T]):
    """One thread that hands whatever is pending, up to ``take``'s cut, to ``handle``."""

    def __init__(
        self,
        name: str,
        handle: Callable[[list[T]], None],
        take: Callable[[list[T]], int],
        idle_seconds: float,
        on_start: Callable[[], None] = lambda: None,
    ) -> None:
        self._name = name
        self._handle = handle
        self._take = take
        self._idle = idle_seconds
        self._on_start = on_start
        self._pending: list[T] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, items: Sequence[T]) -> None:
        with self._ready:
            self._pending.extend(items)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._ready.notify()

    def close(self) -> None:
        """Let the thread exit as soon as nothing is pending (a later ``put`` starts one)."""
        with self._ready:
            self._idle = 0.0
            self._ready.notify()

    def _run(self) -> None:
        self._on_start()
        while True:
            with self._ready:
                while not self._pending:
                    if not self._ready.wait(self._idle) and not self._pending:
                        self._thread = None
                        return
                cut = max(1, self._take(self._pending))
                batch, self._pending = self._pending[:cut], self._pending[cut:]
            self._handle(batch)


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
        self._embedding: _Stage[_Job] = _Stage(
            "deltavec-queries", self._embed, self._texts_that_fit, idle_seconds, _one_torch_thread
        )
        self._ranking: _Stage[tuple[_Job, np.ndarray]] = _Stage(
            "deltavec-ranking", self._rank, len, idle_seconds
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for ``texts``, in order, as ``embed_many`` gives them."""
        result: np.ndarray = self._submit(_Job(list(texts), Future()))
        return result

    def search(
        self, text: str, view: Ranker, k: int, rows: Slots | None = None
    ) -> tuple[np.ndarray, list[Hit]]:
        """The query's vector and its top k in ``view`` (only ``rows``, if given)."""
        result: tuple[np.ndarray, list[Hit]] = self._submit(
            _Job([text], Future(), view=view, k=k, rows=rows)
        )
        return result

    def close(self) -> None:
        """Let both stages' threads exit once idle: a replaced model's batcher
        then lets go of its model at once, not ``idle_seconds`` later. A call
        after this still works."""
        self._embedding.close()
        self._ranking.close()

    def _submit(self, job: _Job) -> Any:
        self._embedding.put([job])
        return job.done.result()

    def _texts_that_fit(self, pending: list[_Job]) -> int:
        """How many of the first jobs one encode call takes (at least one)."""
        size = 0
        for taken, job in enumerate(pending):
            size += len(job.texts)
            if taken and size > self._max_texts:
                return taken
        return len(pending)

    def _embed(self, batch: list[_Job]) -> None:
        try:
            vectors = self._embed_many([t for job in batch for t in job.texts])
        except Exception as exc:  # noqa: BLE001 (each caller gets the failure as its own)
            for job in batch:
                job.done.set_exception(exc)
            return
        start = 0
        searches = []
        for job in batch:
            mine = vectors[start : start + len(job.texts)]
            start += len(job.texts)
            if job.view is None:
                job.done.set_result(mine)
            else:
                searches.append((job, mine[0]))
        if searches:
            self._ranking.put(searches)

    def _rank(self, waiting: list[tuple[_Job, np.ndarray]]) -> None:
        groups: dict[int, list[tuple[_Job, np.ndarray]]] = {}
        for job, query in waiting:
            groups.setdefault(id(job.view), []).append((job, query))
        for group in groups.values():
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


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)
