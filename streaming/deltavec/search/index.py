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
the next state aside and swaps it in with one assignment.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from deltavec.columns import EMBEDDING, MODEL
from deltavec.errors import TargetError
from deltavec.search import deletions, delta_files, refresh
from deltavec.search.refresh import RefreshReport
from deltavec.search.state import FileRows, IndexState, compact, needs_compaction
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
        self._key_slots: tuple[IndexState, pa.Table] | None = None
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
        return self.properties.get(MODEL_PROPERTY, "")

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
        loaded = self._read(delta_files.dataset(self.table, self.path, self.storage_options))
        blocks = (loaded.block,) if len(loaded.block) else ()
        live = np.ones(len(loaded.block), dtype=bool)
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
        if self._approximate is not None:
            with self._ann_lock:
                self._approximate.rebuild(state.blocks)
                self._approximate.remove(np.flatnonzero(~state.live))
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
            identity = self.model_identity
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
                if self.table.metadata().id != table_id:
                    # The path now holds another table (dropped and created again).
                    new = self._load_all()
                    report = RefreshReport(
                        state.version, after, rows_added=new.slots, full_reload=True
                    )
                else:
                    if self.model_identity != identity:
                        raise TargetError(
                            f"target {self.path} switched models at version {after} "
                            f"({identity} -> {self.model_identity}); open it again"
                        )
                    new, report = self._apply_commits(state, after)
            except BaseException:
                self.table.load_as_version(state.version)
                raise
            self._state = new
            return replace(report, seconds=time.perf_counter() - started)

    def _apply_commits(self, state: IndexState, after: int) -> tuple[IndexState, RefreshReport]:
        data = delta_files.dataset(self.table, self.path, self.storage_options)
        diff = refresh.diff_commits(
            self.table, data, state, after, storage_options=self.storage_options, read=self._read
        )
        if diff is None:
            # Deleted rows may come back (or the log no longer says): masks only
            # ever hide rows, so the table is read again whole.
            new = self._load_all()
            return new, RefreshReport(state.version, after, rows_added=new.slots, full_reload=True)
        compacted = compact(diff.state) if needs_compaction(diff.state) else None
        if self._approximate is not None:
            with self._ann_lock:
                if compacted is not None:
                    self._approximate.rebuild(compacted.blocks)
                else:
                    # The FAISS ids are slots: drop what died among the old ones,
                    # add the new rows, then drop the new rows already deleted.
                    live = diff.state.live
                    self._approximate.remove(np.flatnonzero(state.live & ~live[: state.slots]))
                    self._approximate.add(diff.added.matrix, state.slots)
                    self._approximate.remove(state.slots + np.flatnonzero(~live[state.slots :]))
        return compacted or diff.state, diff.report

    # -- search -----------------------------------------------------------------------

    def use_approximate(self, *, nlist: int | None = None, nprobe: int | None = None) -> None:
        """Answer unfiltered queries from a FAISS inverted-file index (needs faiss-cpu).

        Args:
            nlist: clusters; default about the square root of the row count.
            nprobe: clusters visited per query; more is slower and closer to exact.
        """
        from deltavec.search.approximate import IvfIndex

        with self._refreshing:
            state = self._state
            index = IvfIndex.train(state.blocks, nlist=nlist, nprobe=nprobe)
            index.rebuild(state.blocks)
            index.remove(np.flatnonzero(~state.live))
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
        rows: np.ndarray | None = None,
        exact: bool | None = None,
    ) -> list[Hit]:
        """The k rows most similar to one query vector, best first.

        Args:
            query: a vector of the table's dimension, from the table's model.
            k: how many hits at most.
            rows: only these slots compete (from ``slots_of``, for filters).
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
        state = self._state
        if state.slots == state.dead:
            return []
        scores = _scores(state, q)
        if rows is not None:
            scores = scores[rows]
        top = _top_k(scores, k)
        return _hits(state, rows[top] if rows is not None else top, scores[top])

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

    def slots_of(self, keys: pa.Table) -> np.ndarray:
        """The live slots whose keys appear in ``keys`` (a table of the key columns), sorted.

        Slots belong to the version the index holds now: pass them to ``search``
        before the next ``refresh``.
        """
        import pyarrow as pa

        state = self._state
        cached = self._key_slots
        if cached is None or cached[0] is not state:
            slots = pa.array(np.arange(state.slots, dtype=np.int64))
            table = state.keys().append_column("__slot", slots).filter(pa.array(state.live))
            cached = self._key_slots = (state, table)
        wanted = keys.select(self.keys).group_by(self.keys).aggregate([])
        joined = cached[1].join(wanted, keys=self.keys, join_type="inner")
        return np.sort(joined.column("__slot").to_numpy())


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
