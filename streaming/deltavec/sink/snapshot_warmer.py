"""Preparing the target's newest version for the next micro-batch, while the job waits.

Each batch starts by reading the target rows of its keys (``TargetWriter.existing``).
Planning that read on a version Delta has not read yet costs a state reconstruction:
Spark jobs over the log's checkpoint and commits, then parsing every file's key
statistics for data skipping. Every commit of the batch makes such a new version,
so without help each batch pays this (1-2 s on two cores at a 100,000-row target,
``benchmarks/freshness.py``) before it can embed anything.

After a batch writes, ``SnapshotWarmer`` runs, in a background thread, a read of
the newest target with the same kind of key predicate: Delta builds and caches that
version's state, and the next batch, which reads the same version (unless something
else committed in between), finds it ready. The warm-up only reads; a failure or a
newer commit only means the next batch plans its read itself, as it would without it.

This module imports no torch.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from deltavec.config import TableRef
from deltavec.runtime import faults, tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from deltavec.sink.key_filter import KeyFilter

log = logging.getLogger(__name__)


class SnapshotWarmer:
    """Warms the target's newest version in the background, one warm-up at a time.

    Args:
        target: the target table.
        key: the key column the batch's read filters on (the first key column).
    """

    def __init__(self, *, target: TableRef, key: str) -> None:
        self.target = target
        self.key = key
        # One long-lived thread, not one per batch: in PySpark's pinned thread mode
        # each Python thread that calls Spark gets a JVM thread and a gateway
        # connection of its own; a reused thread keeps that at one for the job's life.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltavec-warm")
        self._pending: Future[None] | None = None
        self._closed = False
        # The target version the last finished warm-up read; None before one finished.
        self.warmed_version: int | None = None

    def warm(self, spark: SparkSession, key_filter: KeyFilter | None) -> bool:
        """Start a warm-up unless one is still running; True when one was started.

        ``key_filter`` (the batch just written) makes the read one planned with data
        skipping, as the next batch's read is; it stops at the first row.
        Without one there is nothing cheap to read, and nothing is started.
        """
        if key_filter is None or self.busy or self._closed:
            return False
        self._pending = self._worker.submit(self._run, spark, key_filter)
        return True

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def wait(self, timeout: float | None = None) -> None:
        """Return once no warm-up runs (or after ``timeout`` seconds)."""
        if self._pending is not None:
            wait([self._pending], timeout)

    def close(self, timeout: float | None = None) -> None:
        """Wait for a running warm-up (at most ``timeout`` seconds), then start no more."""
        self.wait(timeout)
        self._closed = True
        self._worker.shutdown(wait=False)

    def _run(self, spark: SparkSession, key_filter: KeyFilter) -> None:
        from pyspark.sql import functions as F

        start = time.perf_counter()
        try:
            faults.maybe_fail("warm_snapshot")
            version = tables.latest_version(spark, self.target)
            (
                tables.read(spark, self.target, versionAsOf=str(version))
                .where(key_filter.predicate(F.col(self.key)))
                .select(self.key)
                # Planning is the point: one row bounds the read, whatever the batch held.
                .limit(1)
                .collect()
            )
        except Exception as exc:
            # Only the next batch's planning time is at stake, never a row: that
            # batch plans its read itself. The job may also be stopping under us.
            log.warning(
                "preparing %s for the next batch failed (%s); the next batch will read it "
                "without this preparation",
                self.target.name,
                type(exc).__name__,
            )
            log.debug("snapshot warm-up failure", exc_info=True)
            return
        self.warmed_version = version
        log.debug(
            "warmed %s version %d in %.2fs", self.target.name, version, time.perf_counter() - start
        )
