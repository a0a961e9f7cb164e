"""A target's data files read with delta-rs into float32 blocks, each row tagged with its file.

The file tag is what makes refresh incremental: a later commit that removes a
file names it, and its rows can be masked out without reading anything. Each
row also keeps its position in its file, which is what a deletion vector names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from deltavec.columns import EMBEDDING, MODEL, TEXT_HASH
from deltavec.errors import TargetError
from deltavec.search import deletions
from deltavec.search.state import Block, FileRows

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as pads
    from deltalake import DeltaTable

# A text hash is a SHA-256 hex digest; ASCII byte -> its hex value (16: not a hex digit).
_HEX_DIGITS = 64
_HEX_VALUES = np.full(256, 16, np.uint8)
_HEX_VALUES[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX_VALUES[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)

# pyarrow's virtual column naming the file each scanned row came from.
_FILENAME = "__filename"
# Rows per record batch while reading: bounds the Arrow memory next to the matrix.
_BATCH_ROWS = 65_536


def open_table(
    path: str, storage_options: dict[str, str] | None, version: int | None
) -> DeltaTable:
    """The Delta table at ``path``, as a one-line ``TargetError`` when it is not one."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    try:
        return DeltaTable(path, version=version, storage_options=storage_options)
    except TableNotFoundError:
        raise TargetError(f"target {path} is not a Delta table (no _delta_log there)") from None
    except DeltaError as exc:
        raise TargetError(f"target {path} cannot be opened: {first_line(exc)}") from None


def dataset(
    table: DeltaTable, path: str, storage_options: dict[str, str] | None
) -> pads.FileSystemDataset:
    """The table's current files as a pyarrow dataset (one fragment per data file).

    Built from the add actions rather than ``to_pyarrow_dataset``, which refuses
    tables with deletion vectors; the index applies those itself.

    Raises:
        TargetError: the table uses a reader feature this path cannot read, or
            is partitioned (deltavec never partitions a target).
    """
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs
    from deltalake.fs import DeltaStorageHandler

    check_readable(table, path)
    if table.metadata().partition_columns:
        raise TargetError(
            f"target {path} is partitioned by {', '.join(table.metadata().partition_columns)}; "
            "deltavec writes and reads unpartitioned targets only"
        )
    actions = pa.table(table.get_add_actions(flatten=False))
    files = actions.column("path").to_pylist()
    sizes = dict(zip(files, actions.column("size_bytes").to_pylist(), strict=True))
    # Known sizes spare one HEAD request per file on object stores.
    handler = DeltaStorageHandler(table.table_uri, storage_options, sizes)
    filesystem = pafs.PyFileSystem(handler)
    file_format = pads.ParquetFileFormat(
        # Parquet stores the model column dictionary-encoded: reading it so
        # makes the one-model check a look at a few dictionary entries.
        read_options=pads.ParquetReadOptions(dictionary_columns={MODEL}),
        default_fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=True),
    )
    schema = pa.schema(table.schema().to_arrow())
    model = schema.get_field_index(MODEL)
    if model >= 0:
        field = schema.field(model)
        schema = schema.set(model, field.with_type(pa.dictionary(pa.int32(), field.type)))
    fragments = [file_format.make_fragment(f, filesystem=filesystem) for f in files]
    return pads.FileSystemDataset(fragments, schema, file_format, filesystem)


def check_readable(table: DeltaTable, path: str) -> None:
    """Raise a one-line ``TargetError`` if the table needs a reader feature this path lacks."""
    from deltalake.table import MAX_SUPPORTED_READER_VERSION, SUPPORTED_READER_FEATURES

    protocol = table.protocol()
    readable = {*SUPPORTED_READER_FEATURES, deletions.FEATURE}
    features = set(protocol.reader_features or []) - readable
    # Reader version 2 tables name no features; column mapping is what version 2 means.
    if table.metadata().configuration.get("delta.columnMapping.mode", "none") != "none":
        features.add("columnMapping")
    if features or protocol.min_reader_version > MAX_SUPPORTED_READER_VERSION:
        named = ", ".join(sorted(features)) or f"reader version {protocol.min_reader_version}"
        raise TargetError(
            f"target {path} uses the Delta table feature(s) {named}, which this reader "
            "cannot read; write the target without them (deltavec never turns them on)"
        )


def subset(data: pads.FileSystemDataset, fragments: list[pads.Fragment]) -> pads.Dataset:
    """The same dataset restricted to some of its files."""
    import pyarrow.dataset as pads

    return pads.FileSystemDataset(fragments, data.schema, data.format, data.filesystem)


def in_groups(data: pads.FileSystemDataset, rows: int) -> list[pads.Dataset]:
    """``data``'s files in groups of at least ``rows`` rows (the last may hold fewer),
    in order, each file in one group; the row counts are the files' footers'."""
    groups: list[pads.Dataset] = []
    fragments: list[pads.Fragment] = []
    held = 0
    for fragment in data.get_fragments():
        fragments.append(fragment)
        held += fragment.count_rows()
        if held >= rows:
            groups.append(subset(data, fragments))
            fragments, held = [], 0
    if fragments or not groups:
        groups.append(subset(data, fragments))
    return groups


