"""How far the stream is behind its source, from the checkpoint and the source's Delta log.

Delta's streaming progress reports no ``latestOffset``, so the lag is computed
here: the newest source version comes from the source's log, the newest version
the stream finished from the checkpoint's last committed offset, and the age of
the oldest commit still waiting from that commit's own log entry.

Commits that a stream never reads (OPTIMIZE, property changes, and in append
mode the update and delete commits it skips) do not count as waiting: without
this, one OPTIMIZE after the last append would show a lag that never clears.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deltavec.checkpointing.checkpoint import Checkpoint
    from deltavec.runtime.delta_log import DeltaLog

# Commit files read per measurement at most: a stream thousands of commits behind
# is reported as behind from the first unread one, without reading them all.
SCAN_LIMIT = 1000


@dataclass(frozen=True)
class SourceLag:
    """The stream's position against its source.

    Attributes:
        latest_version: the source's newest version (-1 for a table without commits).
        latest_commit_time: when it was committed (epoch seconds).
        processed_version: the newest source version whose rows are all written;
            -1 when none is yet, None when the stream has committed no batch.
        last_batch_id: the newest micro-batch Spark committed.
        versions: ``latest_version - processed_version`` while rows wait; 0 when
            every waiting commit is one the stream does not read.
        seconds: age of the oldest commit whose rows wait (0 when none wait;
            None when log clean-up removed that commit's entry).
        oldest_pending_version: that commit's version, if any.
    """

    latest_version: int
    latest_commit_time: float | None
    processed_version: int | None
    last_batch_id: int | None
    versions: int
    seconds: float | None
    oldest_pending_version: int | None

    @property
    def caught_up(self) -> bool:
        return self.oldest_pending_version is None


def measure_lag(
    source: DeltaLog, checkpoint: Checkpoint | None, *, mode: str, now: float
) -> SourceLag:
    """The lag of the stream whose checkpoint is ``checkpoint`` behind ``source``.

    Args:
        source: the source table's log.
        checkpoint: the stream's checkpoint; None (or one without commits) means
            the stream has not finished a batch yet.
        mode: "append" or "changes": which commits the stream reads.
        now: the current time, in epoch seconds.
    """
    latest, latest_time = source.latest()
    done = checkpoint.processed_offset() if checkpoint is not None else None
    batch_id, processed = (done[0], done[1].processed_through) if done else (None, None)
    start = (processed if processed is not None else -1) + 1
    pending = _first_pending(source, start, latest, mode)
    seconds: float | None
    if pending is None:
        versions, seconds = 0, 0.0
    else:
        versions = latest - (processed if processed is not None else -1)
        commit = source.commit(pending)
        seconds = max(0.0, now - commit.timestamp) if commit and commit.timestamp else None
    if processed is not None:
        source.forget_through(processed)
    return SourceLag(
        latest_version=latest,
        latest_commit_time=latest_time,
        processed_version=processed,
        last_batch_id=batch_id,
        versions=versions,
        seconds=seconds,
        oldest_pending_version=pending,
    )


def _first_pending(source: DeltaLog, start: int, latest: int, mode: str) -> int | None:
    for version in range(start, min(latest, start + SCAN_LIMIT - 1) + 1):
        commit = source.commit(version)
        # A commit whose entry is gone cannot be judged: count it as waiting.
        if commit is None or commit.feeds(mode):
            return version
    return start if latest - start + 1 > SCAN_LIMIT else None


def backlog_rows(
    source: DeltaLog,
    checkpoint: Checkpoint | None,
    *,
    mode: str,
    table_rows: Callable[[], int | None],
    limit: int = 10 * SCAN_LIMIT,
) -> int | None:
    """About how many source rows the stream has still to read; None if unknown.

    A stream that has not finished its initial snapshot reads the whole table
    (``table_rows``); after that, the rows added by the commits it reads. The
    figure is for a progress bar: it counts the rows that commits add, not the
    Change Data Feed's delete records.

    Args:
        source: the source table's log.
        checkpoint: the stream's checkpoint, if any.
        mode: "append" or "changes".
        table_rows: gives the source's live row count (``delta_log.row_count``);
            called only when the stream has the initial snapshot still to read.
        limit: commit files read at most before giving up (None is returned).
    """
    latest, _ = source.latest()
    done = checkpoint.processed_offset() if checkpoint is not None else None
    if done is None or (done[1].is_starting_version and done[1].index >= 0):
        return table_rows()
    processed = done[1].processed_through
    if latest - processed > limit:
        return None
    total = 0
    for version in range(processed + 1, latest + 1):
        commit = source.commit(version)
        if commit is None or commit.added_rows is None:
            return None
        if commit.feeds(mode):
            total += commit.added_rows
    return total
