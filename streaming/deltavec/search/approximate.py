"""Approximate nearest neighbours with a FAISS inverted-file index (faiss-cpu).

An IVF index clusters the vectors once (k-means on a sample) and, per query,
scans only the ``nprobe`` clusters nearest to it. Unlike graph indexes it can
drop and add vectors by id, so ``VectorIndex.refresh`` keeps it current without
a rebuild. Vectors are stored uncompressed (``IndexIVFFlat``): the scores of the
rows it does visit are exact inner products.

``IvfView`` is the immutable form the server ranks with: one per index
version, the next one made from a copy of the last, so a query never sees the
rows of one version through the index of another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from deltavec.errors import SearchError

if TYPE_CHECKING:
    from deltavec.search.index import Hit, IndexView, Slots
    from deltavec.search.state import Block, IndexState

# FAISS warns below 39 training points per cluster; 40 keeps training to
# seconds at 100,000 rows (2.8 s for 1,264 clusters on one core).
_TRAIN_POINTS_PER_LIST = 40
_MAX_LISTS = 65_536
# A filter with at most this many times the rows one query scans is ranked
# exactly over its rows: that costs no more than the approximate scan.
_EXACT_FILTER_SCANS = 2
# A view trained on n rows is trained again once the target holds 4n (or n/4):
# the best cluster count grows with the square root of the rows.
_RETRAIN_GROWTH = 4


def installed() -> bool:
    """Whether FAISS can be imported here."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def require_faiss() -> Any:
    """The ``faiss`` module, or a SearchError that says how to install it."""
    try:
        import faiss
    except ImportError:
        raise SearchError(
            "approximate search needs FAISS, which deltavec depends on: pip install faiss-cpu"
        ) from None
    return faiss


