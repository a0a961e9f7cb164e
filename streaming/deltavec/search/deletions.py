"""Deletion vectors of a target: which rows of its files are deleted, and which files' sets changed.

With deletion vectors, an UPDATE, DELETE or MERGE rewrites no file: it commits
the same file again (a ``remove`` and an ``add`` of one path) carrying a larger
deletion vector, a bitmap of the row positions in that file that no longer
count. The index keeps every row's position in its file, so it can mask those
rows without reading the file again.

delta-rs 1.6.6 decodes the bitmaps (``DeltaTable.deletion_vectors``) but does
not say which files' vectors a commit changed: ``get_add_actions`` shows the same
row before and after. The commits' own JSON files do, so they are read here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

import numpy as np

from deltavec.errors import TargetError

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from deltavec.search.state import Block

FEATURE = "deletionVectors"


def enabled(table: DeltaTable) -> bool:
    """Whether the table's protocol lets its files carry deletion vectors."""
    return FEATURE in (table.protocol().reader_features or [])


@dataclass(frozen=True)
class LogChanges:
    """What the add actions of some commits say about deletion vectors.

    Attributes:
        with_vector: files (relative paths) last added with a deletion vector.
        without_vector: files last added without one.
        restored: a RESTORE is among the commits; it may give deleted rows back.
    """

    with_vector: frozenset[str]
    without_vector: frozenset[str]
    restored: bool


def changes_since(
    table: DeltaTable, storage_options: dict[str, str] | None, version: int, upto: int
) -> LogChanges | None:
    """Read the commits after ``version`` up to ``upto``; None if one is gone from the log.

    Log clean-up deletes commit files older than ``delta.logRetentionDuration``
    (30 days by default); an index that old is read again whole instead.

    Raises:
        TargetError: a commit file exists but cannot be read.
    """
    from deltalake.fs import DeltaStorageHandler

    handler = DeltaStorageHandler(table.table_uri, storage_options)
    last_add: dict[str, bool] = {}
    restored = False
    for commit in range(version + 1, upto + 1):
        name = f"_delta_log/{commit:020d}.json"
        try:
            text = handler.open_input_file(name).read().decode("utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TargetError(
                f"target {table.table_uri} commit {name} cannot be read: {reason}"
            ) from None
        for line in text.splitlines():
            action = json.loads(line) if line.strip() else {}
            if "add" in action:
                # The log stores paths URI-encoded; delta-rs lists them decoded.
                path = unquote(action["add"]["path"])
                last_add[path] = action["add"].get("deletionVector") is not None
            elif action.get("commitInfo", {}).get("operation") == "RESTORE":
                restored = True
    return LogChanges(
        with_vector=frozenset(p for p, has in last_add.items() if has),
        without_vector=frozenset(p for p, has in last_add.items() if not has),
        restored=restored,
    )


def deleted_rows(table: DeltaTable, paths: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Deleted row positions per file (relative path), for ``paths`` or every file with a vector.

    delta-rs has no per-file call: it decodes the vectors of all files, and only
    the selection vectors of ``paths`` are turned into positions here.

    Raises:
        TargetError: delta-rs names a file outside the table.
    """
    import pyarrow as pa

    root = table.table_uri.rstrip("/") + "/"
    wanted = None if paths is None else set(paths)
    deleted: dict[str, np.ndarray] = {}
    for raw in table.deletion_vectors():
        batch = pa.record_batch(raw)
        kept = batch.column("selection_vector")
        flags = kept.values.to_numpy(zero_copy_only=False)
        offsets = kept.offsets.to_numpy()
        for i, uri in enumerate(batch.column("filepath").to_pylist()):
            if not uri.startswith(root):
                raise TargetError(f"target {root} has a deletion vector for {uri}, outside it")
            path = unquote(uri[len(root) :])
            if wanted is None or path in wanted:
                # True keeps a row; rows past the vector's end are kept too.
                deleted[path] = np.flatnonzero(~flags[offsets[i] : offsets[i + 1]])
    return deleted


def mask(
    live: np.ndarray,
    blocks: Sequence[Block],
    file_ids: dict[str, int],
    deleted: dict[str, np.ndarray],
) -> int:
    """Set ``live`` False for the slots of deleted rows; return how many were live before."""
    known = [(file_ids[p], rows) for p, rows in deleted.items() if p in file_ids and len(rows)]
    if not known or not blocks:
        return 0
    files = np.concatenate([b.files for b in blocks])
    positions = np.concatenate([b.positions for b in blocks])
    # One int64 per (file, row) pair, so a single isin finds every deleted slot.
    candidates = np.flatnonzero(np.isin(files, [fid for fid, _ in known]))
    slot_pairs = (files[candidates].astype(np.int64) << 32) | positions[candidates]
    deleted_pairs = np.concatenate([(np.int64(fid) << 32) | rows for fid, rows in known])
    hit = candidates[np.isin(slot_pairs, deleted_pairs)]
    hit = hit[live[hit]]
    live[hit] = False
    return int(hit.size)
