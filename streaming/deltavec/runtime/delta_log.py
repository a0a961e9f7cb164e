"""What a Delta table's transaction log says, read without scanning the table's data.

The metrics poller asks these questions every few seconds, and ``deltavec status``
on demand, of tables that may hold billions of rows; every answer therefore comes
from the log alone: the newest commit from ``DESCRIBE HISTORY`` (which lists the
log from its last checkpoint), one commit's actions from its
``_delta_log/<version>.json`` file, and a row count from the ``numRecords``
statistics of the live files (Delta answers ``COUNT(*)`` from them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltavec.config import TableRef
from deltavec.runtime import tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Commit:
    """The parts of one commit that decide whether, and how much, a stream reads from it.

    Attributes:
        version: the commit's version.
        timestamp: when it was committed, in seconds since the epoch (the in-commit
            timestamp where the table records one, else the writer's clock).
        added_rows: rows in its data-changing ``add`` actions; None when a file
            carries no ``numRecords`` statistic.
        data_adds: ``add`` actions that change data (not OPTIMIZE's rewrites).
        data_removes: ``remove`` actions that change data (updates, deletes, merges).
        cdc_files: Change Data Feed files it wrote.
    """

    version: int
    timestamp: float | None
    added_rows: int | None
    data_adds: int
    data_removes: int
    cdc_files: int

    def feeds(self, mode: str) -> bool:
        """Whether a deltavec stream in ``mode`` ("append" or "changes") reads rows from it."""
        if mode == "changes":
            return bool(self.data_adds or self.data_removes or self.cdc_files)
        # Append mode streams with skipChangeCommits: a commit that removes rows
        # (an update, delete or merge) is skipped whole.
        return self.data_adds > 0 and self.data_removes == 0


def parse_commit(version: int, text: str, modified: float | None = None) -> Commit:
    """A ``Commit`` from the text of ``_delta_log/<version>.json``.

    Args:
        version: the commit's version.
        text: the file's newline-delimited JSON actions.
        modified: the file's modification time, used when the commit names no time.
    """
    timestamp: float | None = None
    added_rows: int | None = 0
    adds = removes = cdc = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        action: dict[str, Any] = json.loads(line)
        if "commitInfo" in action:
            info = action["commitInfo"] or {}
            millis = info.get("inCommitTimestamp", info.get("timestamp"))
            timestamp = float(millis) / 1000 if millis is not None else None
        elif "add" in action and action["add"].get("dataChange", True):
            adds += 1
            rows = _num_records(action["add"].get("stats"))
            added_rows = None if rows is None or added_rows is None else added_rows + rows
        elif "remove" in action and action["remove"].get("dataChange", True):
            removes += 1
        elif "cdc" in action:
            cdc += 1
    return Commit(
        version=version,
        timestamp=timestamp if timestamp is not None else modified,
        added_rows=added_rows,
        data_adds=adds,
        data_removes=removes,
        cdc_files=cdc,
    )


def _num_records(stats: str | None) -> int | None:
    if not stats:
        return None
    value = json.loads(stats).get("numRecords")
    return int(value) if value is not None else None


class DeltaLog:
    """One table's log, as the poller and ``status`` read it.

    Commit files never change once written, so parsed commits are kept (and let
    go with ``forget_through`` once the stream has passed them).
    """

    def __init__(self, spark: SparkSession, ref: TableRef) -> None:
        self.spark = spark
        self.ref = ref
        self._location: str | None = None
        self._commits: dict[int, Commit | None] = {}

    @property
    def location(self) -> str:
        """The table's storage location (a catalog table's is looked up once)."""
        if self._location is None:
            if self.ref.path:
                self._location = self.ref.path
            else:
                self._location = str(tables.detail(self.spark, self.ref)["location"])
        return self._location.rstrip("/")

    def latest(self) -> tuple[int, float | None]:
        """(version, commit time in epoch seconds) of the table's newest commit."""
        row = tables.newest_commit(self.spark, self.ref)
        if row is None:
            return -1, None
        at = row["timestamp"]
        # PySpark hands timestamps over as naive local times; .timestamp() reads them so.
        return int(row["version"]), (at.timestamp() if at is not None else None)

    def commit(self, version: int) -> Commit | None:
        """The commit at ``version``; None once log clean-up has deleted its file."""
        if version in self._commits:
            return self._commits[version]
        path = f"{self.location}/_delta_log/{version:020d}.json"
        fs, hpath = tables.hadoop_fs(self.spark, path)
        try:
            modified = float(fs.getFileStatus(hpath).getModificationTime()) / 1000
            text = tables.read_text(self.spark, path)
        except Exception as exc:
            if "FileNotFound" not in str(exc):
                raise
            text = None
        commit = parse_commit(version, text, modified) if text is not None else None
        self._commits[version] = commit
        return commit

    def forget_through(self, version: int) -> None:
        """Drop cached commits up to ``version``: a long-running job never reads them again."""
        for cached in [v for v in self._commits if v <= version]:
            del self._commits[cached]


def row_count(spark: SparkSession, ref: TableRef) -> int | None:
    """Live rows of a Delta table, from the log's ``numRecords`` statistics.

    Returns None, rather than scanning the data, when Delta cannot answer from
    the log (a file without statistics).
    """
    frame = tables.read(spark, ref).groupBy().count()
    # Delta computes the count while optimizing the plan; collect() on the same
    # DataFrame reuses that plan, so the log is read once.
    plan = frame._jdf.queryExecution().optimizedPlan()
    if plan.getClass().getSimpleName() != "LocalRelation":
        log.warning("%s has files without row statistics; not counting its rows", ref.name)
        return None
    rows = frame.collect()
    return int(rows[0][0]) if rows else 0


# A batch normally covers a few commits; a stream that fell far behind is told
# about the first ones only, rather than paying for reading thousands of files.
MAX_COMMITS_READ = 500


def change_commits(spark: SparkSession, ref: TableRef, *, after: int, through: int) -> list[int]:
    """Versions in ``(after, through]`` whose commit removes rows (UPDATE, DELETE, MERGE...).

    That is Delta's own test for a commit ``skipChangeCommits`` skips: it holds a
    ``remove`` action with ``dataChange`` true. Commits whose log file is gone
    (log retention) are not reported.
    """
    history = DeltaLog(spark, ref)
    found = []
    for version in range(after + 1, min(through, after + MAX_COMMITS_READ) + 1):
        commit = history.commit(version)
        if commit is not None and commit.data_removes > 0:
            found.append(version)
    return found


def file_name(path: str) -> str:
    """A data file's own name, decoded: the log's relative URL-encoded ``add.path`` and
    Spark's ``input_file_name()`` URI end in the same one (Delta names files by UUID)."""
    from urllib.parse import unquote

    return unquote(path.rstrip("/").rsplit("/", 1)[-1])


def add_versions(
    spark: SparkSession, ref: TableRef, names: set[str], *, newest: int
) -> tuple[dict[str, int], int]:
    """The commit that added each data file in ``names`` (``file_name``s).

    Reads commit files from ``newest`` backwards until every name is found, for at
    most ``MAX_COMMITS_READ`` commits or back to the oldest the log still holds.

    Returns:
        The version of each name found, and the oldest version read: a name not
        found was added before it.
    """
    history = DeltaLog(spark, ref)
    found: dict[str, int] = {}
    version = newest
    while version >= 0 and version > newest - MAX_COMMITS_READ and len(found) < len(names):
        path = f"{history.location}/_delta_log/{version:020d}.json"
        text = tables.read_text(spark, path)
        if text is None:
            break  # log clean-up removed this commit and every older one
        for line in text.splitlines():
            if '"add"' not in line:
                continue
            add = json.loads(line).get("add")
            if add:
                name = file_name(add["path"])
                if name in names:
                    found.setdefault(name, version)
        version -= 1
    return found, version + 1
