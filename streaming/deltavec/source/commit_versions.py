"""Which source commit each row of an append-mode micro-batch came from.

A plain Delta stream hands over rows without their commit, and a micro-batch can
read several commits (all of the starting snapshot, or up to
``max_files_per_trigger`` files of later ones). Stamping every row with the
batch's newest version would make a key appended by two of those commits look
like a duplicate within one commit, settled by text hash. Each row's file says
it: the log's ``add`` action for that file names the commit, and the later
commit wins.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from deltavec.config import TableRef
from deltavec.runtime import delta_log

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

COMMIT_VERSION = "_commit_version"
_FILE = "_deltavec_file"


def with_commit_versions(
    spark: SparkSession, batch: DataFrame, source: TableRef, *, newest: int
) -> DataFrame:
    """``batch`` with ``_commit_version``: the source commit that added each row's file.

    Args:
        batch: the micro-batch as Spark handed it over (still a scan of source files).
        source: the source table.
        newest: the newest source version the batch read.

    A file whose commit the log no longer holds (log clean-up) was added before
    every commit it does hold; its rows get the version just before the oldest
    one read, older than any row whose commit is known.
    """
    from pyspark.sql import functions as F

    # The file name must be taken on the scan itself, before any other operator.
    named = batch.withColumn(_FILE, F.input_file_name())
    # One row per file: a batch holds at most max_files_per_trigger files (or, in
    # the starting snapshot, the files of one trigger's worth of the table).
    paths = [r[0] for r in named.select(_FILE).distinct().collect()]
    names = {delta_log.file_name(p) for p in paths if p}
    found, oldest_read = delta_log.add_versions(spark, source, names, newest=newest)
    unknown = len(names) - len(found)
    if unknown:
        log.warning(
            "%d source file(s) of this batch were added by commits the log no longer "
            "holds; their rows count as older than version %d",
            unknown,
            oldest_read,
        )
    fallback = oldest_read - 1
    versions = [(p, found.get(delta_log.file_name(p), fallback)) for p in paths if p]
    if not versions:
        return named.drop(_FILE).withColumn(COMMIT_VERSION, F.lit(newest).cast("long"))
    table = spark.createDataFrame(versions, f"{_FILE} string, {COMMIT_VERSION} long")
    return named.join(F.broadcast(table), on=_FILE, how="left").drop(_FILE)
