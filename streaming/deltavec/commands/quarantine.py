"""``deltavec quarantine list|retry``: look at rows that could not be embedded, and re-queue them.

The quarantine table holds one row per source key that currently fails (plus one
row per keyless source row), with the reason, a message, and the first 1,000
characters of the offending text. A key leaves the quarantine as soon as a later
version of it embeds, or when it is deleted from the source.

``retry`` re-reads the current source rows of quarantined keys and sends them
through the same sink as the stream (own Delta txn app id, so it never collides
with the stream's idempotency record): rows whose cause was fixed (in the data,
the model or the config) land in the target and leave the quarantine; the others
stay with an updated reason.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltavec.commands.job import Job
from deltavec.runtime import tables
from deltavec.sink import ownership
from deltavec.source import stream
from deltavec.source.changes import NULL_KEY

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryReport:
    retried: int
    embedded: int
    still_quarantined: int
    gone_from_source: int
    keyless: int


def list_rows(job: Job, *, reason: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Quarantined rows, newest first."""
    from pyspark.sql import functions as F

    frame = _quarantine(job, reason)
    rows = frame.orderBy(F.col("quarantined_at").desc()).limit(limit).collect()
    return [row.asDict() for row in rows]


def counts_by_reason(job: Job) -> dict[str, int]:
    rows = _quarantine(job, None).groupBy("reason").count().collect()
    return {row["reason"]: int(row["count"]) for row in rows}


def retry(job: Job, *, reason: str | None = None) -> RetryReport:
    """Send the current source rows of quarantined keys through the sink again."""

    cfg = job.config
    # The stream's own lease, and the checkpoint that owns the target: a retry
    # beside a running job could append a key the stream appends too (both see it
    # missing from the target), leaving it twice. Taken first, so a retry beside a
    # running job is refused before Spark starts.
    job.take_lease()
    job.begin_loading_model()
    try:
        spark = job.spark
        ownership.check(spark, cfg.target, cfg.checkpoint.location)
        schema = stream.check_source(spark, cfg.source)
        key_type = ", ".join(
            f"`{f.name}` {f.dataType.simpleString()}"
            for f in stream.key_fields(schema, cfg.source.key)
        )
        job.load_model()
        return _retry(job, reason=reason, key_type=key_type)
    finally:
        job.close()


def _retry(job: Job, *, reason: str | None, key_type: str) -> RetryReport:
    from pyspark.sql import functions as F

    cfg = job.config
    spark = job.spark
    quarantined = _quarantine(job, reason)
    keyless = quarantined.where(F.col("reason") == NULL_KEY).count()
    keyed = (
        quarantined.where(F.col("reason") != NULL_KEY)
        .select("key", F.from_json("key", key_type).alias("_k"))
        .select("key", "_k.*")
        .dropDuplicates(["key"])
    )
    version = tables.latest_version(spark, cfg.source)
    current = tables.read(spark, cfg.source, versionAsOf=str(version))
    rows = current.join(keyed.drop("key"), on=list(cfg.source.key), how="left_semi").persist()
    gone = keyed.join(current, on=list(cfg.source.key), how="left_anti").select("key")
    try:
        retried = rows.count()
        gone_count = _forget(job, gone)
        sink = job.make_sink(mode="append", app_id=f"deltavec-retry-{uuid.uuid4()}")
        report = sink.process(rows, batch_id=0, source_version=version) if retried else None
    finally:
        rows.unpersist()
    embedded = report.embedded if report else 0
    result = RetryReport(
        retried=retried,
        embedded=embedded,
        still_quarantined=report.quarantined_total if report else 0,
        gone_from_source=gone_count,
        keyless=keyless,
    )
    log.info("quarantine retry: %s", result)
    return result


def _quarantine(job: Job, reason: str | None) -> DataFrame:
    from pyspark.sql import functions as F

    frame = tables.read(job.spark, job.config.target.quarantine)
    return frame.where(F.col("reason") == reason) if reason else frame


def _forget(job: Job, gone: DataFrame) -> int:
    """Delete quarantine rows whose key no longer exists in the source."""
    count = gone.count()
    if count:
        (
            tables.delta_table(job.spark, job.config.target.quarantine)
            .alias("q")
            .merge(gone.alias("g"), "q.key = g.key")
            .whenMatchedDelete()
            .execute()
        )
    return count
