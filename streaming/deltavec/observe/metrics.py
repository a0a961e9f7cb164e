"""The job's Prometheus metrics and the HTTP endpoint that serves them from the driver.

Every number is fed on the driver: the ``foreachBatch`` sink reports what each
micro-batch wrote (its ``BatchReport``, including the token counts the Python
workers send back with the vectors), Spark's ``StreamingQueryListener`` reports
the query's own progress, and a poller reads the lag and the table sizes from
the Delta logs (``deltavec.observe.monitor`` wires the three). Nothing is collected from
executors, so the same endpoint works in local mode and on a cluster.

Names follow Prometheus conventions: a ``deltavec_`` prefix, base units
(``_seconds``, ``_bytes``), ``_total`` for counters. Labels carry only bounded,
non-secret values (quarantine reasons, stage names, conflict names, the model).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from deltavec.errors import MetricsError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from deltavec.observe.lag import SourceLag
    from deltavec.sink.batch import BatchReport

log = logging.getLogger(__name__)

STAGES = ("read", "embed", "merge")
# Micro-batches last from a second (a few rows) to many minutes (a backlog batch
# of a million rows on a CPU): buckets spread over that range.
_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600, math.inf)


class JobMetrics:
    """The metrics of one job, in a registry of their own (one per job, not global)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Standard process_* and python_info series: process_start_time_seconds
        # shows a driver restart that resets every counter below.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

        # Spark's own numInputRows counts a source row once per scan of the
        # micro-batch, and the sink scans it several times: counted by the sink.
        self.rows_read = Counter(
            "deltavec_rows_read_total",
            "Source rows the micro-batches read, each key's changes within a batch "
            "collapsed to its latest (= embedded + unchanged + deleted + quarantined "
            "+ duplicate); replays included.",
            registry=r,
        )
        self.rows_embedded = Counter(
            "deltavec_rows_embedded_total",
            "Rows the model embedded and the target received.",
            registry=r,
        )
        self.rows_unchanged = Counter(
            "deltavec_rows_unchanged_total",
            "Rows skipped because the target already holds a vector of the same text.",
            registry=r,
        )
        self.rows_deleted = Counter(
            "deltavec_rows_deleted_total",
            "Source deletes applied to the target.",
            registry=r,
        )
        self.rows_quarantined = Counter(
            "deltavec_rows_quarantined_total",
            "Rows written to the quarantine table instead of the target, by reason.",
            ["reason"],
            registry=r,
        )
        self.rows_duplicate = Counter(
            "deltavec_rows_duplicate_total",
            "Source rows dropped because one commit held their key twice.",
            registry=r,
        )
        self.batches = Counter(
            "deltavec_batches_total",
            "Micro-batches written to the target.",
            registry=r,
        )
        self.tokens = Counter(
            "deltavec_tokens_total",
            "Tokens the model read (real tokens, without padding).",
            registry=r,
        )
        self.padded_tokens = Counter(
            "deltavec_padded_tokens_total",
            "Tokens the model computed, padding included.",
            registry=r,
        )
        self.batch_seconds = Histogram(
            "deltavec_batch_duration_seconds",
            "Wall time of a micro-batch as Spark measures it (planning to checkpoint commit).",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "deltavec_batch_stage_duration_seconds",
            "Wall time of a micro-batch's stages: read (collapse and count), "
            "embed (the model), merge (target and quarantine MERGEs).",
            ["stage"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        self.rows_per_second = Gauge(
            "deltavec_last_batch_rows_per_second",
            "Source rows per second of wall time in the last micro-batch.",
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "deltavec_last_batch_tokens_per_second",
            "Tokens per second of the last micro-batch's embed stage.",
            registry=r,
        )
        self.padding_ratio = Gauge(
            "deltavec_last_batch_padding_ratio",
            "Padded tokens per real token in the last micro-batch that ran the model (1 = none).",
            registry=r,
        )
        self.last_batch_time = Gauge(
            "deltavec_last_batch_timestamp_seconds",
            "When the last micro-batch finished writing (Unix time).",
            registry=r,
        )
        self.last_batch_id = Gauge(
            "deltavec_last_batch_id",
            "Id of the last micro-batch written.",
            registry=r,
        )
        self.committed_version = Gauge(
            "deltavec_last_committed_source_version",
            "Newest source version whose rows are all in the target and the checkpoint.",
            registry=r,
        )
        self.source_version = Gauge(
            "deltavec_source_latest_version",
            "Newest version of the source table.",
            registry=r,
        )
        self.lag_versions = Gauge(
            "deltavec_source_lag_versions",
            "Source versions not yet processed while rows wait (0 when caught up).",
            registry=r,
        )
        self.lag_seconds = Gauge(
            "deltavec_source_lag_seconds",
            "Age of the oldest source commit whose rows wait (0 when caught up).",
            registry=r,
        )
        self.target_rows = Gauge(
            "deltavec_target_rows",
            "Rows in the target table, from its Delta log.",
            registry=r,
        )
        self.quarantine_rows = Gauge(
            "deltavec_quarantine_rows",
            "Rows in the quarantine table, from its Delta log.",
            registry=r,
        )
        self.model = Info(
            "deltavec_model",
            "The model the job embeds with; device and dtype as the workers report them.",
            registry=r,
        )
        self.gpu_memory = Gauge(
            "deltavec_gpu_memory_used_bytes",
            "Peak GPU memory held by the model in the last micro-batch, by device "
            "(largest over the tasks that used it); absent without a GPU.",
            ["device"],
            registry=r,
        )
        self.conflict_retries = Counter(
            "deltavec_delta_conflict_retries_total",
            "Delta commits retried after a concurrent-modification conflict, by conflict.",
            ["conflict"],
            registry=r,
        )
        self.query_restarts = Counter(
            "deltavec_query_restarts_total",
            "Starts of this checkpoint's streaming query after its first "
            "(crash recovery, redeploys, scheduled --once runs).",
            registry=r,
        )
        self.query_failures = Counter(
            "deltavec_query_failures_total",
            "Times the streaming query stopped with an error.",
            registry=r,
        )
        self.query_active = Gauge(
            "deltavec_query_active",
            "1 while the streaming query runs, 0 once it has stopped.",
            registry=r,
        )
        self.last_progress_time = Gauge(
            "deltavec_last_progress_timestamp_seconds",
            "When Spark last reported progress or idleness for the query (Unix time).",
            registry=r,
        )
        self._model_labels: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- feeds ------------------------------------------------------------------------

    def set_model(self, **labels: str) -> None:
        """Set (or update, e.g. with the device the workers report) the model labels."""
        with self._lock:
            self._model_labels.update({k: v for k, v in labels.items() if v})
            self.model.info(dict(self._model_labels))

    def observe_batch(self, report: BatchReport) -> None:
        """Count what one micro-batch wrote (called by the sink, after its MERGEs)."""
        self.batches.inc()
        self.rows_read.inc(report.rows)
        self.rows_embedded.inc(report.embedded)
        self.rows_unchanged.inc(report.unchanged)
        self.rows_deleted.inc(report.deletes)
        self.rows_duplicate.inc(report.duplicates)
        for reason, count in report.quarantined.items():
            self.rows_quarantined.labels(reason=reason).inc(count)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage).observe(report.seconds.get(stage, 0.0))
        total = sum(report.seconds.values())
        self.rows_per_second.set(report.rows / total if total > 0 else 0.0)
        embed = report.seconds.get("embed", 0.0)
        self.tokens.inc(report.tokens)
        self.padded_tokens.inc(report.padded_tokens)
        self.tokens_per_second.set(report.tokens / embed if embed > 0 else 0.0)
        if report.tokens:
            self.padding_ratio.set(report.padded_tokens / report.tokens)
        for device, used in report.gpu_memory.items():
            self.gpu_memory.labels(device=device).set(used)
        if report.device or report.dtype:
            self.set_model(device=report.device or "", dtype=report.dtype or "")
        self.last_batch_id.set(report.batch_id)
        self.last_batch_time.set(time.time())

    def observe_progress(self, *, seconds: float | None, committed_version: int | None) -> None:
        """Record Spark's progress report of one finished micro-batch."""
        if seconds is not None:
            self.batch_seconds.observe(seconds)
        if committed_version is not None:
            self.committed_version.set(committed_version)
        self.last_progress_time.set(time.time())

    def observe_lag(self, lag: SourceLag) -> None:
        self.source_version.set(lag.latest_version)
        self.lag_versions.set(lag.versions)
        self.lag_seconds.set(lag.seconds if lag.seconds is not None else math.nan)
        if lag.processed_version is not None:
            self.committed_version.set(lag.processed_version)

    def observe_rows(self, *, target: int | None, quarantine: int | None) -> None:
        if target is not None:
            self.target_rows.set(target)
        if quarantine is not None:
            self.quarantine_rows.set(quarantine)

    def count_retry(self, conflict: str) -> None:
        self.conflict_retries.labels(conflict=conflict).inc()


class MetricsServer:
    """The ``/metrics`` HTTP endpoint for one registry, on a daemon thread."""

    def __init__(self, metrics: JobMetrics, *, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve.

        Raises:
            MetricsError: the address cannot be bound (in use, or not this host's).
        """
        try:
            self._server, self._thread = start_http_server(
                self.port, addr=self.host, registry=self.metrics.registry
            )
        except OSError as exc:
            raise MetricsError(
                f"metrics endpoint {self.host}:{self.port} cannot be opened ({exc.strerror}); "
                "set metrics.port to a free port, or 0 to turn the endpoint off"
            ) from None
        log.info("serving metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
