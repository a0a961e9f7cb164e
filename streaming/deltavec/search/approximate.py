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
from deltavec.search.state import first_slots

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
# Rows whose vectors ``IvfIndex.known`` compares at a time.
_COMPARED_ROWS = 1024
_OLD, _ROW = "__old_slot", "__row"


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

    def __init__(self, index: Any, nprobe: int, lists: np.ndarray | None = None) -> None:
        self.index = index
        self.nprobe = nprobe
        # The cluster each slot's vector went into (-1: not held). A row that a
        # refresh brings back with the same key and vector (the untouched rows of a
        # file a MERGE rewrote; every row after compaction) goes back into it
        # without being compared with every centre again: in the serving
        # benchmark's 100,000-row target that was 0.2 s of each refresh and 0.9 s
        # of each compaction.
        self.lists = np.full(0, -1, np.int64) if lists is None else lists

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
        ivf.rebuild(state)
        return ivf

    def add(self, matrix: np.ndarray, first_slot: int, known: np.ndarray | None = None) -> None:
        """Add rows as slots ``first_slot`` on; ``known``: clusters already known (-1: not)."""
        n = matrix.shape[0]
        self._add(matrix, np.arange(first_slot, first_slot + n, dtype=np.int64), known)

    def _add(self, matrix: np.ndarray, slots: np.ndarray, known: np.ndarray | None) -> None:
        """Add the rows of ``matrix`` as ``slots`` (ascending); ``known`` as in ``add``."""
        n = matrix.shape[0]
        if not n:
            return
        faiss = require_faiss()
        x = np.ascontiguousarray(matrix, dtype=np.float32)
        lists = np.full(n, -1, np.int64) if known is None else known.astype(np.int64)
        unknown = np.flatnonzero(lists < 0)
        if len(unknown):
            lists[unknown] = self.assign(x[unknown])
        ids = np.ascontiguousarray(slots, dtype=np.int64)
        self.index.add_core(n, faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        if self.lists.shape[0] <= ids[-1]:
            grown = np.full(int(ids[-1]) + 1, -1, np.int64)
            grown[: self.lists.shape[0]] = self.lists
            self.lists = grown
        self.lists[ids] = lists

    def assign(self, x: np.ndarray) -> np.ndarray:
        """The cluster each row of ``x`` goes into: its nearest centre, as FAISS's add picks."""
        _, nearest = self.index.quantizer.search(x, 1)
        lists: np.ndarray = nearest[:, 0].astype(np.int64)
        return lists

    def remove(self, slots: np.ndarray) -> None:
        if len(slots):
            self.index.remove_ids(np.asarray(slots, dtype=np.int64))
            self.lists[slots[slots < self.lists.shape[0]]] = -1

    def copy(self) -> IvfIndex:
        """An independent copy (same clusters, same rows): a memory copy, no clustering."""
        return IvfIndex(require_faiss().clone_index(self.index), self.nprobe, self.lists.copy())

    def follow(self, old: IndexState, new: IndexState) -> None:
        """Change the index from holding ``old``'s live rows to ``new``'s.

        The ids are slots. When ``new`` keeps ``old``'s blocks and appends (a
        refresh), the rows that died are dropped and the new blocks added;
        otherwise (a block compacted, a reload) the rows of the blocks kept are
        renumbered where they lie and only the new blocks' rows are added, each
        into the cluster of the row it repeats if any (``known``).
        """
        extends = len(new.blocks) >= len(old.blocks) and all(
            a is b for a, b in zip(old.blocks, new.blocks, strict=False)
        )
        if not extends:
            self._regroup(old, new)
            return
        dying = np.flatnonzero(old.live & ~new.live[: old.slots])
        added = new.blocks[len(old.blocks) :]
        known = [self.known(old, dying, block) for block in added]
        self.remove(dying)
        offset = old.slots
        for block, lists in zip(added, known, strict=True):
            self.add(block.matrix, offset, lists)
            offset += len(block)
        self.remove(old.slots + np.flatnonzero(~new.live[old.slots :]))

    def _regroup(self, old: IndexState, new: IndexState) -> None:
        """``follow`` when blocks left or moved (compaction, a reload): the rows of
        blocks ``new`` kept stay where they are in the index under their new slots,
        and only the rows of its new blocks are added."""
        before, after = first_slots(old), first_slots(new)
        left = self._left(old, new, before, after)
        fresh = [b for b in new.blocks if id(b) not in before]
        known = [self.known(old, left, block) for block in fresh]  # before old slots go
        self.remove(left)
        remap = np.full(old.slots, -1, np.int64)
        for block in old.blocks:
            at = after.get(id(block))
            if at is not None:
                lo = before[id(block)]
                remap[lo : lo + len(block)] = np.arange(at, at + len(block))
        self._renumber(remap, new.slots)
        for block, lists in zip(fresh, known, strict=True):
            at = after[id(block)]
            live = np.flatnonzero(new.live[at : at + len(block)])
            matrix = block.matrix if len(live) == len(block) else block.matrix[live]
            self._add(matrix, at + live, lists[live])

    def _renumber(self, remap: np.ndarray, slots: int) -> None:
        """Give every row held the slot ``remap[its slot]``, in place: ids are
        rewritten in the inverted lists, the vectors are not moved."""
        faiss = require_faiss()
        invlists = self.index.invlists
        for number in range(self.index.nlist):
            size = invlists.list_size(number)
            if size:
                ids = faiss.rev_swig_ptr(invlists.get_ids(number), size)  # a view: written through
                ids[:] = remap[ids]
        lists = np.full(slots, -1, np.int64)
        held = np.flatnonzero(self.lists[: len(remap)] >= 0)
        lists[remap[held]] = self.lists[held]
        self.lists = lists

    @staticmethod
    def _left(
        old: IndexState, new: IndexState, before: dict[int, int], after: dict[int, int]
    ) -> np.ndarray:
        """Slots of ``old`` live there but not as the same row in ``new``: rows of blocks
        ``new`` dropped or compacted, and rows of blocks it kept that died."""
        left = old.live.copy()
        for block in old.blocks:
            lo, at = before[id(block)], after.get(id(block))
            if at is not None:
                left[lo : lo + len(block)] &= ~new.live[at : at + len(block)]
        return np.flatnonzero(left)

    def known(self, old: IndexState, slots: np.ndarray, block: Block) -> np.ndarray:
        """The clusters ``block``'s rows already have, -1 where unknown.

        A row has the cluster of a slot among ``slots`` of ``old`` that holds
        its key and, bit for bit, its vector.
        """
        import pyarrow as pa

        from deltavec.search.state import vectors_at

        out = np.full(len(block), -1, np.int64)
        slots = slots[slots < self.lists.shape[0]]
        slots = slots[self.lists[slots] >= 0]
        if not len(slots) or not len(block):
            return out
        names = block.keys.column_names
        before = old.keys().select(names).take(pa.array(slots)).append_column(_OLD, pa.array(slots))
        after = block.keys.append_column(_ROW, pa.array(np.arange(len(block))))
        pairs = after.join(before, keys=names, join_type="inner").sort_by(_OLD)
        rows, olds = pairs.column(_ROW).to_numpy(), pairs.column(_OLD).to_numpy()
        # In slices: the whole table's vectors at once would be a second copy of them.
        for lo in range(0, len(rows), _COMPARED_ROWS):
            r, o = rows[lo : lo + _COMPARED_ROWS], olds[lo : lo + _COMPARED_ROWS]
            same = (block.matrix[r] == vectors_at(old, o)).all(axis=1)
            out[r[same]] = self.lists[o[same]]
        return out

    def scanned(self, rows: int) -> float:
        """About how many rows one query visits in an index of ``rows`` rows."""
        return rows * self.nprobe / max(1, int(self.index.nlist))

    def rebuild(self, state: IndexState) -> None:
        """Hold ``state``'s live rows (ids: their slots) and nothing else; keeps the clusters."""
        self.index.reset()
        self.lists = np.full(state.slots, -1, np.int64)
        offset = 0
        for block in state.blocks:
            live = np.flatnonzero(state.live[offset : offset + len(block)])
            matrix = block.matrix if len(live) == len(block) else block.matrix[live]
            self._add(matrix, offset + live, None)
            offset += len(block)

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
