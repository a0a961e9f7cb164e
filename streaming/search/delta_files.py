"""A target's data files read with delta-rs into float32 blocks, each row tagged with its file.

The file tag is what makes refresh incremental: a later commit that removes a
file names it, and its rows can be masked out without reading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from streaming.columns import EMBEDDING, MODEL
from streaming.errors import TargetError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.dataset as pads
    from deltalake import DeltaTable

# pyarrow's virtual column naming the file each scanned row came from.
_FILENAME = "__filename"
# Rows per record batch while reading: bounds the Arrow memory next to the matrix.
_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class Block:
    """Rows read together: a contiguous (n, dim) matrix, their keys and file ids, in one order."""

    matrix: np.ndarray
    keys: pa.Table
    files: np.ndarray  # int32 file id per row

    def __len__(self) -> int:
        return int(self.matrix.shape[0])


@dataclass
class FileRows:
    """What ``read_files`` returns: the rows, the ids given to their files, the models seen."""

    block: Block
    file_ids: dict[str, int] = field(default_factory=dict)
    models: set[str] = field(default_factory=set)


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


def dataset(table: DeltaTable, path: str) -> pads.FileSystemDataset:
    """The table's current files as a pyarrow dataset (one fragment per data file).

    Raises:
        TargetError: the table uses a reader feature this path cannot read.
    """
    import pyarrow.dataset as pads
    from deltalake.exceptions import DeltaProtocolError

    try:
        return table.to_pyarrow_dataset(
            # Parquet stores the model column dictionary-encoded: reading it so
            # makes the one-model check a look at a few dictionary entries.
            parquet_read_options=pads.ParquetReadOptions(dictionary_columns={MODEL}),
        )
    except DeltaProtocolError:
        raise TargetError(unreadable_features(path, table)) from None


def subset(data: pads.FileSystemDataset, fragments: list[pads.Fragment]) -> pads.Dataset:
    """The same dataset restricted to some of its files."""
    import pyarrow.dataset as pads

    return pads.FileSystemDataset(fragments, data.schema, data.format, data.filesystem)


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
    file_ids: dict[str, int] = {}
    models: set[str] = set()
    filled = 0
    scanner = data.scanner(columns=[*keys, EMBEDDING, MODEL, _FILENAME], batch_size=_BATCH_ROWS)
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
        file_parts.append(ids[names.indices.to_numpy(zero_copy_only=False)])
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
    )
    return FileRows(block, file_ids, models)


def unreadable_features(path: str, table: DeltaTable) -> str:
    from deltalake.table import SUPPORTED_READER_FEATURES

    protocol = table.protocol()
    features = sorted(set(protocol.reader_features or []) - set(SUPPORTED_READER_FEATURES))
    named = ", ".join(features) or f"reader version {protocol.min_reader_version}"
    return (
        f"target {path} uses the Delta table feature(s) {named}, which the deltalake "
        "reader cannot read; write the target without them (deltavec keeps them off)"
    )


def first_line(exc: BaseException) -> str:
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
