"""Questions answered from a Delta table's own log, without reading its data.

Used for what Spark's Delta source does not report: which commits an append-mode
stream skipped because they update or delete rows.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from streaming import tables
from streaming.config import TableRef

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# A batch normally covers a few commits; a stream that fell far behind is told
# about the first ones only, rather than paying for reading thousands of files.
MAX_COMMITS_READ = 500


def table_location(spark: SparkSession, ref: TableRef) -> str:
    """Where the table's files are: its path, or the catalog's location for it."""
    return ref.path or str(tables.detail(spark, ref)["location"])


def change_commits(spark: SparkSession, ref: TableRef, *, after: int, through: int) -> list[int]:
    """Versions in ``(after, through]`` whose commit removes rows (UPDATE, DELETE, MERGE...).

    That is Delta's own test for a commit ``skipChangeCommits`` skips: it holds a
    ``remove`` action with ``dataChange`` true. Commits whose log file is gone
    (log retention) are not reported.
    """
    location = table_location(spark, ref).rstrip("/")
    fs, _ = tables.hadoop_fs(spark, location)
    jvm: Any = spark.sparkContext._jvm
    found = []
    for version in range(after + 1, min(through, after + MAX_COMMITS_READ) + 1):
        path = jvm.org.apache.hadoop.fs.Path(f"{location}/_delta_log/{version:020d}.json")
        if not fs.exists(path):
            continue
        stream = fs.open(path)
        try:
            text = str(jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
        finally:
            stream.close()
        if any(_removes_data(line) for line in text.splitlines()):
            found.append(version)
    return found


def _removes_data(line: str) -> bool:
    if '"remove"' not in line:
        return False
    try:
        action = json.loads(line)
    except ValueError:
        return False
    remove = action.get("remove")
    return isinstance(remove, dict) and bool(remove.get("dataChange", True))
