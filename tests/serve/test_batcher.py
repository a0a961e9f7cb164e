"""Concurrent queries share encode calls, and each gets its own vectors back in order."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from deltavec.serve.batcher import QueryBatcher


def test_concurrent_calls_share_encodes_and_get_their_own_rows() -> None:
    calls: list[int] = []

    def embed_many(texts: Sequence[str]) -> np.ndarray:  # counts calls; 20 ms each
        calls.append(len(texts))
        time.sleep(0.02)
        return np.array([[float(t.split()[1]), len(t)] for t in texts], dtype=np.float32)

    batcher = QueryBatcher(embed_many, max_texts=8)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: batcher.embed([f"q {i}", f"q {i} again"]), range(32)))

    for i, vectors in enumerate(results):
        np.testing.assert_array_equal(vectors[:, 0], [i, i])
        assert vectors[:, 1].tolist() == [len(f"q {i}"), len(f"q {i} again")]
    assert sum(calls) == 64 and max(calls) <= 8
    assert len(calls) < 32  # waiting callers were batched together


def test_a_failed_encode_fails_every_caller_in_its_batch_and_the_next_call_works() -> None:
    fail = threading.Event()
    fail.set()

    def embed_many(texts: Sequence[str]) -> np.ndarray:
        if fail.is_set():
            raise RuntimeError("the model broke")
        return np.zeros((len(texts), 2), dtype=np.float32)

    batcher = QueryBatcher(embed_many)
    with pytest.raises(RuntimeError, match="the model broke"):
        batcher.embed(["a"])
    fail.clear()
    assert batcher.embed(["a", "b"]).shape == (2, 2)


def test_searches_of_one_version_share_one_product_and_match_single_searches(
    tmp_path: Path,
) -> None:
    from deltavec.search import VectorIndex
    from tests.search.test_index import unit_vectors, write_target

    vectors = unit_vectors(500, seed=50)
    write_target(tmp_path / "t", np.arange(500), vectors)
    view = VectorIndex(str(tmp_path / "t")).view()
    queries = unit_vectors(24, seed=51)

    def embed_many(texts: Sequence[str]) -> np.ndarray:  # "text" i is query i
        return queries[[int(t) for t in texts]]

    batcher = QueryBatcher(embed_many)
    filtered = view.slots_of(pa.table({"id": pa.array(np.arange(100, 200), pa.int64())}))
    with ThreadPoolExecutor(12) as pool:
        plain = list(pool.map(lambda i: batcher.search(str(i), view, 5), range(12)))
        only = list(pool.map(lambda i: batcher.search(str(i), view, 3, filtered), range(12, 24)))

    for i, (vector, hits) in enumerate(plain):
        np.testing.assert_array_equal(vector, queries[i])
        assert [h.key for h in hits] == [h.key for h in view.search(queries[i], 5)]
    for i, (_, hits) in enumerate(only, 12):
        expected = view.search(queries[i], 3, rows=filtered)
        assert [h.key for h in hits] == [h.key for h in expected]
        assert all(100 <= h.key["id"] < 200 for h in hits)


def test_an_embed_is_answered_while_a_search_is_still_being_ranked() -> None:
    ranking = threading.Event()
    release = threading.Event()

    class SlowView:  # a version whose ranking holds until released
        def search_many(self, queries: np.ndarray, k: int, *, rows: object) -> list[list[str]]:
            ranking.set()
            release.wait(10)
            return [["hit"] for _ in queries]

    def embed_many(texts: Sequence[str]) -> np.ndarray:
        return np.ones((len(texts), 2), dtype=np.float32)

    batcher = QueryBatcher(embed_many)
    with ThreadPoolExecutor(2) as pool:
        searched = pool.submit(batcher.search, "slow", SlowView(), 1)  # type: ignore[arg-type]
        assert ranking.wait(10)
        embedded = pool.submit(batcher.embed, ["meanwhile"])
        try:
            assert embedded.result(timeout=5).shape == (1, 2)
            assert not searched.done()
        finally:
            release.set()
        assert searched.result(timeout=10)[1] == ["hit"]


def test_a_failed_ranking_fails_its_caller_and_the_next_search_works(tmp_path: Path) -> None:
    from deltavec.search import VectorIndex
    from tests.search.test_index import unit_vectors, write_target

    write_target(tmp_path / "t", np.arange(50), unit_vectors(50, seed=52))
    view = VectorIndex(str(tmp_path / "t")).view()
    other = VectorIndex(str(tmp_path / "t")).view()
    foreign = other.slots_of(pa.table({"id": pa.array([1, 2, 3], pa.int64())}))
    query = unit_vectors(1, seed=53)
    batcher = QueryBatcher(lambda texts: np.repeat(query, len(texts), axis=0))

    with pytest.raises(ValueError, match="another version"):
        batcher.search("q", view, 3, foreign)
    _, hits = batcher.search("q", view, 3)
    assert [h.key for h in hits] == [h.key for h in view.search(query[0], 3)]
