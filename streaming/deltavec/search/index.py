"""The vectors of a deltavec target in memory, kept current from the Delta log.

The target is read with the ``deltalake`` (delta-rs) package into float32
blocks: no Spark, no JVM, and no Python object per row. Every row remembers the
data file it came from and its position there, so ``refresh`` replays only the
log versions committed since the last load: rows of files a commit removed are
masked out, rows a deletion vector newly names are masked out (the file is not
read again), and files it added are read and appended as a new block. A MERGE
therefore costs the rows it wrote, not the table.

Scores are inner products; the job writes L2-normalised vectors for models that
normalise (the default does), so the score is the cosine similarity.

Searches may run on many threads while one thread refreshes: a refresh builds
the next state aside and swaps it in with one assignment. A query that needs
several steps (a filter's slots, then the search) takes one ``IndexView`` and
runs them all on it, so every step sees the same version; with FAISS, its index
and the state are swapped together under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from deltavec.columns import EMBEDDING, MODEL
from deltavec.errors import ModelChangedError, TargetError
from deltavec.search import deletions, delta_files, refresh
from deltavec.search.refresh import RefreshReport
from deltavec.search.state import (
    FileRows,
    IndexState,
    block_rows,
    compact,
    needs_compaction,
    vectors_at,
)
from deltavec.sink.target import DIM_PROPERTY, KEYS_PROPERTY, MODEL_PROPERTY

if TYPE_CHECKING:
    import pyarrow as pa

    from deltavec.search.approximate import IvfIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes:
        key: the target row's key columns.
        score: inner product with the query (cosine similarity for normalised vectors).
        source: source columns asked for, or None (not asked, or the row is gone).
        text: the text the model saw, rendered from the source row, when asked.
    """

    key: dict[str, Any]
    score: float
    source: dict[str, Any] | None = None
    text: str | None = None


class Ranker(Protocol):
    """Ranks query vectors in one fixed version (``IndexView`` exactly, ``IvfView`` not)."""

    def search_many(
        self, queries: np.ndarray, k: int = 10, *, rows: Sequence[Slots | None] | None = None
    ) -> list[list[Hit]]: ...


