"""Approximate nearest neighbours with a FAISS inverted-file index (optional: faiss-cpu).

An IVF index clusters the vectors once (k-means on a sample) and, per query,
scans only the ``nprobe`` clusters nearest to it. Unlike graph indexes it can
drop and add vectors by id, so ``VectorIndex.refresh`` keeps it current without
a rebuild. Vectors are stored uncompressed (``IndexIVFFlat``): the scores of the
rows it does visit are exact inner products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from deltavec.errors import SearchError

if TYPE_CHECKING:
    from deltavec.search.state import Block

# FAISS warns below 39 training points per cluster; 64 gives stable centroids.
_TRAIN_POINTS_PER_LIST = 64
_MAX_LISTS = 65_536


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise SearchError(
            "approximate search needs FAISS: pip install 'deltavec[search]' (faiss-cpu)"
        ) from None
    return faiss


def default_nlist(rows: int) -> int:
    """About sqrt(rows) clusters, the usual IVF trade-off between probe and scan cost."""
    return max(1, min(_MAX_LISTS, round(math.sqrt(rows)), rows // _TRAIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Clusters visited per query: 1/16 of them (at least 8), for recall@10 near 0.95+."""
    return max(1, min(nlist, max(8, nlist // 16)))


class IvfIndex:
    """A trained ``IndexIVFFlat`` over inner products whose ids are ``VectorIndex`` slots."""

    def __init__(self, index: Any, nprobe: int) -> None:
        self.index = index
        self.nprobe = nprobe

    @classmethod
    def train(
        cls, blocks: Sequence[Block], *, nlist: int | None = None, nprobe: int | None = None
    ) -> IvfIndex:
        """Cluster a sample of the rows; nothing is added yet."""
        faiss = _faiss()
        rows = sum(b.matrix.shape[0] for b in blocks)
        if rows == 0:
            raise SearchError("approximate search needs a target with rows")
        dim = blocks[0].matrix.shape[1]
        nlist = nlist or default_nlist(rows)
        sample = _sample(blocks, min(rows, nlist * _TRAIN_POINTS_PER_LIST))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
        return cls(index, nprobe or default_nprobe(nlist))

    def add(self, matrix: np.ndarray, first_slot: int) -> None:
        if matrix.shape[0]:
            ids = np.arange(first_slot, first_slot + matrix.shape[0], dtype=np.int64)
            self.index.add_with_ids(np.ascontiguousarray(matrix, dtype=np.float32), ids)

    def remove(self, slots: np.ndarray) -> None:
        if len(slots):
            self.index.remove_ids(np.asarray(slots, dtype=np.int64))

    def rebuild(self, blocks: Sequence[Block]) -> None:
        """Re-add every row under new slot numbers (after compaction); keeps the clusters."""
        self.index.reset()
        offset = 0
        for block in blocks:
            self.add(block.matrix, offset)
            offset += block.matrix.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, slots) of shape (len(queries), k); missing hits have slot -1."""
        faiss = _faiss()
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        scores, slots = self.index.search(queries, k, params=params)
        return scores, slots


def _sample(blocks: Sequence[Block], n: int) -> np.ndarray:
    """n rows drawn evenly at random across the blocks (fixed seed: reproducible clusters)."""
    rows = sum(b.matrix.shape[0] for b in blocks)
    pick = np.sort(np.random.default_rng(0).choice(rows, size=n, replace=False))
    out = np.empty((n, blocks[0].matrix.shape[1]), dtype=np.float32)
    filled = offset = 0
    for block in blocks:
        size = block.matrix.shape[0]
        inside = pick[(pick >= offset) & (pick < offset + size)] - offset
        out[filled : filled + len(inside)] = block.matrix[inside]
        filled += len(inside)
        offset += size
    return out
