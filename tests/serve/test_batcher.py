"""Concurrent queries share encode calls, and each gets its own vectors back in order."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
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