class VectorIndex:
    """Exact (or, with FAISS, approximate) nearest-neighbour search over one target.

    Args:
        path: the target's storage path (local, ``s3://``, ``abfss://``, ``gs://``).
        storage_options: credentials and settings for cloud storage, as ``deltalake`` takes them.
        version: load this table version instead of the latest.

    Raises:
        TargetError: the path is not a deltavec target, uses a table feature this
            reader cannot read, or holds vectors of more than one model.
    """

    def __init__(
        self,
        path: str,
        *,
        storage_options: dict[str, str] | None = None,
        version: int | None = None,
    ) -> None:
        self.path = path
        self.storage_options = storage_options
        self.table = delta_files.open_table(path, storage_options, version)
        self._next_file_id = 0
        self._approximate: IvfIndex | None = None
        self._view: IndexView | None = None
        self._identity = self.properties.get(MODEL_PROPERTY, "")
        # One refresh at a time; FAISS's index is changed in place, so its
        # searches wait for a refresh too (exact searches never wait).
        self._refreshing = threading.Lock()
        self._ann_lock = threading.Lock()
        self._state = self._load_all()

    # -- the table --------------------------------------------------------------------

    @property
    def properties(self) -> dict[str, str]:
        """The target's table properties (``deltavec.model``, ``deltavec.keys``, ...)."""
        return dict(self.table.metadata().configuration)

    @property
    def model_identity(self) -> str:
        """The model of the vectors served: fixed for this index (refresh refuses a change)."""
        return self._identity

    @property
    def keys(self) -> list[str]:
        return [k for k in self.properties.get(KEYS_PROPERTY, "").split(",") if k]

    @property
    def version(self) -> int:
        """The table version the index answers from."""
        return self._state.version

    @property
    def dim(self) -> int:
        blocks = self._state.blocks
        return int(blocks[0].matrix.shape[1]) if blocks else 0

    def __len__(self) -> int:
        """Rows in the table (masked-out rows of removed files do not count)."""
        return self._state.slots - self._state.dead

    @property
    def slots(self) -> int:
        """Rows held in memory, including masked-out ones awaiting compaction."""
        return self._state.slots

    # -- loading ----------------------------------------------------------------------

    def _load_all(self) -> IndexState:
        keys = self.keys
        if not keys:
            raise TargetError(
                f"{self.path} is not a deltavec target (no {KEYS_PROPERTY} table property)"
            )
        names = [f.name for f in self.table.schema().fields]
        missing = [c for c in (*keys, EMBEDDING, MODEL) if c not in names]
        if missing:
            raise TargetError(f"target {self.path} lacks column(s) {', '.join(missing)}")
        data = delta_files.dataset(self.table, self.path, self.storage_options)
        loaded = refresh.read_blocks(data, self._read, block_rows(data.count_rows()))
        blocks = loaded.blocks
        live = np.ones(loaded.rows, dtype=bool)
        deleted = deletions.deleted_rows(self.table) if deletions.enabled(self.table) else {}
        deletions.mask(live, blocks, loaded.file_ids, deleted)
        state = IndexState(
            version=int(self.table.version()),
            blocks=blocks,
            live=live,
            dead=int(live.size - live.sum()),
            file_ids=loaded.file_ids,
            masked_files=frozenset(deleted) & loaded.file_ids.keys(),
        )
        log.info("loaded %d vectors from %s version %d", state.slots, self.path, state.version)
        return state

    def _read(self, data: Any) -> FileRows:
        """Read files and check they hold the table's model only."""
        loaded = delta_files.read_files(
            data,
            keys=self.keys,
            dim=int(self.properties.get(DIM_PROPERTY, "0") or 0),
            path=self.path,
            first_file_id=self._next_file_id,
        )
        self._next_file_id += len(loaded.file_ids)
        models = loaded.models | ({self.model_identity} if self.model_identity else set())
        if len(models) > 1:
            raise TargetError(
                f"target {self.path} mixes vectors of {len(models)} models "
                f"({', '.join(sorted(models))}); queries against it would compare "
                "incomparable vectors"
            )
        return loaded

    # -- refresh ----------------------------------------------------------------------

    def refresh(self) -> RefreshReport:
        """Catch up with the commits made since the last load, reading only what they added.

        Each new log version's ``remove`` actions mask rows out and its ``add``
        actions are read, so a MERGE that rewrote two files costs two files. A
        file added again with a grown deletion vector is not read: its newly
        deleted rows are masked out by position. If anything fails (a model
        switch, an unreadable feature or file) the index keeps answering from
        the version it had.

        Raises:
            TargetError: the new versions hold another model's vectors, use a
                table feature this reader cannot read, or cannot be read.
        """
        from deltalake.exceptions import DeltaError

        with self._refreshing:
            started = time.perf_counter()
            state = self._state
            table_id = self.table.metadata().id
            identity = self._identity
            try:
                self.table.update_incremental()
            except DeltaError as exc:
                raise TargetError(
                    f"target {self.path} cannot be refreshed from version {state.version}: "
                    f"{delta_files.first_line(exc)}"
                ) from None
            after = int(self.table.version())
            if after == state.version:
                return RefreshReport(after, after, seconds=time.perf_counter() - started)
            try:
                recorded = self.properties.get(MODEL_PROPERTY, "")
                if recorded != identity:
                    # A reembed: the query encoder of whoever holds this index is the
                    # old model's, so loading the new vectors would mix the two.
                    raise ModelChangedError(
                        f"target {self.path} switched models at version {after} "
                        f"({identity} -> {recorded}); open it again",
                        recorded,
                    )
                if self.table.metadata().id != table_id:
                    # The path now holds another table (dropped and created again).
                    new = self._load_all()
                    report = RefreshReport(
                        state.version, after, rows_added=new.slots, full_reload=True
                    )
                    self._swap(new)
                else:
                    report = self._apply_commits(state, after)
            except BaseException:
                self.table.load_as_version(state.version)
                raise
            return replace(report, seconds=time.perf_counter() - started)

    def _apply_commits(self, state: IndexState, after: int) -> RefreshReport:
        data = delta_files.dataset(self.table, self.path, self.storage_options)
        diff = refresh.diff_commits(
            self.table, data, state, after, storage_options=self.storage_options, read=self._read
        )
        if diff is None:
            # Deleted rows may come back (or the log no longer says): masks only
            # ever hide rows, so the table is read again whole.
            new = self._load_all()
            self._swap(new)
            return RefreshReport(state.version, after, rows_added=new.slots, full_reload=True)
        compacted = compact(diff.state) if needs_compaction(diff.state) else None
        if compacted is not None:
            self._swap(compacted)
        else:
            self._swap(diff.state)
        return diff.report

    def _swap(self, new: IndexState) -> None:
        """Make ``new`` the state queries see; FAISS (if set up) changes in the same step.

        A search on the FAISS path holds ``_ann_lock`` while it reads the state
        and the FAISS ids (which are slots): changing both under that lock means
        no search sees the ids of one state with the rows of another.
        """
        if self._approximate is None:
            self._state = new
            return
        with self._ann_lock:
            self._approximate.follow(self._state, new)
            self._state = new

    # -- search -----------------------------------------------------------------------

    def use_approximate(self, *, nlist: int | None = None, nprobe: int | None = None) -> None:
        """Answer unfiltered queries from a FAISS inverted-file index (needs faiss-cpu).

        Args:
            nlist: clusters; default about the square root of the row count.
            nprobe: clusters visited per query; more is slower and closer to exact.
        """
        from deltavec.search.approximate import IvfIndex

        with self._refreshing:
            index = IvfIndex.holding(self._state, nlist=nlist, nprobe=nprobe)
            with self._ann_lock:
                self._approximate = index

    def use_exact(self) -> None:
        """Drop the approximate index (and its copy of the vectors)."""
        with self._ann_lock:
            self._approximate = None

    @property
    def approximate(self) -> bool:
        return self._approximate is not None

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Inner products of one query with every slot; masked-out slots get -inf."""
        return _scores(self._state, self._vector(query))

    def _vector(self, query: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        if self.dim and q.shape[0] != self.dim:
            raise TargetError(
                f"the query vector has {q.shape[0]} dimensions; target {self.path} holds "
                f"{self.dim}-dimensional vectors"
            )
        return q

    def search(
        self,
        query: np.ndarray,
        k: int = 10,
        *,
        rows: Slots | np.ndarray | None = None,
        exact: bool | None = None,
    ) -> list[Hit]:
        """The k rows most similar to one query vector, best first.

        Args:
            query: a vector of the table's dimension, from the table's model.
            k: how many hits at most.
            rows: only these slots compete: ``Slots`` from ``slots_of`` are answered
                from the version they were taken from, whatever refreshed since;
                a plain array of slots means slots of the version held now.
            exact: True forces exact search when an approximate index is set up;
                filtered queries are always exact.
        """
        q = self._vector(query)
        if k <= 0:
            return []
        if self._approximate is not None and rows is None and exact is not True:
            with self._ann_lock:
                state = self._state
                approximate = self._approximate
                if approximate is not None:
                    found, slots = approximate.search(q.reshape(1, -1), k)
                    keep = slots[0] >= 0
                    return _hits(state, slots[0][keep], found[0][keep])
        if isinstance(rows, Slots):
            return rows.view.search(q, k, rows=rows)
        view = self.view()
        return view.search(q, k, rows=None if rows is None else Slots(view, rows))

    def view(self) -> IndexView:
        """The version held now, fixed: every call on it answers from that version."""
        state = self._state
        view = self._view
        if view is None or view.state is not state:
            view = self._view = IndexView(state, self.keys, self.dim)
        return view

    def rows(self) -> tuple[pa.Table, np.ndarray]:
        """Every row the table holds now: (key columns, (n, dim) vectors), in slot order.

        A copy, for exports and cross-checks; queries should use ``search``.
        """
        state = self._state
        parts, offset = [], 0
        for block in state.blocks:
            parts.append(block.matrix[state.live[offset : offset + len(block)]])
            offset += len(block)
        vectors = np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
        return _keys_at(state, np.flatnonzero(state.live)), vectors

    def slots_of(self, keys: pa.Table) -> Slots:
        """The live slots whose keys appear in ``keys`` (a table of the key columns).

        They belong to the version the index holds now; ``search(rows=...)``
        answers from that version even if a refresh ran in between.
        """
        return self.view().slots_of(keys)


@dataclass(frozen=True)
class Slots:
    """Sorted slots of one ``IndexView`` (a filter's rows), tied to the version they index."""

    view: IndexView
    slots: np.ndarray

    def __len__(self) -> int:
        return len(self.slots)


class IndexView:
    """One version of the index, never changed: exact search and key lookups on it.

    A caller that runs several steps for one query (filter, search, attach)
    takes one view and uses it throughout; ``VectorIndex.view`` gives the current one.
    """

    def __init__(self, state: IndexState, keys: list[str], dim: int) -> None:
        self.state = state
        self.key_names = keys
        self.dim = dim
        self._key_slots: pa.Table | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self.state.version

    def __len__(self) -> int:
        return self.state.slots - self.state.dead

    def search(self, query: np.ndarray, k: int = 10, *, rows: Slots | None = None) -> list[Hit]:
        """Exact top k of this version (``rows``: only these slots of this view compete)."""
        if rows is not None and rows.view is not self:
            raise ValueError("these slots belong to another version of the index")
        state = self.state
        if k <= 0 or state.slots == state.dead:
            return []
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        scores = _scores(state, q)
        if rows is not None:
            scores = scores[rows.slots]
        top = _top_k(scores, k)
        return _hits(state, rows.slots[top] if rows is not None else top, scores[top])

    def search_many(
        self, queries: np.ndarray, k: int = 10, *, rows: Sequence[Slots | None] | None = None
    ) -> list[list[Hit]]:
        """Exact top k of this version for each row of ``queries`` (n, dim).

        One matrix product for all of them: the rows are read from memory once
        per call, not once per query, which is what bounds a query's cost.
        ``rows[i]``, when given and not None, restricts query i to those slots.
        """
        state = self.state
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim or 1)
        if k <= 0 or state.slots == state.dead:
            return [[] for _ in range(q.shape[0])]
        scores = np.empty((state.slots, q.shape[0]), dtype=np.float32)
        offset = 0
        for block in state.blocks:
            np.matmul(block.matrix, q.T, out=scores[offset : offset + len(block)])
            offset += len(block)
        if state.dead:
            scores[~state.live] = -np.inf
        # One contiguous row per query: selecting the top k from a strided
        # column costs about three times as much as from a row.
        out = []
        for i, column in enumerate(np.ascontiguousarray(scores.T)):
            only = rows[i] if rows is not None else None
            if only is None:
                top = _top_k(column, k)
                out.append(_hits(state, top, column[top]))
                continue
            if only.view is not self:
                raise ValueError("these slots belong to another version of the index")
            picked = column[only.slots]
            top = _top_k(picked, k)
            out.append(_hits(state, only.slots[top], picked[top]))
        return out

    def search_within(self, queries: np.ndarray, k: int, rows: Slots) -> list[list[Hit]]:
        """Exact top k among ``rows`` for each query, reading only those rows' vectors.

        For a filter of few rows: its cost follows the rows, not the table.
        """
        if rows.view is not self:
            raise ValueError("these slots belong to another version of the index")
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim or 1)
        if k <= 0 or not len(rows):
            return [[] for _ in range(q.shape[0])]
        scores = np.ascontiguousarray((self._vectors_at(rows.slots) @ q.T).T)
        out = []
        for column in scores:
            top = _top_k(column, k)
            out.append(_hits(self.state, rows.slots[top], column[top]))
        return out

    def _vectors_at(self, slots: np.ndarray) -> np.ndarray:
        """The vectors of sorted ``slots``, in that order."""
        if not self.state.blocks:
            return np.zeros((0, self.dim), np.float32)
        return vectors_at(self.state, slots)

    def hits(self, slots: np.ndarray, scores: np.ndarray) -> list[Hit]:
        """``Hit``s (keys and scores) for slots of this version."""
        return _hits(self.state, slots, scores)

    def slots_of(self, keys: pa.Table) -> Slots:
        """The live slots of this version whose keys appear in ``keys``, sorted."""
        wanted = keys.select(self.key_names).group_by(self.key_names).aggregate([])
        joined = self.live_keys().join(wanted, keys=self.key_names, join_type="inner")
        return Slots(self, np.sort(joined.column(SLOT).to_numpy()))

    def live_keys(self) -> pa.Table:
        """The key columns of the live rows plus their slot (column ``__slot``)."""
        import pyarrow as pa

        with self._lock:
            if self._key_slots is None:
                state = self.state
                slots = pa.array(np.arange(state.slots, dtype=np.int64))
                table = state.keys().append_column(SLOT, slots)
                self._key_slots = table.filter(pa.array(state.live))
            return self._key_slots


# The slot column that IndexView.live_keys adds to the key columns.
SLOT = "__slot"


def _scores(state: IndexState, q: np.ndarray) -> np.ndarray:
    out = np.empty(state.slots, dtype=np.float32)
    offset = 0
    for block in state.blocks:
        np.matmul(block.matrix, q, out=out[offset : offset + len(block)])
        offset += len(block)
    if state.dead:
        out[~state.live] = -np.inf
    return out


def _hits(state: IndexState, slots: np.ndarray, scores: np.ndarray) -> list[Hit]:
    keys = _keys_at(state, slots).to_pylist()
    return [Hit(key=key, score=float(s)) for key, s in zip(keys, scores, strict=True)]


def _keys_at(state: IndexState, slots: np.ndarray) -> pa.Table:
    import pyarrow as pa

    return state.keys().take(pa.array(np.asarray(slots, dtype=np.int64)))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest finite scores, best first (ties: lower index first)."""
    finite = np.isfinite(scores)
    k = min(k, len(scores) if finite.all() else int(finite.sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    # Sorting the k candidates by (score desc, index asc) makes the order reproducible.
    return top[np.lexsort((top, -scores[top]))]
