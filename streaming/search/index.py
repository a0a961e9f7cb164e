"""The vectors of a deltavec target in memory, kept current from the Delta log.

The target is read with the ``deltalake`` (delta-rs) package, one Parquet file at
a time, into float32 blocks: no Spark, no JVM, and no Python object per row.
Every row remembers the data file it came from, so ``refresh`` can replay only
the log versions committed since the last load: rows of files a commit removed
are masked out, rows of files it added are read and appended. A MERGE that
rewrites a file therefore costs one file, not the table.

Scores are inner products; the job writes L2-normalised vectors for models that
normalise (the default does), so the score is the cosine similarity.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from streaming.columns import EMBEDDING, MODEL
from streaming.errors import TargetError
from streaming.target import KEYS_PROPERTY, MODEL_PROPERTY

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as pads
    from deltalake import DeltaTable

    from streaming.search.approximate import IvfIndex

log = logging.getLogger(__name__)

# pyarrow's virtual column naming the file each scanned row came from.
_FILENAME = "__filename"
# Rows per record batch while loading: bounds the Arrow memory next to the matrix.
_BATCH_ROWS = 65_536
# Masked-out rows cost a multiply each per query; past this share they are dropped.
_COMPACT_AT = 0.25
# A refresh appends a block per commit batch; merge them before queries pay for many.
_MAX_BLOCKS = 16


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


@dataclass(frozen=True)
class RefreshReport:
    """What one ``refresh`` read and changed.

    Attributes:
        from_version: the table version the index held before.
        to_version: the version it holds now.
        files_added: data files read (a MERGE's rewritten files count here).
        files_removed: data files whose rows were masked out.
        rows_added: rows read from the added files.
        rows_removed: rows masked out.
        full_reload: True when the table was replaced and read again whole.
        seconds: wall time of the refresh.
    """

    from_version: int
    to_version: int
    files_added: int = 0
    files_removed: int = 0
    rows_added: int = 0
    rows_removed: int = 0
    full_reload: bool = False
    seconds: float = 0.0


@dataclass
class _Block:
    """Rows loaded together: a contiguous matrix and their keys, in the same order."""

    matrix: np.ndarray
    keys: pa.Table
    files: np.ndarray  # int32 file id per row


@dataclass
class _Loaded:
    """Rows read from some data files, not yet part of the index."""

    block: _Block
    file_ids: dict[str, int] = field(default_factory=dict)
    models: set[str] = field(default_factory=set)


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
        self._storage_options = storage_options
        self.table = _open(path, storage_options, version)
        self._blocks: list[_Block] = []
        self._live = np.zeros(0, dtype=bool)
        self._dead = 0
        self._file_ids: dict[str, int] = {}
        self._next_file_id = 0
        self._key_slots: pa.Table | None = None
        self._approximate: IvfIndex | None = None
        self._load_all()

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
        return int(self.table.version())

    @property
    def dim(self) -> int:
        return int(self._blocks[0].matrix.shape[1]) if self._blocks else 0

    def __len__(self) -> int:
        """Rows in the table (masked-out rows of removed files do not count)."""
        return self.slots - self._dead

    @property
    def slots(self) -> int:
        """Rows held in memory, including masked-out ones awaiting compaction."""
        return int(self._live.shape[0])

    def _dataset(self) -> pads.Dataset:
        import pyarrow.dataset as pads
        from deltalake.exceptions import DeltaProtocolError

        try:
            return self.table.to_pyarrow_dataset(
                # Parquet stores the model column dictionary-encoded: reading it so
                # makes the one-model check a look at a few dictionary entries.
                parquet_read_options=pads.ParquetReadOptions(dictionary_columns={MODEL}),
            )
        except DeltaProtocolError:
            raise TargetError(_unreadable_features(self.path, self.table)) from None

    # -- loading ----------------------------------------------------------------------

    def _load_all(self) -> None:
        keys = self.keys
        if not keys:
            raise TargetError(
                f"{self.path} is not a deltavec target (no {KEYS_PROPERTY} table property)"
            )
        missing = [c for c in (*keys, EMBEDDING, MODEL) if c not in self._schema_names()]
        if missing:
            raise TargetError(f"target {self.path} lacks column(s) {', '.join(missing)}")
        dataset = self._dataset()
        loaded = self._read(dataset, dataset.count_rows())
        self._check_models(loaded.models)
        self._blocks = [loaded.block] if len(loaded.block.keys) else []
        self._live = np.ones(len(loaded.block.keys), dtype=bool)
        self._dead = 0
        self._file_ids = loaded.file_ids
        self._key_slots = None
        if self._approximate is not None:
            self._approximate.rebuild(self._blocks)
        log.info("loaded %d vectors from %s version %d", len(self), self.path, self.version)

    def _schema_names(self) -> list[str]:
        return [f.name for f in self.table.schema().fields]

    def _read(self, dataset: pads.Dataset, rows: int) -> _Loaded:
        """Read keys, vectors and models of ``dataset`` into one block."""
        import pyarrow as pa
        import pyarrow.compute as pc

        keys = self.keys
        dim = int(self.properties.get("deltavec.dim", "0") or 0)
        matrix: np.ndarray | None = None
        key_batches: list[pa.RecordBatch] = []
        file_parts: list[np.ndarray] = []
        file_ids: dict[str, int] = {}
        models: set[str] = set()
        filled = 0
        scanner = dataset.scanner(
            columns=[*keys, EMBEDDING, MODEL, _FILENAME], batch_size=_BATCH_ROWS
        )
        for batch in scanner.to_batches():
            n = batch.num_rows
            if n == 0:
                continue
            vectors = _as_matrix(batch.column(EMBEDDING), self.path)
            if matrix is None:
                dim = dim or vectors.shape[1]
                # Preallocated from the row count in the file footers, so the
                # table is never held twice (Arrow lists and the matrix).
                matrix = np.empty((max(rows, n), dim), dtype=np.float32)
            if vectors.shape[1] != dim:
                raise TargetError(
                    f"target {self.path} holds {vectors.shape[1]}-dimensional vectors "
                    f"next to {dim}-dimensional ones"
                )
            if filled + n > matrix.shape[0]:  # a file changed size since the count
                matrix = np.concatenate([matrix, np.empty((filled + n, dim), np.float32)])
            matrix[filled : filled + n] = vectors
            filled += n
            models.update(_distinct_strings(batch.column(MODEL)))
            key_batches.append(batch.select(keys))
            names = pc.dictionary_encode(batch.column(_FILENAME))
            ids = np.array(
                [
                    file_ids.setdefault(name, self._next_file_id + len(file_ids))
                    for name in names.dictionary.to_pylist()
                ],
                dtype=np.int32,
            )
            file_parts.append(ids[names.indices.to_numpy(zero_copy_only=False)])
        if matrix is None:
            matrix = np.zeros((0, dim), dtype=np.float32)
        key_schema = pa.schema([dataset.schema.field(k) for k in keys])
        block = _Block(
            matrix=matrix[:filled] if filled < matrix.shape[0] else matrix,
            keys=pa.Table.from_batches(key_batches, schema=key_schema),
            files=np.concatenate(file_parts) if file_parts else np.zeros(0, np.int32),
        )
        # Files without rows still count as known, so a later remove finds them.
        for fragment in dataset.get_fragments():
            file_ids.setdefault(fragment.path, self._next_file_id + len(file_ids))
        self._next_file_id += len(file_ids)
        return _Loaded(block, file_ids, models)

    def _check_models(self, seen: set[str]) -> None:
        models = set(seen)
        expected = self.model_identity
        if expected:
            models.add(expected)
        if len(models) > 1:
            raise TargetError(
                f"target {self.path} mixes vectors of {len(models)} models "
                f"({', '.join(sorted(models))}); queries against it would compare "
                "incomparable vectors"
            )

    # -- refresh ----------------------------------------------------------------------

    def refresh(self) -> RefreshReport:
        """Catch up with the commits made since the last load, reading only what they added.

        Each new log version's ``remove`` actions mask rows out and its ``add``
        actions are read, so a MERGE that rewrote two files costs two files. The
        index is unchanged if anything fails (a model switch, an unreadable file).

        Raises:
            TargetError: the new versions hold another model's vectors or a
                table feature this reader cannot read.
        """
        started = time.perf_counter()
        before = self.version
        table_id = self.table.metadata().id
        identity = self.model_identity
        self.table.update_incremental()
        after = self.version
        if after == before:
            return RefreshReport(before, after, seconds=time.perf_counter() - started)
        try:
            if self.table.metadata().id != table_id:
                # The path now holds another table (dropped and recreated).
                self._load_all()
                return RefreshReport(
                    before,
                    after,
                    rows_added=len(self),
                    full_reload=True,
                    seconds=time.perf_counter() - started,
                )
            if self.model_identity != identity:
                raise TargetError(
                    f"target {self.path} switched models at version {after} "
                    f"({identity} -> {self.model_identity}); open it again with the new model"
                )
            report = self._apply_new_files(before, after)
        except BaseException:
            self.table.load_as_version(before)
            raise
        return replace(report, seconds=time.perf_counter() - started)

    def _apply_new_files(self, before: int, after: int) -> RefreshReport:
        import pyarrow.dataset as pads

        dataset = self._dataset()
        fragments = {fragment.path: fragment for fragment in dataset.get_fragments()}
        removed = [path for path in self._file_ids if path not in fragments]
        added = [fragment for path, fragment in fragments.items() if path not in self._file_ids]
        subset = pads.FileSystemDataset(added, dataset.schema, dataset.format, dataset.filesystem)
        loaded = self._read(subset, subset.count_rows() if added else 0)
        self._check_models(loaded.models)

        # Nothing below can fail on the table's content: apply it all.
        removed_ids = np.array([self._file_ids.pop(path) for path in removed], dtype=np.int32)
        rows_removed = 0
        if removed_ids.size:
            offset = 0
            for block in self._blocks:
                hit = np.isin(block.files, removed_ids)
                span = self._live[offset : offset + len(block.files)]
                newly = hit & span
                rows_removed += int(newly.sum())
                span[hit] = False
                offset += len(block.files)
            self._dead += rows_removed
        first_new = self.slots
        if len(loaded.block.keys):
            self._blocks.append(loaded.block)
            self._live = np.concatenate([self._live, np.ones(len(loaded.block.keys), bool)])
        self._file_ids.update(loaded.file_ids)
        self._key_slots = None
        if self._approximate is not None:
            dead = np.flatnonzero(~self._live[:first_new]) if rows_removed else np.zeros(0)
            self._approximate.remove(dead)
            self._approximate.add(loaded.block.matrix, first_new)
        self._maybe_compact()
        log.info(
            "refreshed %s from version %d to %d: +%d files (%d rows), -%d files (%d rows)",
            self.path,
            before,
            after,
            len(added),
            len(loaded.block.keys),
            len(removed),
            rows_removed,
        )
        return RefreshReport(
            before,
            after,
            files_added=len(added),
            files_removed=len(removed),
            rows_added=len(loaded.block.keys),
            rows_removed=rows_removed,
        )

    def _maybe_compact(self) -> None:
        if not (self._dead > _COMPACT_AT * max(self.slots, 1) or len(self._blocks) > _MAX_BLOCKS):
            return
        import pyarrow as pa

        matrices, keys, files = [], [], []
        offset = 0
        for block in self._blocks:
            live = self._live[offset : offset + len(block.files)]
            offset += len(block.files)
            matrices.append(block.matrix[live])
            keys.append(block.keys.filter(pa.array(live)))
            files.append(block.files[live])
        merged = _Block(
            matrix=np.concatenate(matrices),
            keys=pa.concat_tables(keys).combine_chunks(),
            files=np.concatenate(files),
        )
        self._blocks = [merged] if len(merged.files) else []
        self._live = np.ones(len(merged.files), dtype=bool)
        self._dead = 0
        self._key_slots = None
        if self._approximate is not None:
            self._approximate.rebuild(self._blocks)

    # -- search -----------------------------------------------------------------------

    def use_approximate(self, *, nlist: int | None = None, nprobe: int | None = None) -> None:
        """Answer unfiltered queries from a FAISS inverted-file index (needs faiss-cpu).

        Args:
            nlist: clusters; default about the square root of the row count.
            nprobe: clusters visited per query; more is slower and closer to exact.
        """
        from streaming.search.approximate import IvfIndex

        self._approximate = IvfIndex.train(self._blocks, nlist=nlist, nprobe=nprobe)
        offset = 0
        for block in self._blocks:
            self._approximate.add(block.matrix, offset)
            offset += len(block.files)
        dead = np.flatnonzero(~self._live)
        if dead.size:
            self._approximate.remove(dead)

    @property
    def approximate(self) -> bool:
        return self._approximate is not None

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Inner products of one query with every slot; masked-out slots get -inf."""
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        if self.dim and q.shape[0] != self.dim:
            raise TargetError(
                f"the query vector has {q.shape[0]} dimensions; target {self.path} holds "
                f"{self.dim}-dimensional vectors"
            )
        out = np.empty(self.slots, dtype=np.float32)
        offset = 0
        for block in self._blocks:
            end = offset + block.matrix.shape[0]
            np.matmul(block.matrix, q, out=out[offset:end])
            offset = end
        if self._dead:
            out[~self._live] = -np.inf
        return out

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
            exact: force exact search even when an approximate index is set up;
                filtered queries are always exact.
        """
        if k <= 0 or len(self) == 0:
            return []
        use_ann = self._approximate is not None and rows is None and exact is not True
        if use_ann:
            assert self._approximate is not None
            q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
            found, slots = self._approximate.search(q, k)
            keep = slots[0] >= 0
            return self._hits(slots[0][keep], found[0][keep])
        scores = self.scores(query)
        if rows is not None:
            scores = scores[rows]
        top = _top_k(scores, k)
        slots = rows[top] if rows is not None else top
        return self._hits(slots, scores[top])

    def _hits(self, slots: np.ndarray, scores: np.ndarray) -> list[Hit]:
        keys = self.keys_at(slots).to_pylist()
        return [Hit(key=key, score=float(s)) for key, s in zip(keys, scores, strict=True)]

    def keys_at(self, slots: np.ndarray) -> pa.Table:
        """The key columns of the given slots, in that order."""
        import pyarrow as pa

        if not self._blocks:
            return pa.table({k: pa.array([]) for k in self.keys})
        table = self._all_keys()
        return table.take(pa.array(np.asarray(slots, dtype=np.int64)))

    def _all_keys(self) -> pa.Table:
        import pyarrow as pa

        if len(self._blocks) == 1:
            return self._blocks[0].keys
        return pa.concat_tables([b.keys for b in self._blocks])

    def slots_of(self, keys: pa.Table) -> np.ndarray:
        """The live slots whose keys appear in ``keys`` (a table of the key columns), sorted."""
        import pyarrow as pa

        if self._key_slots is None:
            table = self._all_keys()
            self._key_slots = table.append_column(
                "__slot", pa.array(np.arange(self.slots, dtype=np.int64))
            ).filter(pa.array(self._live))
        wanted = keys.select(self.keys).group_by(self.keys).aggregate([])
        joined = self._key_slots.join(wanted, keys=self.keys, join_type="inner")
        return np.sort(joined.column("__slot").to_numpy())


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest finite scores, best first (ties: lower index first)."""
    finite = np.isfinite(scores)
    k = min(k, len(scores) if finite.all() else int(finite.sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    # Sorting the k candidates by (score desc, index asc) makes the order reproducible.
    return top[np.lexsort((top, -scores[top]))]


def _open(path: str, storage_options: dict[str, str] | None, version: int | None) -> DeltaTable:
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    try:
        return DeltaTable(path, version=version, storage_options=storage_options)
    except TableNotFoundError:
        raise TargetError(f"target {path} is not a Delta table (no _delta_log there)") from None
    except DeltaError as exc:
        raise TargetError(f"target {path} cannot be opened: {_first_line(exc)}") from None


def _unreadable_features(path: str, table: DeltaTable) -> str:
    from deltalake.table import SUPPORTED_READER_FEATURES

    protocol = table.protocol()
    features = sorted(set(protocol.reader_features or []) - set(SUPPORTED_READER_FEATURES))
    named = ", ".join(features) or f"reader version {protocol.min_reader_version}"
    return (
        f"target {path} uses the Delta table feature(s) {named}, which the deltalake "
        "reader cannot read; write the target without them (deltavec keeps them off)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _distinct_strings(column: pa.Array | pa.ChunkedArray) -> set[str]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.DictionaryArray):
        used = pc.unique(column.indices)
        return {str(v) for v in column.dictionary.take(used).to_pylist() if v is not None}
    return {str(v) for v in pc.unique(column).to_pylist() if v is not None}


def _as_matrix(column: pa.Array | pa.ChunkedArray, path: str) -> np.ndarray:
    """An (n, dim) float32 view of a list<float> column, with no per-row objects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    lengths = pc.list_value_length(column)
    low, high = pc.min_max(lengths).values()
    if column.null_count or low.as_py() != high.as_py():
        raise TargetError(f"target {path} holds vectors of different lengths (or null vectors)")
    values = np.asarray(pc.list_flatten(column).to_numpy(zero_copy_only=False), np.float32)
    return values.reshape(n, int(high.as_py() or 0))
