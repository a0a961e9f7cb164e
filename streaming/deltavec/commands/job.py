"""The streaming job: check everything, then run source -> encoder -> MERGE sink.

Every check that can fail on a user's mistake (config, source, model, target,
checkpoint) runs before the query starts, so a bad set-up stops with one line and
touches no table.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deltavec.checkpointing.checkpoint import Checkpoint
from deltavec.checkpointing.lease import CheckpointLease
from deltavec.checkpointing.lease_stores import store_for
from deltavec.config import DeltavecConfig
from deltavec.embed.encoder import EncoderSpec
from deltavec.embed.models import VectorSettings
from deltavec.embed.udf import EmbedBatches, get_encoder
from deltavec.errors import CheckpointError
from deltavec.runtime import tables
from deltavec.sink import target
from deltavec.sink.batch import BatchReport, MergeSink, StopRequested
from deltavec.sink.merge import Layout
from deltavec.source import stream

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
    from pyspark.sql.streaming.query import StreamingQuery

    from deltavec.embed.encoder import Encoder
    from deltavec.observe.monitor import Monitor
    from deltavec.observe.progress import Progress

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
        self.settings: VectorSettings | None = None
        self.document_prompt = ""
        self.query_prompt = ""
        self.dim = 0
        self.sink: MergeSink | None = None
        self.query: StreamingQuery | None = None
        self._stop = threading.Event()
        self._batch_listeners: list[Callable[[BatchReport], None]] = [self._record_batch]
        self._starts = 0
        self.lease: CheckpointLease | None = None
        self._model_load: Future[Encoder] | None = None

    @property
    def spark(self) -> SparkSession:
        if self._spark is None:
            from deltavec.runtime.session import build_session

            cfg = self.config.spark
            self._spark = build_session(
                master=cfg.master,
                app_name=cfg.app_name,
                conf=cfg.conf,
                ship_package=cfg.ship_package,
                class_archive=cfg.class_archive,
            )
        return self._spark

    def on_batch(self, listener: Callable[[BatchReport], None]) -> None:
        """Call ``listener`` with the report of every micro-batch this job writes."""
        self._batch_listeners.append(listener)

    # -- checks -----------------------------------------------------------------------

    def encoder_spec(self, *, for_workers: bool) -> EncoderSpec:
        from deltavec.embed.models import resolve_model

        m = self.config.model
        threads = None
        if for_workers:
            # One task per core by default: torch threads x concurrent tasks <= cores.
            threads = int(self.spark.conf.get("spark.task.cpus", "1") or 1)
        return EncoderSpec(
            model=m.name if for_workers else resolve_model(m.name, m.revision),
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

    def begin_loading_model(self) -> None:
        """Start ``load_model`` on a thread; the next ``load_model`` waits for it.

        Importing torch and reading the weights is seconds of Python that need no
        Spark: started first, it runs while the JVM starts and reads the source.
        """
        if self._model_load is not None:
            return
        future: Future[Encoder] = Future()

        def load() -> None:
            try:
                future.set_result(self._load_model())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                future.set_exception(exc)

        self._model_load = future
        threading.Thread(target=load, name="deltavec-model-load", daemon=True).start()

    def load_model(self) -> Encoder:
        """Load the model on the driver: proves it loads and gives its identity and size.

        The identity covers the weights and every setting that changes a vector
        (the window the model really allows, its modules, the long-text mode, the
        document prompt, the template), so the checks and skip-unchanged see them all.
        """
        if self._model_load is not None:
            return self._model_load.result()
        return self._load_model()

    def _load_model(self) -> Encoder:
        from deltavec.embed import models

        m = self.config.model
        spec = self.encoder_spec(for_workers=False)
        encoder = get_encoder(spec)
        self.document_prompt = models.document_prompt(m.document_prompt, encoder.prompts)
        self.query_prompt = models.query_prompt(m.query_prompt, encoder.prompts)
        chunk = m.long_text == "chunk"
        self.settings = VectorSettings(
            max_tokens=encoder.max_tokens,
            modules=encoder.modules,
            lowercase=encoder.lowercase,
            long_text=m.long_text,
            chunk_overlap=m.chunk_overlap if chunk else None,
            max_chunks=m.max_chunks if chunk else None,
            document_prompt=self.document_prompt,
            template=self.config.source.template,
            # Only int8 is recorded: floating-point targets keep the identity they had.
            precision="int8" if m.precision == "int8" else None,
        )
        weights = models.model_identity(m.name, spec.model, spec.revision)
        self.model_identity = models.vector_identity(weights, self.settings)
        self.dim = encoder.dim
        log.info(
            "model %s: window %d tokens, %s, document prompt %r, query prompt %r",
            weights,
            encoder.max_tokens,
            encoder.modules,
            self.document_prompt,
            self.query_prompt,
        )
        return encoder

    def prepare(self) -> None:
        """Check source, model, target and checkpoint, then create what is missing.

        Every check reads only, and all of them run before the first write, so a
        mistake in any of them leaves every table and the checkpoint untouched.
        """
        cfg = self.config
        # A running job's checkpoint is leased at once, so a second job is refused
        # before Spark even starts; a new checkpoint only once every read-only check
        # passed, so a mistake leaves no folder behind.
        if _local_folder_exists(cfg.checkpoint.location):
            self.take_lease()
        self.begin_loading_model()
        spark = self.spark
        schema = stream.check_source(spark, cfg.source)
        keys = stream.key_fields(schema, cfg.source.key)
        self.load_model()
        self.warm_workers()
        target.check_target(
            spark,
            cfg.target,
            key_fields=keys,
            model_identity=self.model_identity,
            settings=self.settings,
            checkpoint=cfg.checkpoint.location,
        )
        target.check_quarantine(spark, cfg.target.quarantine)
        checkpoint = Checkpoint(spark, cfg.checkpoint.location)
        notes = self._checked_checkpoint_notes(spark, checkpoint)

        self.take_lease()
        target.ensure_target(
            spark,
            cfg.target,
            key_fields=keys,
            model_identity=self.model_identity,
            dim=self.dim,
            settings=self.settings,
            consumer_properties=self.consumer_properties(),
            deletion_vectors=cfg.target.deletion_vectors,
            checkpoint=cfg.checkpoint.location,
        )
        target.ensure_quarantine(spark, cfg.target.quarantine)
        checkpoint.write_notes(notes)

    def consumer_properties(self) -> dict[str, str]:
        """What ``deltavec search`` reads from the target (after ``load_model``)."""
        cfg = self.config
        return target.consumer_properties(
            model_name=cfg.model.name,
            model_revision=cfg.model.revision,
            source=cfg.source,
            template=cfg.source.template,
            query_prompt=self.query_prompt,
        )

    def embed_batches(self) -> EmbedBatches:
        """The ``mapInArrow`` function that embeds on the workers (after ``load_model``)."""
        return EmbedBatches(
            model=self.config.model.name,
            spec=self.encoder_spec(for_workers=True),
            prompt=self.document_prompt,
        )

    def warm_workers(self) -> None:
        """Load the model on the Python workers in the background (after ``load_model``).

        The first micro-batch would otherwise wait while a worker imports torch and
        reads the weights (seconds of one core); the driver's table checks and the
        query's start hide most of it. Spark reuses Python workers
        (``spark.python.worker.reuse``) and each keeps the model in its cache, so
        the worker warmed here runs the next task. One task, not one per slot: a
        small batch is one task (``sink.batch.ONE_TASK_ROWS``), and on a machine
        of few cores more loads at once would slow the checks more than they save.
        A failure is only logged: a batch that needs the model meets it again and
        handles it as it always does.
        """
        spark = self.spark
        embed = self.embed_batches()

        def warm() -> None:
            try:
                spark.range(1, numPartitions=1).mapInArrow(embed.load, "id long").collect()
            except Exception as exc:  # noqa: BLE001 - only a head start is lost
                log.debug("could not load the model on the workers ahead of time: %s", exc)

        threading.Thread(target=warm, name="deltavec-warm-workers", daemon=True).start()

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
        if self.sink is not None:
            self.sink.close()
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self._model_load is not None:
            # A set-up error can come while the driver still imports torch on the
            # loading thread; the interpreter's exit would then abort the process
            # ("terminate called without an active exception") instead of exiting
            # with the error's one line. Let the load end first.
            wait([self._model_load])

    def _checked_checkpoint_notes(
        self, spark: SparkSession, checkpoint: Checkpoint
    ) -> dict[str, Any]:
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
                f"not {self.model_identity}; run 'deltavec reembed' to change models or settings"
            )
        # Every start counts, so the metrics can report restarts across driver restarts.
        self._starts = int(notes.get("starts", 0)) + 1
        return {
            **notes,
            "source": self.config.source.name,
            "source_id": source_id,
            "target": self.config.target.name,
            "model": self.model_identity,
            "starts": self._starts,
        }

    def _record_batch(self, report: BatchReport) -> None:
        """Keep the last batch's numbers in the checkpoint, for ``deltavec status``."""
        Checkpoint(self.spark, self.config.checkpoint.location).record_batch(
            {
                "batch_id": report.batch_id,
                "finished_at": time.time(),
                "seconds": {k: round(v, 3) for k, v in report.seconds.items()},
                "rows": report.rows,
                "embedded": report.embedded,
                "unchanged": report.unchanged,
                "deleted": report.deletes,
                "quarantined": report.quarantined_total,
                "source_version": report.source_version,
                "tokens": report.tokens,
            }
        )

    # -- running ----------------------------------------------------------------------

    def make_sink(self, *, mode: str, app_id: str | None = None) -> MergeSink:
        """The foreachBatch writer for this job (after ``load_model``).

        Args:
            mode: "append" or "changes": what the batches it receives hold.
            app_id: Delta txnAppId; None derives it from the checkpoint (the stream).
        """
        cfg = self.config
        return MergeSink(
            target=cfg.target,
            quarantine=cfg.target.quarantine,
            checkpoint=Checkpoint(self.spark, cfg.checkpoint.location),
            keys=list(cfg.source.key),
            template=cfg.source.template,
            text_columns=cfg.source.text_columns,
            mode=mode,
            embed=self.embed_batches(),
            model_identity=self.model_identity,
            dim=self.dim,
            parallelism=self.spark.sparkContext.defaultParallelism,
            on_batch=list(self._batch_listeners),
            app_id=app_id,
            source_columns=lambda: tables.read(self.spark, cfg.source).columns,
            source=cfg.source,
            still_leased=lambda: self.lease is None or not self.lease.lost,
            layout=Layout(
                max_rows_per_file=cfg.target.max_rows_per_file,
                deletion_vectors=target.target_deletion_vectors(
                    self.spark, cfg.target, default=cfg.target.deletion_vectors
                ),
            ),
        )

    def start(self, *, once: bool) -> StreamingQuery:
        """Start the streaming query (after ``prepare``)."""
        cfg = self.config
        spark = self.spark
        self.sink = self.make_sink(mode=cfg.source.mode)
        writer = (
            stream.open_stream(spark, cfg.source)
            .writeStream.queryName(QUERY_NAME)
            .option("checkpointLocation", cfg.checkpoint.location)
            .foreachBatch(self.sink)
        )
        if once:
            # Spark fixes the drain's end when the query starts, at this version or a
            # newer one: the sink prepares no target version after it.
            self.sink.drain_through = tables.latest_version(spark, cfg.source)
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

    def run(self, *, once: bool, progress: bool = False) -> RunSummary:
        """Prepare, start, and block until drained (``once``) or stopped.

        Args:
            once: process what the source holds now, then return.
            progress: with ``once``, show rows done of the backlog (a bar on a
                terminal, log lines elsewhere).
        """
        summary = RunSummary()
        self.on_batch(summary.add)
        started = time.perf_counter()
        # Bound before any table is touched: a busy port stops the job at once.
        monitor = self._monitor()
        bar: Progress | None = None
        restore: Callable[[], None] = _nothing
        listeners = list(self._batch_listeners)
        try:
            self.prepare()
            if monitor is not None:
                self._watch(monitor)
            if progress and once:
                bar = self._progress()
            restore = _install_signal_handlers(self.request_stop)
            query = self.start(once=once)
            self._wait(query)
        finally:
            restore()
            # This run's monitor and progress bar listen to this run only.
            self._batch_listeners = listeners
            if bar is not None:
                bar.close()
            if monitor is not None:
                monitor.stop()
            self.close()
            summary.seconds = time.perf_counter() - started
        return summary

    def _monitor(self) -> Monitor | None:
        """The metrics endpoint, open, or None when ``metrics.port`` is 0."""
        cfg = self.config
        if not cfg.metrics.port:
            return None
        from deltavec.observe.monitor import Monitor

        monitor = Monitor(
            host=cfg.metrics.host,
            port=cfg.metrics.port,
            refresh_seconds=cfg.metrics.refresh_seconds,
            source=cfg.source,
            target=cfg.target,
            quarantine=cfg.target.quarantine,
            checkpoint=cfg.checkpoint.location,
            mode=cfg.source.mode,
        )
        monitor.start()
        return monitor

    def _watch(self, monitor: Monitor) -> None:
        monitor.watch(
            self.spark,
            model=self.model_identity,
            dim=self.dim,
            device=self.config.model.device,
            dtype=self.config.model.precision,
            starts=self._starts,
        )
        self.on_batch(monitor.on_batch)

    def _progress(self) -> Progress:
        """A progress display over the rows the source holds for this stream."""
        from deltavec.observe.lag import backlog_rows
        from deltavec.observe.progress import Progress
        from deltavec.runtime.delta_log import DeltaLog, row_count

        cfg = self.config
        try:
            total = backlog_rows(
                DeltaLog(self.spark, cfg.source),
                Checkpoint(self.spark, cfg.checkpoint.location),
                mode=cfg.source.mode,
                table_rows=lambda: row_count(self.spark, cfg.source),
            )
        except Exception as exc:  # noqa: BLE001 - an unknown total still shows a rate
            log.warning("cannot estimate the backlog: %s", exc)
            total = None
        bar = Progress(total, task="embed", unit="rows")
        self.on_batch(lambda report: bar.advance(report.rows))
        return bar

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
            try:
                query.awaitTermination(1)
            except Exception:  # noqa: BLE001 - the same failure is read back just below
                break
        error = query.exception()
        if error is not None and not (self._stop.is_set() and _is_stop(error)):
            raise stream.explain_stream_failure(error, self.config) from error

    def _stop_gracefully(self, query: StreamingQuery) -> None:
        assert self.sink is not None
        self.sink.stopping.set()
        # A batch already inside the sink finishes its MERGE; a new one raises
        # StopRequested before writing anything, so Spark does not commit it.
        self.sink.idle.wait()
        query.stop()
        log.info("query stopped; the checkpoint is at the last written batch")


def _nothing() -> None:
    pass


def _local_folder_exists(location: str) -> bool:
    path = location.removeprefix("file:") if location.startswith("file:/") else location
    return path.startswith("/") and os.path.isdir(path)


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
