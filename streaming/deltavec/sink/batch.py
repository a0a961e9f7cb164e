"""The ``foreachBatch`` sink: collapse, skip unchanged, embed, MERGE, quarantine.

Exactly-once rests on two facts. Spark replays a micro-batch with the same id and
the same rows after a crash. Each MERGE runs with Delta's session settings
``spark.databricks.delta.write.txnAppId``/``txnVersion`` set to (this checkpoint's
app id, batch id), so Delta skips a MERGE it has already committed for that batch.
A crash between the MERGE commit and Spark's checkpoint commit therefore writes
nothing twice.

This module imports no torch: the model runs on the workers, inside ``udf``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from deltavec.checkpointing.checkpoint import Checkpoint, DeltaOffset
from deltavec.columns import (
    BATCH_SOURCE_VERSION,
    BATCH_TEXT_HASH,
    DELETE,
    EMBEDDING,
    ENCODE_STATS,
    ENCODE_STATS_FIELDS,
    ERROR_CODE,
    ERROR_MESSAGE,
    IS_DUPLICATE,
    KEY_JSON,
    OP,
    PROBLEM,
    TEXT,
    UPSERT,
)
from deltavec.config import TableRef
from deltavec.embed.balance import in_one_task, spread_by_length
from deltavec.errors import CheckpointError
from deltavec.observe.logs import kv
from deltavec.runtime import delta_log, faults
from deltavec.sink.key_filter import KeyFilter
from deltavec.sink.merge import (
    ACTION,
    EXISTS,
    HELD_TWICE,
    TARGET_HASH,
    TARGET_MODEL,
    TARGET_ROWS,
    Layout,
    TargetWriter,
    WriteCounts,
)
from deltavec.sink.quarantine import QuarantineWriter
from deltavec.sink.snapshot_warmer import SnapshotWarmer
from deltavec.source import changes
from deltavec.source.commit_versions import with_commit_versions
from deltavec.source.stream import check_batch_columns

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

    from deltavec.embed.udf import EmbedBatches

log = logging.getLogger(__name__)

# Up to this many rows to embed go to one task: at about 15 tokens a row, 5 ms of
# model time each on one core, so a second task's scheduling and Arrow round trip
# would cost more than it saves.
ONE_TASK_ROWS = 64


class StopRequested(Exception):
    """Raised into Spark when a batch starts after a stop was asked for; nothing is written."""


@dataclass
class BatchReport:
    """What one micro-batch did; fed to metrics, logs and the run summary."""

    batch_id: int
    rows: int = 0
    upserts: int = 0
    deletes: int = 0
    unchanged: int = 0
    embedded: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    source_version: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    replayed: bool = False
    # What the model did, as the workers report it (udf.encode_stats_column).
    tokens: int = 0
    padded_tokens: int = 0
    gpu_memory: dict[str, int] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    # Append mode: source commits this batch moved past without reading, because
    # they update or delete rows (Delta's skipChangeCommits).
    skipped_change_commits: int = 0
    # Deletes and preimages of keyless rows: each may take a quarantine row out.
    keyless_removals: int = 0

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    @property
    def padding_ratio(self) -> float | None:
        """Padded tokens per real token; None when the model did not run."""
        return self.padded_tokens / self.tokens if self.tokens else None


class MergeSink:
    """Callable for ``DataStreamWriter.foreachBatch``; one instance per query.

    Args:
        target: the target table.
        quarantine: where rows that cannot be embedded go.
        checkpoint: the query's checkpoint, for the txn app id and source offsets.
        keys: key columns.
        template: text template; ``text_columns`` are the columns it reads.
        mode: "append" or "changes".
        embed: the ``mapInArrow`` function that adds vectors (its ``output_names``
            are filled in here, from the batch's columns).
        model_identity: recorded in every target row.
        dim: the vector size.
        parallelism: partitions the model work is spread over (one per task slot).
        on_batch: called with each batch's report after it is written.
        app_id: Delta txnAppId; by default derived from the checkpoint's query id.
        source_columns: returns the source table's current columns; checked before
            each batch so a dropped key or template column stops the job.
        source: the source table; in append mode its log tells which update and
            delete commits the stream skipped.
        layout: how the target's files are written (see ``deltavec.sink.merge``).
        still_leased: False once the job lost its checkpoint lease to another job;
            checked before a batch starts and again right before it writes.
    """

    def __init__(
        self,
        *,
        target: TableRef,
        quarantine: TableRef,
        checkpoint: Checkpoint,
        keys: list[str],
        template: str,
        text_columns: list[str],
        mode: str,
        embed: EmbedBatches,
        model_identity: str,
        dim: int,
        parallelism: int,
        on_batch: list[object] | None = None,
        app_id: str | None = None,
        source_columns: Callable[[], list[str]] | None = None,
        source: TableRef | None = None,
        layout: Layout | None = None,
        still_leased: Callable[[], bool] | None = None,
    ) -> None:
        self.source = source
        self.still_leased = still_leased
        self.writer = TargetWriter(
            target=target, keys=keys, model_identity=model_identity, dim=dim, layout=layout
        )
        self.target = target
        self.warmer = SnapshotWarmer(target=target, key=keys[0])
        self.quarantine = quarantine
        self.quarantine_writer = QuarantineWriter(
            quarantine=quarantine, keys=keys, text_columns=text_columns
        )
        self.checkpoint = checkpoint
        self.keys = keys
        self.template = template
        self.text_columns = text_columns
        self.mode = mode
        self.embed = embed
        self.model_identity = model_identity
        self.dim = dim
        self.parallelism = parallelism
        self.listeners = list(on_batch or [])
        self.stopping = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self._app_id = app_id
        self.source_columns = source_columns
        # For a query that drains what the source holds and stops (``availableNow``):
        # the newest source version when it started; None for a continuous query.
        self.drain_through: int | None = None

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        self._check_lease(batch_id)
        if self.stopping.is_set():
            raise StopRequested(f"stop requested before batch {batch_id}")
        self.idle.clear()
        try:
            report = self.process(batch, batch_id)
        finally:
            self.idle.set()
        for listener in self.listeners:
            try:
                listener(report)  # type: ignore[operator]
            except Exception:
                # Failing here would fail a batch whose MERGE is committed, and stop the stream
                # over a metric or a status note.
                log.warning("batch %d: a batch listener failed", batch_id, exc_info=True)

    def _check_lease(self, batch_id: int) -> None:
        if self.still_leased is not None and not self.still_leased():
            raise CheckpointError(
                f"batch {batch_id} not written: this job lost the checkpoint's lease to "
                "another job, which now owns the checkpoint and the target"
            )

    @property
    def app_id(self) -> str:
        if self._app_id is None:
            self._app_id = self.checkpoint.app_id()
        return self._app_id

    # -- one micro-batch --------------------------------------------------------------

    def process(
        self, batch: DataFrame, batch_id: int, *, source_version: int | None = None
    ) -> BatchReport:
        """Write one micro-batch; ``source_version`` defaults to the checkpoint's offset."""
        from pyspark import StorageLevel
        from pyspark.sql import functions as F

        # Delta keeps streaming a dropped column as nulls, which would embed half
        # texts without a word: check the source's current schema first.
        current = self.source_columns() if self.source_columns else batch.columns
        check_batch_columns(current, self.keys, self.text_columns)
        spark = batch.sparkSession
        report = BatchReport(batch_id=batch_id, source_version=source_version)
        clock = _Clock(report.seconds)
        # Append mode stamps rows with this version; both modes log it.
        offset = None
        if source_version is None:
            offset = self.checkpoint.offset(batch_id)
            report.source_version = offset.last_version if offset else None
            if self.mode == "append":
                self._note_skipped_commits(spark, batch_id, report)

        with clock("read"):
            # A stream's batch is still a scan of source files, which name their commit.
            streamed = source_version is None and report.source_version is not None
            if self.mode == "append" and self.source is not None and streamed:
                batch = with_commit_versions(
                    spark, batch, self.source, newest=int(report.source_version or 0)
                )
            acts = changes.actions(
                batch,
                keys=self.keys,
                template=self.template,
                text_columns=self.text_columns,
                mode=self.mode,
                batch_version=report.source_version,
            ).persist(StorageLevel.MEMORY_AND_DISK)
            keyed = acts.where(~F.col(IS_DUPLICATE) & ~changes.any_null(self.keys))
            # The target rows of this batch's keys, read once from the files whose key
            # range can hold them: for skipping unchanged text and for the MERGE.
            key_filter = self._survey(acts, keyed, report)
            existing = self.writer.existing(spark, keyed, key_filter).persist(
                StorageLevel.MEMORY_AND_DISK
            )

        with clock("embed"):
            good = acts.where(
                (F.col(OP) == UPSERT) & F.col(PROBLEM).isNull() & ~F.col(IS_DUPLICATE)
            )
            candidates = self._skip_unchanged(good, existing)
            inputs = self._spread(candidates, rows=report.upserts).select(
                *self.keys,
                BATCH_SOURCE_VERSION,
                TEXT,
                BATCH_TEXT_HASH,
                KEY_JSON,
                EXISTS,
                HELD_TWICE,
            )
            embed, schema = self._embedder(inputs.schema)
            embedded = inputs.mapInArrow(embed, schema).persist(StorageLevel.MEMORY_AND_DISK)
            tally = _tally(embedded, report)
            report.unchanged = report.upserts - report.embedded - tally.failed

        try:
            faults.maybe_fail("before_merge")
            # The embed stage can outlast a lease period: check again before writing.
            self._check_lease(batch_id)
            with clock("merge"):
                # What the tallies already know decides the writes, without counting
                # again: the MERGE takes existing keys' new vectors and every row that
                # may remove one (a delete, a now-failing row, a key held twice), the
                # append the new keys' vectors (which include keys held twice).
                counts = WriteCounts(
                    merge=tally.existing
                    + tally.held_twice
                    + report.deletes
                    + report.quarantined_total,
                    append=tally.new,
                )
                wrote_target = bool(counts.merge or counts.append)
                if wrote_target:
                    self._merge_target(
                        spark, acts, embedded, existing, batch_id, key_filter, counts
                    )
                self.quarantine_writer.write(
                    spark,
                    acts,
                    embedded,
                    app_id=self.app_id,
                    batch_id=batch_id,
                    any_new=bool(report.quarantined or report.keyless_removals),
                )
            faults.maybe_fail("after_merge")
        finally:
            embedded.unpersist()
            existing.unpersist()
            acts.unpersist()
        if wrote_target and not self.stopping.is_set() and self._may_be_followed(offset):
            # The next batch reads the version this one wrote: plan it while the
            # job waits for the next trigger (deltavec.sink.snapshot_warmer).
            self.warmer.warm(spark, key_filter)
        log.info("%s", _batch_line(report))
        return report

    def close(self, timeout: float = 60.0) -> None:
        """Wait for the last batch's background work (at most ``timeout`` seconds) and
        let its threads go; the sink takes no batch after this."""
        self.warmer.close(timeout)

    def _may_be_followed(self, offset: DeltaOffset | None) -> bool:
        """False when no batch follows this one: the last batch of a drain, or a batch
        that is not the stream's (``quarantine retry`` writes one). Preparing the
        target for a batch that never comes would only hold up the end of
        ``run --once``, which waits for it in ``close``."""
        if offset is None:
            return False
        return self.drain_through is None or offset.processed_through < self.drain_through

    def _note_skipped_commits(
        self, spark: SparkSession, batch_id: int, report: BatchReport
    ) -> None:
        """Count (and warn about) the update/delete commits an append stream skipped."""
        end = self.checkpoint.offset(batch_id)
        start = self.checkpoint.offset(batch_id - 1) if batch_id > 0 else None
        # A new stream's first batches read the starting snapshot, which already
        # holds every earlier update and delete: nothing was skipped before it.
        if end is None or start is None or self.source is None:
            return
        versions = delta_log.change_commits(
            spark, self.source, after=start.covered_through, through=end.covered_through
        )
        report.skipped_change_commits = len(versions)
        if versions:
            log.warning(
                "batch %d: skipped %d source commit(s) that update or delete rows (versions %s); "
                "mode 'append' only embeds new rows, so those changes are not in the target: "
                "set source.mode = 'changes' to follow updates and deletes",
                batch_id,
                len(versions),
                ", ".join(map(str, versions[:10])) + (", ..." if len(versions) > 10 else ""),
            )

    def _survey(self, acts: DataFrame, keyed: DataFrame, report: BatchReport) -> KeyFilter | None:
        """Count the batch's actions into ``report`` and return its key filter.

        A small batch (the usual one of a running stream) comes to the driver whole,
        flags and keys but no text, in one query: on a few cores, planning two more
        (an aggregate for the counts, a distinct for the keys) costs more than the
        rows. A larger one pays for that look (at most ``max_listed_keys + 1`` rows)
        and is then counted by an aggregate, its keys bounded by
        ``TargetWriter.key_filter``.
        """
        from pyspark.sql import functions as F

        first = self.keys[0]
        limit = self.writer.layout.max_listed_keys
        rows = (
            acts.select(
                F.col(first).alias("key"),
                changes.any_null(self.keys).alias("keyless"),
                IS_DUPLICATE,
                OP,
                PROBLEM,
                KEY_JSON,
            )
            .limit(limit + 1)
            .collect()
        )
        if len(rows) > limit:
            groups = acts.groupBy(IS_DUPLICATE, OP, PROBLEM).count().collect()
            self._count_actions(
                [(g[IS_DUPLICATE], g[OP], g[PROBLEM], int(g["count"])) for g in groups],
                report,
                lambda: [
                    r[KEY_JSON]
                    for r in acts.where(F.col(IS_DUPLICATE)).select(KEY_JSON).limit(5).collect()
                ],
            )
            return self.writer.key_filter(keyed)
        counts = Counter((r[IS_DUPLICATE], r[OP], r[PROBLEM]) for r in rows)
        self._count_actions(
            [(*group, n) for group, n in counts.items()],
            report,
            lambda: [r[KEY_JSON] for r in rows if r[IS_DUPLICATE]][:5],
        )
        keys = {r["key"] for r in rows if not r[IS_DUPLICATE] and not r["keyless"]}
        return self.writer.listed_key_filter(keys)

    def _count_actions(
        self,
        groups: list[tuple[bool, str, str | None, int]],
        report: BatchReport,
        duplicate_sample: Callable[[], list[str]],
    ) -> None:
        """Add up ``(duplicate, op, problem, rows)`` groups into the report's counts."""
        for duplicate, op, problem, rows in groups:
            report.rows += rows
            if problem is not None and op == DELETE:
                # A keyless row's delete or preimage: it only takes the row's
                # quarantine entry out; the target never held it.
                report.keyless_removals += rows
                continue
            if problem is not None:
                report.quarantined[problem] = report.quarantined.get(problem, 0) + rows
            if duplicate:
                report.duplicates += rows
            elif op == DELETE:
                report.deletes += rows
            elif problem is None:
                report.upserts += rows
        if report.duplicates:
            sample = duplicate_sample()
            log.warning(
                "batch %d: %d source rows repeat a key within one commit; kept the row whose "
                "text hash is greatest, e.g. keys %s",
                report.batch_id,
                report.duplicates,
                ", ".join(sample),
            )

    def _embedder(self, inputs: StructType) -> tuple[EmbedBatches, StructType]:
        """The ``mapInArrow`` function and its output schema for these input columns."""
        from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

        # Every output column may be null: failed rows have no vector, good rows no text.
        schema = StructType(
            [
                *[StructField(f.name, f.dataType, nullable=True) for f in inputs.fields],
                StructField(EMBEDDING, ArrayType(FloatType(), containsNull=False)),
                StructField(ERROR_CODE, StringType()),
                StructField(ERROR_MESSAGE, StringType()),
                StructField(
                    ENCODE_STATS,
                    StructType.fromDDL(", ".join(f"{n} {t}" for n, t in ENCODE_STATS_FIELDS)),
                ),
            ]
        )
        return replace(self.embed, output_names=tuple(schema.names)), schema

    def _skip_unchanged(self, good: DataFrame, existing: DataFrame) -> DataFrame:
        """Drop upserts whose text the target already embedded with this model.

        The rows kept carry ``_exists``: whether the target holds their key (once),
        and ``_held_twice``: whether it holds it more than once.
        """
        from pyspark.sql import functions as F

        joined = good.join(existing, on=self.keys, how="left")
        single = F.col(TARGET_ROWS) == 1
        unchanged = (
            (F.col(TARGET_HASH) == F.col(BATCH_TEXT_HASH))
            & (F.col(TARGET_MODEL) == F.lit(self.model_identity))
            & single
        )
        # A key the target holds twice is embedded again and written as new: its
        # rows are deleted by the MERGE and the append writes the one vector.
        return (
            joined.where(~F.coalesce(unchanged, F.lit(False)))
            .withColumn(EXISTS, F.coalesce(single, F.lit(False)))
            .withColumn(HELD_TWICE, F.coalesce(F.col(TARGET_ROWS) > 1, F.lit(False)))
            .drop(TARGET_HASH, TARGET_MODEL, TARGET_ROWS)
        )

    def _spread(self, frame: DataFrame, *, rows: int) -> DataFrame:
        # The model should run on every task slot, and the micro-batch waits for the
        # slowest task: give every slot the same amount of text (deltavec.embed.balance).
        # A few rows are model work of milliseconds, less than a task costs: one
        # task (one Python worker, one model copy at start-up) embeds them.
        if rows <= ONE_TASK_ROWS:
            return in_one_task(frame, text=TEXT, keys=self.keys)
        return spread_by_length(frame, slots=self.parallelism, text=TEXT, keys=self.keys)

    # -- writes ------------------------------------------------------------------------

    def _merge_target(
        self,
        spark: SparkSession,
        acts: DataFrame,
        embedded: DataFrame,
        existing: DataFrame,
        batch_id: int,
        key_filter: KeyFilter | None,
        counts: WriteCounts,
    ) -> None:
        from pyspark.sql import functions as F

        upserts = embedded.where(F.col(ERROR_CODE).isNull()).select(
            *self.keys,
            F.lit(UPSERT).alias(ACTION),
            F.col(EXISTS),
            F.col(EMBEDDING),
            F.col(BATCH_TEXT_HASH),
            F.col(BATCH_SOURCE_VERSION),
        )
        # A row that now fails (blank text, model error) loses its old vector:
        # the target only holds vectors of the latest text.
        removals = acts.where(
            ~F.col(IS_DUPLICATE)
            & ((F.col(OP) == DELETE) | F.col(PROBLEM).isNotNull())
            & ~changes.any_null(self.keys)
        ).select(*self.keys, F.col(BATCH_SOURCE_VERSION))
        failed = embedded.where(F.col(ERROR_CODE).isNotNull()).select(
            *self.keys, F.col(BATCH_SOURCE_VERSION)
        )
        # A key the target holds more than once (a writer outside this job's
        # lease) loses all its rows here; the append writes it again, once.
        repairs = existing.where(F.col(TARGET_ROWS) > 1).select(
            *self.keys, F.lit(None).cast("long").alias(BATCH_SOURCE_VERSION)
        )
        # Only keys the target holds can be deleted; one source row per key.
        deletes = (
            removals.unionByName(failed)
            .unionByName(repairs)
            .join(existing.select(*self.keys), on=self.keys, how="left_semi")
            .dropDuplicates(self.keys)
            .withColumn(ACTION, F.lit(DELETE))
            .withColumn(EXISTS, F.lit(True))
        )
        source = upserts.unionByName(deletes, allowMissingColumns=True)
        self.writer.write(
            spark,
            source,
            app_id=self.app_id,
            batch_id=batch_id,
            key_filter=key_filter,
            counts=counts,
        )


@dataclass(frozen=True)
class _Tally:
    """The model's output rows of one batch, by what the writes do with them.

    Attributes:
        failed: rows the model failed on (they are in ``report.quarantined`` too).
        existing: embedded rows whose key the target holds once (the MERGE).
        new: embedded rows the append writes (new keys and keys held twice).
        held_twice: embedded rows whose key the target holds more than once (the
            MERGE removes those rows first).
    """

    failed: int = 0
    existing: int = 0
    new: int = 0
    held_twice: int = 0


def _tally(embedded: DataFrame, report: BatchReport) -> _Tally:
    """Count embedded and failed rows and add up the workers' encode stats, in one job."""
    from pyspark.sql import functions as F

    stats = F.col(ENCODE_STATS)
    rows = (
        embedded.groupBy(
            F.col(ERROR_CODE),
            F.col(EXISTS),
            F.col(HELD_TWICE),
            stats.getField("device").alias("device"),
        )
        .agg(
            F.count(F.lit(1)).alias("count"),
            F.sum(stats.getField("tokens")).alias("tokens"),
            F.sum(stats.getField("padded_tokens")).alias("padded_tokens"),
            F.max(stats.getField("gpu_memory_bytes")).alias("gpu_memory_bytes"),
            F.max(stats.getField("dtype")).alias("dtype"),
        )
        .collect()
    )
    failed = existing = new = held_twice = 0
    for row in rows:
        code, count = row[ERROR_CODE], int(row["count"])
        if code is not None:
            report.quarantined[code] = report.quarantined.get(code, 0) + count
            failed += count
        else:
            report.embedded += count
            if row[EXISTS]:
                existing += count
            else:
                new += count
            if row[HELD_TWICE]:
                held_twice += count
        report.tokens += int(row["tokens"] or 0)
        report.padded_tokens += int(row["padded_tokens"] or 0)
        device = row["device"]
        if device:
            report.device = str(device).split(":")[0]
            report.dtype = row["dtype"] or report.dtype
        if device and row["gpu_memory_bytes"] is not None:
            used = int(row["gpu_memory_bytes"])
            report.gpu_memory[device] = max(report.gpu_memory.get(device, 0), used)
    return _Tally(failed=failed, existing=existing, new=new, held_twice=held_twice)


def _batch_line(report: BatchReport) -> str:
    """The one structured log line per micro-batch."""
    total = sum(report.seconds.values())
    return kv(
        "batch",
        batch_id=report.batch_id,
        rows=report.rows,
        embedded=report.embedded,
        unchanged=report.unchanged,
        deleted=report.deletes,
        quarantined=report.quarantined_total,
        duplicates=report.duplicates,
        source_version=report.source_version,
        read_s=report.seconds.get("read", 0.0),
        embed_s=report.seconds.get("embed", 0.0),
        merge_s=report.seconds.get("merge", 0.0),
        total_s=total,
        rows_per_s=report.rows / total if total > 0 else 0.0,
        tokens=report.tokens,
        padding=report.padding_ratio,
    )


class _Clock:
    def __init__(self, sink: dict[str, float]) -> None:
        self.sink = sink

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sink[name] = self.sink.get(name, 0.0) + time.perf_counter() - start
