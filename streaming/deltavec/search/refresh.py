"""What the commits since an index's version changed, read from the Delta log.

``diff_commits`` turns a target's new log versions into the next ``IndexState``:
rows of files a commit removed are masked out, rows a grown deletion vector names
are masked out by position (the file is not read again), and files a commit added
are read into new blocks. A MERGE therefore costs the rows it wrote, not the table.
It builds the new state aside and changes nothing the caller holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from deltavec.search import deletions, delta_files
from deltavec.search.state import Block, FileRows, IndexState, block_rows

if TYPE_CHECKING:
    from deltalake import DeltaTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefreshReport:
    """What one ``refresh`` read and changed.

    Attributes:
        from_version: the table version the index held before.
        to_version: the version it holds now.
        files_added: data files read (a MERGE's rewritten files count here).
        files_removed: data files whose rows were masked out.
        files_masked: files kept whose deletion vector grew: their newly deleted
            rows were masked out by position, without reading the file.
        rows_added: rows read from the added files.
        rows_removed: rows masked out because their file was removed.
        rows_masked: rows masked out by deletion vectors (of kept or added files).
        full_reload: True when the path held a new table and was read whole.
        seconds: wall time of the refresh.
    """

    from_version: int
    to_version: int
    files_added: int = 0
    files_removed: int = 0
    files_masked: int = 0
    rows_added: int = 0
    rows_removed: int = 0
    rows_masked: int = 0
    full_reload: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class Diff:
    """The next state, what it took, and the blocks of rows read from added files."""

    state: IndexState
    report: RefreshReport
    added: tuple[Block, ...]


def diff_commits(
    table: DeltaTable,
    data: Any,
    state: IndexState,
    after: int,
    *,
    storage_options: dict[str, str] | None,
    read: Callable[[Any], FileRows],
) -> Diff | None:
    """The state at version ``after``, from ``state`` and the commits between them.

    Args:
        table: the target, already loaded at ``after``.
        data: the target's files at ``after`` (``delta_files.dataset``).
        state: what the index holds now.
        after: the version to move to.
        storage_options: for reading the log on cloud storage.
        read: reads a subset of files into rows (checking their model).

    Returns:
        The new state, or None when the commits may bring deleted rows back (a
        RESTORE, a deletion vector dropped): masks only ever hide rows, so the
        caller must read the table again whole.
    """
    path = str(table.table_uri)
    fragments = {fragment.path: fragment for fragment in data.get_fragments()}
    removed = [p for p in state.file_ids if p not in fragments]
    added = [f for p, f in fragments.items() if p not in state.file_ids]
    to_mask: frozenset[str] = frozenset()
    if deletions.enabled(table):
        changes = deletions.changes_since(table, storage_options, state.version, after)
        if changes is None or changes.restored or changes.without_vector & state.masked_files:
            return None
        to_mask = changes.with_vector & fragments.keys()
    # An OPTIMIZE adds the whole table again: read it in blocks, as a first load.
    size = block_rows(int(state.live.sum()) + sum(f.count_rows() for f in added))
    loaded = read_blocks(delta_files.subset(data, added), read, size)
    deleted = deletions.deleted_rows(table, to_mask) if to_mask else {}

    # Nothing below depends on the table's content: it cannot fail half way.
    file_ids = {p: i for p, i in state.file_ids.items() if p in fragments}
    file_ids.update(loaded.file_ids)
    live = state.live.copy()
    removed_ids = np.array([state.file_ids[p] for p in removed], dtype=np.int32)
    if removed_ids.size:
        live[np.isin(np.concatenate([b.files for b in state.blocks]), removed_ids)] = False
    rows_removed = int(state.live.sum() - live.sum())
    blocks = state.blocks + loaded.blocks
    live = np.concatenate([live, np.ones(loaded.rows, dtype=bool)])
    rows_masked = deletions.mask(live, blocks, file_ids, deleted)
    files_masked = len(to_mask & state.file_ids.keys())
    masked_files = (state.masked_files & fragments.keys()) | frozenset(deleted)
    new = IndexState(after, blocks, live, int(live.size - live.sum()), file_ids, masked_files)
    log.info(
        "refreshed %s from version %d to %d: +%d files (%d rows), -%d files (%d rows), "
        "%d deletion vectors grew (%d rows)",
        path,
        state.version,
        after,
        len(added),
        loaded.rows,
        len(removed),
        rows_removed,
        files_masked,
        rows_masked,
    )
    report = RefreshReport(
        state.version,
        after,
        files_added=len(added),
        files_removed=len(removed),
        files_masked=files_masked,
        rows_added=loaded.rows,
        rows_removed=rows_removed,
        rows_masked=rows_masked,
    )
    return Diff(state=new, report=report, added=loaded.blocks)


@dataclass(frozen=True)
class Loaded:
    """Files read in blocks: the blocks (none empty), the ids given to the files, and rows."""

    blocks: tuple[Block, ...]
    file_ids: dict[str, int]
    rows: int


def read_blocks(data: Any, read: Callable[[Any], FileRows], rows: int) -> Loaded:
    """``data``'s files read into blocks of whole files, at least ``rows`` rows each
    (the last may hold fewer): no block is cut from a larger one, so the rows are
    never held twice."""
    blocks: list[Block] = []
    file_ids: dict[str, int] = {}
    for group in delta_files.in_groups(data, rows):
        loaded = read(group)
        file_ids.update(loaded.file_ids)
        if len(loaded.block):
            blocks.append(loaded.block)
    return Loaded(tuple(blocks), file_ids, sum(len(b) for b in blocks))