def read_files(
    data: pads.Dataset, *, keys: list[str], dim: int, path: str, first_file_id: int
) -> FileRows:
    """Read keys, vectors and models of every file in ``data`` into one block.

    Args:
        data: the files to read.
        keys: the key columns.
        dim: the vector length the table records (0 if it does not).
        path: the table, for messages.
        first_file_id: the id given to the first new file; the rest follow.

    Raises:
        TargetError: vectors of different lengths, or null vectors.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    # Preallocated from the row counts in the file footers, so the table is
    # never held twice (as Arrow lists and as the matrix).
    rows = data.count_rows()
    matrix = np.empty((rows, dim), dtype=np.float32) if dim else None
    key_batches: list[pa.RecordBatch] = []
    file_parts: list[np.ndarray] = []
    position_parts: list[np.ndarray] = []
    # The scanner yields each file's rows in order, so counting them gives positions.
    next_row: dict[int, int] = {}
    file_ids: dict[str, int] = {}
    models: set[str] = set()
    # The job's targets record the hash of each row's text; other tables may not.
    hashed = TEXT_HASH in data.schema.names
    text_parts: list[np.ndarray] = []
    filled = 0
    columns = [*keys, EMBEDDING, MODEL, *([TEXT_HASH] if hashed else []), _FILENAME]
    scanner = data.scanner(columns=columns, batch_size=_BATCH_ROWS)
    for batch in scanner.to_batches():
        n = batch.num_rows
        if n == 0:
            continue
        vectors = _as_matrix(batch.column(EMBEDDING), path)
        if matrix is None:
            matrix = np.empty((max(rows, n), vectors.shape[1]), dtype=np.float32)
        if vectors.shape[1] != matrix.shape[1]:
            raise TargetError(
                f"target {path} holds {vectors.shape[1]}-dimensional vectors next to "
                f"{matrix.shape[1]}-dimensional ones"
            )
        if filled + n > matrix.shape[0]:  # a file grew since the count: rare, so grow plainly
            matrix = np.concatenate([matrix, np.empty((n, matrix.shape[1]), np.float32)])
        matrix[filled : filled + n] = vectors
        filled += n
        models.update(_distinct_strings(batch.column(MODEL)))
        key_batches.append(batch.select(keys))
        names = pc.dictionary_encode(batch.column(_FILENAME))
        ids = np.array(
            [
                file_ids.setdefault(name, first_file_id + len(file_ids))
                for name in names.dictionary.to_pylist()
            ],
            dtype=np.int32,
        )
        row_files = ids[names.indices.to_numpy(zero_copy_only=False)]
        file_parts.append(row_files)
        position_parts.append(_positions(row_files, next_row))
        fingerprints = _fingerprints(batch.column(TEXT_HASH)) if hashed else None
        if fingerprints is None:
            hashed = False  # one row without a digest: the block has no fingerprints
        else:
            text_parts.append(fingerprints)
    # Files without rows count too, so that a later commit removing them is understood.
    for fragment in data.get_fragments():
        file_ids.setdefault(fragment.path, first_file_id + len(file_ids))
    if matrix is None:
        matrix = np.zeros((0, dim), dtype=np.float32)
    key_schema = pa.schema([data.schema.field(k) for k in keys])
    block = Block(
        matrix=matrix[:filled] if filled < matrix.shape[0] else matrix,
        keys=pa.Table.from_batches(key_batches, schema=key_schema),
        files=np.concatenate(file_parts) if file_parts else np.zeros(0, np.int32),
        positions=np.concatenate(position_parts) if position_parts else np.zeros(0, np.int64),
        texts=np.concatenate(text_parts or [np.zeros(0, np.uint64)]) if hashed else None,
    )
    return FileRows(block, file_ids, models)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _positions(row_files: np.ndarray, next_row: dict[int, int]) -> np.ndarray:
    """Each row's number within its file, continuing the counts in ``next_row``."""
    positions = np.empty(len(row_files), dtype=np.int64)
    for file_id in np.unique(row_files):  # a batch rarely spans more than one file
        rows = np.flatnonzero(row_files == file_id)
        start = next_row.get(int(file_id), 0)
        positions[rows] = np.arange(start, start + rows.size)
        next_row[int(file_id)] = start + rows.size
    return positions


def _fingerprints(column: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """The first 16 hex digits of each SHA-256 hex digest, as uint64; None if any is not one.

    Read straight from the Arrow buffers: no Python string per row.
    """
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count or not (
        pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    ):
        return None
    n = len(column)
    if n == 0:
        return np.zeros(0, np.uint64)
    offset_type = np.int64 if pa.types.is_large_string(column.type) else np.int32
    _, offsets, data = column.buffers()
    ends = np.frombuffer(offsets, offset_type)[column.offset : column.offset + n + 1]
    if not (np.diff(ends) == _HEX_DIGITS).all():
        return None
    text = np.frombuffer(data, np.uint8)[ends[0] : ends[-1]].reshape(n, _HEX_DIGITS)[:, :16]
    nibbles = _HEX_VALUES[text]
    if (nibbles > 15).any():
        return None
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    fingerprints: np.ndarray = (nibbles.astype(np.uint64) << shifts).sum(axis=1, dtype=np.uint64)
    return fingerprints


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