def default_nlist(rows: int) -> int:
    """About 4 sqrt(rows) clusters, the low end of FAISS's own guideline (4 to 16 sqrt(n)).

    Measured on 100,000 vectors clustered around the default model's own
    embeddings, with 1/16 of the clusters probed: 316 clusters gave recall@10
    0.921 at 0.56 ms a query, 1,264 gave 0.995 at 0.70 ms (one core).
    """
    return max(1, min(_MAX_LISTS, round(4 * math.sqrt(rows)), rows // _TRAIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Clusters visited per query: 1/16 of them (at least 8), for recall@10 near 0.99."""
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
        faiss = require_faiss()
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

    @classmethod
    def holding(
        cls, state: IndexState, *, nlist: int | None = None, nprobe: int | None = None
    ) -> IvfIndex:
        """Trained on ``state``'s rows and holding its live ones (ids = slots)."""
        ivf = cls.train(state.blocks, nlist=nlist, nprobe=nprobe)
        ivf.rebuild(state.blocks)
        ivf.remove(np.flatnonzero(~state.live))
        return ivf

    def add(self, matrix: np.ndarray, first_slot: int) -> None:
        if matrix.shape[0]:
            ids = np.arange(first_slot, first_slot + matrix.shape[0], dtype=np.int64)
            self.index.add_with_ids(np.ascontiguousarray(matrix, dtype=np.float32), ids)

    def remove(self, slots: np.ndarray) -> None:
        if len(slots):
            self.index.remove_ids(np.asarray(slots, dtype=np.int64))

    def copy(self) -> IvfIndex:
        """An independent copy (same clusters, same rows): a memory copy, no clustering."""
        return IvfIndex(require_faiss().clone_index(self.index), self.nprobe)

    def follow(self, old: IndexState, new: IndexState) -> None:
        """Change the index from holding ``old``'s live rows to ``new``'s.

        The ids are slots. When ``new`` keeps ``old``'s blocks and appends (a
        refresh), the rows that died are dropped and the new blocks added;
        otherwise (compaction, a reload) every row is added again under its new slot.
        """
        extends = len(new.blocks) >= len(old.blocks) and all(
            a is b for a, b in zip(old.blocks, new.blocks, strict=False)
        )
        if not extends:
            self.rebuild(new.blocks)
            self.remove(np.flatnonzero(~new.live))
            return
        self.remove(np.flatnonzero(old.live & ~new.live[: old.slots]))
        offset = old.slots
        for block in new.blocks[len(old.blocks) :]:
            self.add(block.matrix, offset)
            offset += len(block)
        self.remove(old.slots + np.flatnonzero(~new.live[old.slots :]))

    def scanned(self, rows: int) -> float:
        """About how many rows one query visits in an index of ``rows`` rows."""
        return rows * self.nprobe / max(1, int(self.index.nlist))

    def rebuild(self, blocks: Sequence[Block]) -> None:
        """Re-add every row under new slot numbers (after compaction); keeps the clusters."""
        self.index.reset()
        offset = 0
        for block in blocks:
            self.add(block.matrix, offset)
            offset += block.matrix.shape[0]

    def search(
        self, queries: np.ndarray, k: int, *, within: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, slots) of shape (len(queries), k); missing hits have slot -1.

        ``within``: a bitmap of the slots allowed to compete (``np.packbits``,
        little bit order); the clusters probed may then hold fewer than k of them.
        """
        faiss = require_faiss()
        if within is None:
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        else:
            selector = faiss.IDSelectorBitmap(len(within), faiss.swig_ptr(within))
            params = faiss.SearchParametersIVF(nprobe=self.nprobe, sel=selector)
        scores, slots = self.index.search(queries, k, params=params)
        return scores, slots


class IvfView:
    """One version's approximate index, never changed once built.

    Args:
        view: the exact index version it covers (its keys, and exact search for
            filters too narrow for the approximate one).
        ivf: an index holding exactly ``view``'s live rows, ids = slots.
        trained_rows: live rows when its clusters were trained.
    """

    def __init__(self, view: IndexView, ivf: IvfIndex, trained_rows: int) -> None:
        self.view = view
        self.ivf = ivf
        self.trained_rows = trained_rows

    @classmethod
    def build(cls, view: IndexView, *, nprobe: int | None = None) -> IvfView:
        """Train clusters on ``view``'s rows and add them all (seconds for 100,000 rows)."""
        return cls(view, IvfIndex.holding(view.state, nprobe=nprobe), len(view))

    @property
    def version(self) -> int:
        return self.view.version

    def follow(self, view: IndexView, *, nprobe: int | None = None) -> IvfView:
        """The index of a later version ``view``; this one is left as it was.

        A copy of this index with the rows that changed between the two versions
        dropped and added (about a tenth of a second for 100,000 x 384); trained
        again instead when the table grew or shrank fourfold since training.
        """
        rows = len(view)
        trained = self.trained_rows
        if rows and not trained / _RETRAIN_GROWTH <= rows <= trained * _RETRAIN_GROWTH:
            return IvfView.build(view, nprobe=nprobe)
        ivf = self.ivf.copy()
        ivf.follow(self.view.state, view.state)
        return IvfView(view, ivf, self.trained_rows)

    def search_many(
        self, queries: np.ndarray, k: int = 10, *, rows: Sequence[Slots | None] | None = None
    ) -> list[list[Hit]]:
        """Approximate top k for each row of ``queries``; ``rows[i]`` restricts query i.

        Scores are exact inner products of the rows visited. A filter of few rows
        is ranked exactly over them (as cheap); a wide one approximately with the
        other rows masked out, and exactly where that finds fewer than k.
        """
        view = self.view
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, view.dim or 1)
        out: list[list[Hit]] = [[] for _ in range(q.shape[0])]
        if k <= 0 or len(view) == 0:
            return out
        only = list(rows) if rows is not None else [None] * q.shape[0]
        plain = [i for i, r in enumerate(only) if r is None]
        if plain:
            for i, hits in zip(plain, self._approximate(q[plain], k), strict=True):
                out[i] = hits
        by_filter: dict[int, list[int]] = {}
        for i, r in enumerate(only):
            if r is not None:
                if r.view is not view:
                    raise ValueError("these slots belong to another version of the index")
                by_filter.setdefault(id(r), []).append(i)
        for members in by_filter.values():
            allowed = only[members[0]]
            assert allowed is not None
            exact = members
            if len(allowed) > _EXACT_FILTER_SCANS * self.ivf.scanned(view.state.slots):
                found = self._approximate(q[members], k, within=_bitmap(allowed, view))
                enough = min(k, len(allowed))
                exact = [i for i, hits in zip(members, found, strict=True) if len(hits) < enough]
                for i, hits in zip(members, found, strict=True):
                    out[i] = hits
            if exact:
                for i, hits in zip(exact, view.search_within(q[exact], k, allowed), strict=True):
                    out[i] = hits
        return out

    def _approximate(
        self, q: np.ndarray, k: int, *, within: np.ndarray | None = None
    ) -> list[list[Hit]]:
        scores, slots = self.ivf.search(q, k, within=within)
        found = []
        for row_scores, row_slots in zip(scores, slots, strict=True):
            keep = row_slots >= 0
            found.append(self.view.hits(row_slots[keep], row_scores[keep]))
        return found


def _bitmap(rows: Slots, view: IndexView) -> np.ndarray:
    mask = np.zeros(view.state.slots, dtype=bool)
    mask[rows.slots] = True
    return np.packbits(mask, bitorder="little")


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
