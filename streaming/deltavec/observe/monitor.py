"""Feeds a running job's metrics and serves them: started and stopped with the job.

Three feeds, all on the driver:

* the sink calls ``on_batch`` with each micro-batch's ``BatchReport``;
* a ``StreamingQueryListener`` receives Spark's own events: progress (batch
  duration, committed offset), idleness, start and termination;
* a poller thread reads the source lag and the table sizes from the Delta logs
  every ``refresh_seconds``, and at once after each committed batch.

The poller runs on its own thread so that a slow object store delays a gauge,
never a micro-batch or Spark's listener bus.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deltavec.checkpointing.checkpoint import Checkpoint, delta_offset
from deltavec.config import TableRef
from deltavec.observe.lag import measure_lag
from deltavec.observe.metrics import JobMetrics, MetricsServer
from deltavec.runtime.delta_log import DeltaLog, row_count
from deltavec.sink import transactions
from deltavec.sink.batch import BatchReport, StopRequested

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
    from pyspark.sql.streaming.listener import StreamingQueryListener

log = logging.getLogger(__name__)


class Monitor:
    """One job's metrics endpoint and the feeds behind it.

    Args:
        host: address the endpoint binds to.
        port: its port (not 0: the caller skips the monitor when metrics are off).
        refresh_seconds: how often the poller reads lag and table sizes.
        source: the source table.
        target: the target table.
        quarantine: the quarantine table.
        checkpoint: the stream's checkpoint location.
        mode: "append" or "changes" (which source commits the stream reads).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        refresh_seconds: float,
        source: TableRef,
        target: TableRef,
        quarantine: TableRef,
        checkpoint: str,
        mode: str,
    ) -> None:
        self.metrics = JobMetrics()
        self.server = MetricsServer(self.metrics, host=host, port=port)
        self.refresh_seconds = refresh_seconds
        self.source = source
        self.target = target
        self.quarantine = quarantine
        self.checkpoint_location = checkpoint
        self.mode = mode
        self._spark: SparkSession | None = None
        self._checkpoint: Checkpoint | None = None
        self._source_log: DeltaLog | None = None
        self._listener: StreamingQueryListener | None = None
        self._unregister_retry: Callable[[], None] | None = None
        self._poller: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._query_id: str | None = None
        self._started = False
        self._last_progress_batch: int | None = None
        self._refresh_failed = False

    def start(self) -> None:
        """Open the endpoint; before any table is touched, so a busy port stops the job early.

        Raises:
            MetricsError: the address cannot be bound.
        """
        self.server.start()

    def watch(
        self,
        spark: SparkSession,
        *,
        model: str,
        dim: int,
        device: str,
        dtype: str,
        starts: int,
    ) -> None:
        """Attach the feeds to a prepared job, before its query starts.

        Args:
            spark: the job's session.
            model: the model identity; ``dim`` its vector size.
            device: the configured device, until the workers report theirs.
            dtype: the configured precision, likewise.
            starts: how often this checkpoint's query has been started, this time
                included (from the checkpoint's notes), so restarts survive a
                driver restart.
        """
        self._spark = spark
        self._checkpoint = Checkpoint(spark, self.checkpoint_location)
        self._source_log = DeltaLog(spark, self.source)
        self.metrics.set_model(model=model, dim=str(dim), device=device, dtype=dtype)
        if starts > 1:
            self.metrics.query_restarts.inc(starts - 1)
        self._unregister_retry = transactions.on_retry(self.metrics.count_retry)
        self._listener = _query_listener(self)
        spark.streams.addListener(self._listener)
        self._poller = threading.Thread(target=self._poll, name="deltavec-metrics", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        """Detach from Spark, stop the poller, close the endpoint."""
        self._stopping.set()
        self._wake.set()
        if self._spark is not None and self._listener is not None:
            self._spark.streams.removeListener(self._listener)
            self._listener = None
        if self._unregister_retry is not None:
            self._unregister_retry()
            self._unregister_retry = None
        if self._poller is not None:
            # A refresh in flight finishes its Delta log reads first.
            self._poller.join(timeout=60)
            self._poller = None
        self.server.stop()

    # -- feeds ------------------------------------------------------------------------

    def on_batch(self, report: BatchReport) -> None:
        """The sink's report of a written micro-batch."""
        self.metrics.observe_batch(report)

    def refresh(self) -> None:
        """Read the lag and the table sizes from the Delta logs now."""
        assert self._spark is not None and self._source_log is not None
        lag = measure_lag(self._source_log, self._checkpoint, mode=self.mode, now=time.time())
        self.metrics.observe_lag(lag)
        self.metrics.observe_rows(
            target=row_count(self._spark, self.target),
            quarantine=row_count(self._spark, self.quarantine),
        )

    def _poll(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self.refresh()
                self._refresh_failed = False
            except Exception as exc:  # noqa: BLE001 - a failed read must not end the poller
                # Once per run of failures: a store outage should not flood the log.
                if not self._refresh_failed:
                    log.warning("metrics: cannot read the Delta logs: %s", _first_line(exc))
                self._refresh_failed = True
            self._wake.wait(self.refresh_seconds)

    # -- Spark's query events (called on py4j's callback threads) ------------------------

    def _is_ours(self, query_id: str) -> bool:
        if self._query_id is None and self._checkpoint is not None:
            self._query_id = self._checkpoint.query_id()
        return query_id == self._query_id

    def query_started(self, query_id: str) -> None:
        if not self._is_ours(query_id):
            return
        if self._started:
            self.metrics.query_restarts.inc()
        self._started = True
        self.metrics.query_active.set(1)

    def query_progress(self, progress: Any) -> None:
        if not self._is_ours(str(progress.id)) or progress.batchId == self._last_progress_batch:
            return
        self._last_progress_batch = progress.batchId
        end = progress.sources[0].endOffset if progress.sources else None
        committed = delta_offset(json.loads(end)).processed_through if end else None
        millis = progress.durationMs.get("triggerExecution")
        self.metrics.observe_progress(
            seconds=millis / 1000 if millis is not None else None,
            committed_version=committed,
        )
        # The batch is now in the checkpoint: the lag has changed.
        self._wake.set()

    def query_idle(self, query_id: str) -> None:
        if self._is_ours(query_id):
            self.metrics.last_progress_time.set(time.time())

    def query_terminated(self, query_id: str, exception: str | None) -> None:
        if not self._is_ours(query_id):
            return
        self.metrics.query_active.set(0)
        if exception and StopRequested.__name__ not in exception:
            self.metrics.query_failures.inc()


def _query_listener(monitor: Monitor) -> StreamingQueryListener:
    from pyspark.sql.streaming.listener import StreamingQueryListener

    class _Listener(StreamingQueryListener):
        """Forwards Spark's events; an error here is logged, never raised into Spark."""

        def onQueryStarted(self, event: Any) -> None:
            _guard(monitor.query_started, str(event.id))

        def onQueryProgress(self, event: Any) -> None:
            _guard(monitor.query_progress, event.progress)

        def onQueryIdle(self, event: Any) -> None:
            _guard(monitor.query_idle, str(event.id))

        def onQueryTerminated(self, event: Any) -> None:
            _guard(monitor.query_terminated, str(event.id), event.exception)

    return _Listener()


def _guard(handler: Callable[..., None], *args: Any) -> None:
    try:
        handler(*args)
    except Exception:
        log.warning("metrics: a query event could not be recorded", exc_info=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
