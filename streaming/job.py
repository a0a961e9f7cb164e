"""The streaming job: check everything, then run source -> encoder -> MERGE sink.

Every check that can fail on a user's mistake (config, source, model, target,
checkpoint) runs before the query starts, so a bad set-up stops with one line and
touches no table.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from streaming import source, tables, target
from streaming.checkpoint import Checkpoint
from streaming.config import DeltavecConfig
from streaming.encoder import EncoderSpec
from streaming.errors import CheckpointError
from streaming.lease import CheckpointLease, store_for
from streaming.merge import Layout
from streaming.sink import BatchReport, MergeSink, StopRequested
from streaming.udf import EmbedBatches, get_encoder

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
    from pyspark.sql.streaming.query import StreamingQuery

    from streaming.encoder import Encoder

log = logging.getLogger(__name__)

QUERY_NAME = "deltavec"


@dataclass
class RunSummary:
    """Totals over the micro-batches one ``run`` processed."""

    batches: int = 0
    rows_read: int = 0
    embedded: int = 0
    unchanged: int = 0
    deleted: int = 0
    quarantined: int = 0
    duplicates: int = 0
    skipped_change_commits: int = 0
    seconds: float = 0.0
    reports: list[BatchReport] = field(default_factory=list)

    def add(self, report: BatchReport) -> None:
        self.batches += 1
        self.rows_read += report.rows
        self.embedded += report.embedded
        self.unchanged += report.unchanged
        self.deleted += report.deletes
        self.quarantined += report.quarantined_total
        self.duplicates += report.duplicates
        self.skipped_change_commits += report.skipped_change_commits
        self.reports.append(report)


class Job:
    """One deltavec job: a config, a SparkSession and, once started, a streaming query."""

    def __init__(self, config: DeltavecConfig, spark: SparkSession | None = None) -> None:
        self.config = config
        self._spark = spark
        self.model_identity = ""
        self.dim = 0
        self.sink: MergeSink | None = None
        self.query: StreamingQuery | None = None
        self._stop = threading.Event()
        self._batch_listeners: list[Callable[[BatchReport], None]] = []
        self.lease: CheckpointLease | None = None

    @property
    def spark(self) -> SparkSession:
        if self._spark is None:
            from streaming.session import build_session

            cfg = self.config.spark
            self._spark = build_session(master=cfg.master, app_name=cfg.app_name, conf=cfg.conf)
        return self._spark

    def on_batch(self, listener: Callable[[BatchReport], None]) -> None:
        """Call ``listener`` with the report of every micro-batch this job writes."""
        self._batch_listeners.append(listener)

    # -- checks -----------------------------------------------------------------------

    def encoder_spec(self, *, for_workers: bool) -> EncoderSpec:
        from streaming.models import resolve_model

        m = self.config.model
        threads = None
        if for_workers:
            # One task per core by default: torch threads x concurrent tasks <= cores.
            threads = int(self.spark.conf.get("spark.task.cpus", "1") or 1)
        return EncoderSpec(
            model=m.name if for_workers else resolve_model(m.name),
            revision=m.revision,
            max_tokens=m.max_tokens,
            batch_tokens=m.batch_tokens,
            device=m.device if for_workers else "cpu",
            precision=m.precision,
            long_text=m.long_text,
            chunk_overlap=m.chunk_overlap,
            max_chunks=m.max_chunks,
            trust_remote_code=m.trust_remote_code,
            threads=threads,
        )

    def load_model(self) -> Encoder:
        """Load the model on the driver: proves it loads and gives its identity and size."""
        from streaming.models import model_identity

        spec = self.encoder_spec(for_workers=False)
        encoder = get_encoder(spec)
        self.model_identity = model_identity(self.config.model.name, spec.model, spec.revision)
        self.dim = encoder.dim
        return encoder

    def prepare(self) -> None:
        """Check source, model, target and checkpoint; create the target if needed."""
        cfg = self.config
        self.take_lease()
        spark = self.spark
        schema = source.check_source(spark, cfg.source)
        self.load_model()
        self._check_checkpoint(spark)
        target.ensure_target(
            spark,
            cfg.target,
            key_fields=source.key_fields(schema, cfg.source.key),
            model_identity=self.model_identity,
            dim=self.dim,
            deletion_vectors=cfg.target.deletion_vectors,
        )
        target.ensure_quarantine(spark, cfg.target.quarantine)

    def take_lease(self) -> None:
        """Hold the checkpoint's lease until ``close``: a second job on it is refused."""
        if self.lease is not None:
            return
        location = self.config.checkpoint.location
        # A local checkpoint is leased before Spark starts, so a second job is
        # refused in a second rather than after a JVM start.
        local = location.startswith(("/", "file:"))
        lease = CheckpointLease(
            store_for(location, None if local else self.spark),
            location=location,
            ttl_s=self.config.checkpoint.lease_seconds,
            on_lost=lambda _: self.request_stop(),
        )
        lease.acquire()
        lease.start_heartbeat()
        self.lease = lease

    def close(self) -> None:
        """Give the checkpoint's lease back (``run`` does this itself)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def _check_checkpoint(self, spark: SparkSession) -> None:
        checkpoint = Checkpoint(spark, self.config.checkpoint.location)
        notes = checkpoint.notes()
        source_id = str(tables.detail(spark, self.config.source).get("id", ""))
        if notes.get("source_id") and notes["source_id"] != source_id:
            raise CheckpointError(
                f"checkpoint {checkpoint.location} belongs to another source table "
                f"({notes.get('source', '?')}); give this source its own checkpoint.location"
            )
        if notes.get("model") and notes["model"] != self.model_identity:
            raise CheckpointError(
                f"checkpoint {checkpoint.location} was written with model {notes['model']}, "
                f"not {self.model_identity}; run 'deltavec reembed' to change models"
            )
        checkpoint.write_notes(
            {
                "source": self.config.source.name,
                "source_id": source_id,
                "target": self.config.target.name,
                "model": self.model_identity,
            }
        )

    # -- running ----------------------------------------------------------------------

    def start(self, *, once: bool) -> StreamingQuery:
        """Start the streaming query (after ``prepare``)."""
        cfg = self.config
        spark = self.spark
        checkpoint = Checkpoint(spark, cfg.checkpoint.location)
        self.sink = MergeSink(
            target=cfg.target,
            quarantine=cfg.target.quarantine,
            checkpoint=checkpoint,
            keys=list(cfg.source.key),
            template=cfg.source.template,
            text_columns=cfg.source.text_columns,
            mode=cfg.source.mode,
            embed=EmbedBatches(model=cfg.model.name, spec=self.encoder_spec(for_workers=True)),
            model_identity=self.model_identity,
            dim=self.dim,
            parallelism=spark.sparkContext.defaultParallelism,
            on_batch=list(self._batch_listeners),
            source=cfg.source,
            layout=Layout(
                max_rows_per_file=cfg.target.max_rows_per_file,
                deletion_vectors=cfg.target.deletion_vectors,
            ),
        )
        writer = (
            source.open_stream(spark, cfg.source)
            .writeStream.queryName(QUERY_NAME)
            .option("checkpointLocation", cfg.checkpoint.location)
            .foreachBatch(self.sink)
        )
        if once:
            writer = writer.trigger(availableNow=True)
        else:
            writer = writer.trigger(processingTime=cfg.trigger.interval)
        self.query = writer.start()
        log.info(
            "started query %s: %s -> %s (model %s, %s)",
            self.query.id,
            cfg.source.name,
            cfg.target.name,
            self.model_identity,
            "until drained" if once else f"every {cfg.trigger.interval}",
        )
        return self.query

    def run(self, *, once: bool) -> RunSummary:
        """Prepare, start, and block until drained (``once``) or stopped."""
        summary = RunSummary()
        self.on_batch(summary.add)
        started = time.perf_counter()
        try:
            self.prepare()
            restore = _install_signal_handlers(self.request_stop)
            try:
                query = self.start(once=once)
                self._wait(query)
            finally:
                restore()
        finally:
            self.close()
            summary.seconds = time.perf_counter() - started
        return summary

    def request_stop(self, *_: Any) -> None:
        """Stop after the micro-batch in flight, if any, has been written."""
        if not self._stop.is_set():
            log.info("stop requested; finishing the batch in flight")
        self._stop.set()

    def _wait(self, query: StreamingQuery) -> None:
        while query.isActive:
            if self._stop.is_set():
                self._stop_gracefully(query)
                break
            query.awaitTermination(1)
        error = query.exception()
        if error is not None and not (self._stop.is_set() and _is_stop(error)):
            raise error

    def _stop_gracefully(self, query: StreamingQuery) -> None:
        assert self.sink is not None
        self.sink.stopping.set()
        # A batch already inside the sink finishes its MERGE; a new one raises
        # StopRequested before writing anything, so Spark does not commit it.
        self.sink.idle.wait()
        query.stop()
        log.info("query stopped; the checkpoint is at the last written batch")


def _is_stop(error: BaseException) -> bool:
    return StopRequested.__name__ in str(error)


def _install_signal_handlers(handler: Callable[..., None]) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
