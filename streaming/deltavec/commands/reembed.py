"""``deltavec reembed [--model …]``: move a target to another model or new settings, all at once.

Vectors of two models cannot be compared, so consumers must never see a mix. The
re-embedding is therefore built beside the target and swapped in by one Delta
commit:

1. The job's checkpoint lease is taken (the stream must be stopped; a running job
   is refused, and a running job refuses a re-embedding).
2. The source is read as of the version the checkpoint has planned up to (its
   newest offset). The target is the function of that snapshot; replaying any
   batch the checkpoint holds after the swap changes nothing, because its rows are
   found unchanged and its deletes find nothing to delete.
3. Every live row's text is embedded with the new model, in chunks, and each chunk
   is appended to a staging Delta table in the checkpoint
   (``_deltavec/reembed``), keyed by (key, text hash). A re-run after a crash
   embeds only what the staging table lacks.
4. When every row is staged, ``CREATE OR REPLACE TABLE … AS SELECT`` writes the
   new vectors and the new ``deltavec.model`` property in a single commit. A
   reader of any table version sees one model only; the table stays where it was
   and readable by the ``deltalake`` package (consumers simply read the newest
   version, and may compare ``deltavec.model`` to notice the switch).
   The commit also names the new model in the consumer properties
   (``deltavec.model_name``/``model_revision``), so ``open_search`` loads it.
   Right after it, the rows the new model failed on (staged with their error)
   go to the quarantine, and quarantined rows it embedded leave it.
5. The checkpoint's notes take the new model and the staging table is removed.
   The job then runs with ``model.name`` set to the new model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltavec.checkpointing.checkpoint import Checkpoint
from deltavec.columns import (
    BATCH_SOURCE_VERSION,
    BATCH_TEXT_HASH,
    DIM,
    EMBEDDED_AT,
    EMBEDDING,
    ERROR_CODE,
    ERROR_MESSAGE,
    IS_DUPLICATE,
    KEY_JSON,
    MODEL,
    OP,
    PROBLEM,
    SOURCE_VERSION,
    TEXT,
    TEXT_HASH,
    UPSERT,
)
from deltavec.config import DeltavecConfig, TableRef
from deltavec.embed.balance import spread_by_length
from deltavec.errors import CheckpointError, TargetError
from deltavec.runtime import faults, tables
from deltavec.sink import ownership
from deltavec.sink.merge import Layout
from deltavec.sink.quarantine import VALUE_CHARS
from deltavec.sink.target import (
    DIM_PROPERTY,
    MODEL_PROPERTY,
    MODEL_REVISION_PROPERTY,
    SETTINGS_PROPERTY,
    target_deletion_vectors,
)
from deltavec.sink.transactions import session_settings
from deltavec.source import changes

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

    from deltavec.commands.job import Job

log = logging.getLogger(__name__)

STAGING = "_deltavec/reembed"
STAGING_MODEL_PROPERTY = "deltavec.reembed.model"
DEFAULT_CHUNK_ROWS = 5_000

Progress = Callable[[int, int], None]


@dataclass
class ReembedReport:
    """What one ``reembed`` run did."""

    model_from: str
    model_to: str
    source_version: int
    rows: int = 0
    embedded: int = 0
    reused: int = 0
    failed: int = 0
    chunks: int = 0
    seconds: float = 0.0
    switched: bool = False


class Reembed:
    """Re-embed a job's target with another model; see the module docstring.

    Args:
        config: the job's configuration (source, target, checkpoint, Spark).
        model: the new model: "default", a local folder or a Hugging Face id; None
            keeps the config's (to apply new settings, such as ``model.max_tokens``).
        revision: its Hugging Face revision (with ``model``).
        spark: a session to use; built from the config when None.
        chunk_rows: rows embedded and staged per commit (the unit of resumption).
        progress: called with (rows done, rows in all) after each chunk.
    """

    def __init__(
        self,
        config: DeltavecConfig,
        *,
        model: str | None = None,
        revision: str | None = None,
        spark: SparkSession | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        progress: Progress | None = None,
    ) -> None:
        from deltavec.commands.job import Job

        # The same model with new settings (a window, a prompt) is a re-embedding too.
        if model is not None:
            new_model = config.model.model_copy(update={"name": model, "revision": revision})
            config = config.model_copy(update={"model": new_model})
        self.config = config
        self.job: Job = Job(self.config, spark)
        self.chunk_rows = chunk_rows
        self.progress = progress

    @property
    def spark(self) -> SparkSession:
        return self.job.spark

    def run(self) -> ReembedReport:
        """Re-embed, swap, and record the new model; resumes an interrupted run."""
        started = time.perf_counter()
        job = self.job
        try:
            job.take_lease()
            # The JVM starts while the model loads.
            job.begin_loading_model()
            _ = job.spark
            job.load_model()
            report = self._run(job)
        finally:
            job.close()
        report.seconds = time.perf_counter() - started
        return report

    def _run(self, job: Job) -> ReembedReport:
        cfg = self.config
        spark = self.spark
        if not tables.exists(spark, cfg.target):
            raise TargetError(
                f"target {cfg.target.name} does not exist, so there is nothing to re-embed; "
                "start the job with the new model instead"
            )
        ownership.check(spark, cfg.target, cfg.checkpoint.location)
        checkpoint = Checkpoint(spark, cfg.checkpoint.location)
        planned = checkpoint.last_planned_batch()
        offset = checkpoint.offset(planned) if planned is not None else None
        if offset is None:
            raise CheckpointError(
                f"checkpoint {checkpoint.location} has not read the source yet, so the "
                "target's source version is unknown; run the job first or start it afresh "
                "with the new model on a new target"
            )
        current = tables.properties(spark, cfg.target).get(MODEL_PROPERTY, "")
        report = ReembedReport(
            model_from=current, model_to=job.model_identity, source_version=offset.covered_through
        )
        if current == job.model_identity:
            # Already swapped (perhaps by a run killed before it updated the notes).
            log.info("target %s already holds model %s", cfg.target.name, current)
            self._finish(checkpoint, job)
            return report

        rows = self._source_rows(report.source_version).persist()
        try:
            report.rows = rows.count()
            staging = self._staging(checkpoint, job, rows.select(*cfg.source.key).schema)
            self._embed_missing(job, rows, staging, report)
            faults.maybe_fail("before_swap")
            self._swap(job, rows, staging, report)
            self._requarantine(rows, staging)
        finally:
            rows.unpersist()
        report.switched = True
        self._finish(checkpoint, job)
        log.info(
            "target %s switched from %s to %s: %d rows (%d embedded now, %d from an earlier run, "
            "%d failed)",
            cfg.target.name,
            report.model_from,
            report.model_to,
            report.rows - report.failed,
            report.embedded,
            report.reused,
            report.failed,
        )
        return report

    # -- steps --------------------------------------------------------------------------

    def _source_rows(self, version: int) -> DataFrame:
        """Live source rows as of ``version``: keys, text, its hash, key JSON."""
        from pyspark.sql import functions as F

        src = self.config.source
        snapshot = tables.read(self.spark, src, versionAsOf=str(version))
        acts = changes.actions(
            snapshot,
            keys=list(src.key),
            template=src.template,
            text_columns=src.text_columns,
            mode="append",
            batch_version=version,
        )
        return acts.where(
            (F.col(OP) == UPSERT) & F.col(PROBLEM).isNull() & ~F.col(IS_DUPLICATE)
        ).select(*src.key, TEXT, BATCH_TEXT_HASH, KEY_JSON, BATCH_SOURCE_VERSION)

    def _staging(self, checkpoint: Checkpoint, job: Job, keys: StructType) -> TableRef:
        """The staging table for this model, emptied if it holds another model's vectors."""
        from delta.tables import DeltaTable
        from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

        ref = TableRef(path=f"{checkpoint.location}/{STAGING}")
        spark = self.spark
        if tables.exists(spark, ref):
            staged_for = tables.properties(spark, ref).get(STAGING_MODEL_PROPERTY)
            if staged_for == job.model_identity:
                return ref
            log.info("dropping the staging table of an abandoned re-embedding (%s)", staged_for)
            fs, path = tables.hadoop_fs(spark, ref.path or "")
            fs.delete(path, True)
        schema = StructType(
            [
                *keys.fields,
                StructField(BATCH_TEXT_HASH, StringType()),
                StructField(EMBEDDING, ArrayType(FloatType(), containsNull=False)),
                StructField(ERROR_CODE, StringType()),
                StructField(ERROR_MESSAGE, StringType()),
            ]
        )
        (
            DeltaTable.createIfNotExists(spark)
            .location(ref.path or "")
            .addColumns(schema)
            .property(STAGING_MODEL_PROPERTY, job.model_identity)
            .execute()
        )
        return ref

    def _embed_missing(
        self, job: Job, rows: DataFrame, staging: TableRef, report: ReembedReport
    ) -> None:
        from pyspark.sql import functions as F

        keys = list(self.config.source.key)
        staged = tables.read(self.spark, staging).select(*keys, BATCH_TEXT_HASH)
        todo = rows.join(staged, on=[*keys, BATCH_TEXT_HASH], how="left_anti").persist()
        try:
            missing = todo.count()
            report.reused = report.rows - missing
            report.chunks = max(1, math.ceil(missing / self.chunk_rows)) if missing else 0
            self._tell(report.reused, report.rows)
            embed = job.embed_batches()
            parallelism = self.spark.sparkContext.defaultParallelism
            bucket = F.pmod(F.xxhash64(*keys), F.lit(report.chunks or 1))
            done = report.reused
            for chunk in range(report.chunks):
                inputs = spread_by_length(
                    todo.where(bucket == chunk), slots=parallelism, text=TEXT, keys=keys
                ).select(*keys, TEXT, BATCH_TEXT_HASH, KEY_JSON)
                schema = _embedded_schema(inputs.schema)
                out = inputs.mapInArrow(_with_names(embed, schema), schema).persist()
                good = out.where(F.col(ERROR_CODE).isNull()).count()
                bad = out.count() - good
                # Failed rows are staged too (no vector, their error): the swap
                # quarantines them, and a resumed run does not embed them again.
                out.select(
                    *keys, BATCH_TEXT_HASH, EMBEDDING, ERROR_CODE, ERROR_MESSAGE
                ).write.format("delta").mode("append").option("mergeSchema", "true").save(
                    staging.path
                )
                out.unpersist()
                report.embedded += good
                report.failed += bad
                done += good + bad
                self._tell(done, report.rows)
                faults.maybe_fail("reembed_chunk")
        finally:
            todo.unpersist()
        if report.failed:
            log.warning(
                "%d rows failed to embed with %s; the swap moves them to the quarantine",
                report.failed,
                job.model_identity,
            )

    def _swap(self, job: Job, rows: DataFrame, staging: TableRef, report: ReembedReport) -> None:
        """Replace the target's rows and model property in one commit."""
        from pyspark.sql import functions as F

        cfg = self.config
        spark = self.spark
        keys = list(cfg.source.key)
        staged = (
            tables.read(spark, staging)
            .where(F.col(EMBEDDING).isNotNull())
            .select(*keys, BATCH_TEXT_HASH, EMBEDDING)
        )
        final = rows.join(staged, on=[*keys, BATCH_TEXT_HASH], how="inner").select(
            *[F.col(k) for k in keys],
            F.col(EMBEDDING),
            F.lit(job.model_identity).alias(MODEL),
            F.lit(job.dim).alias(DIM),
            F.col(BATCH_TEXT_HASH).alias(TEXT_HASH),
            F.col(BATCH_SOURCE_VERSION).cast("long").alias(SOURCE_VERSION),
            F.current_timestamp().alias(EMBEDDED_AT),
        )
        assert job.settings is not None
        # What a search consumer loads the query model from must name the new
        # model too (its weight check fails against the new digest otherwise), and
        # its window and query prompt: a revision of the old model must not stay.
        properties = {
            k: v
            for k, v in tables.properties(spark, cfg.target).items()
            if k != MODEL_REVISION_PROPERTY
        }
        properties.update(job.consumer_properties())
        properties[MODEL_PROPERTY] = job.model_identity
        properties[SETTINGS_PROPERTY] = job.settings.to_json()
        properties[DIM_PROPERTY] = str(job.dim)
        view = "deltavec_reembed_rows"
        final.createOrReplaceTempView(view)
        name = cfg.target.sql_name
        listed = ", ".join(f"'{_sql(k)}' = '{_sql(v)}'" for k, v in sorted(properties.items()))
        order = ", ".join(f"`{k}`" for k in keys)
        # Sorted by key in files of the job's size: the layout its MERGE relies on.
        layout = Layout(
            max_rows_per_file=cfg.target.max_rows_per_file,
            deletion_vectors=target_deletion_vectors(
                spark, cfg.target, default=cfg.target.deletion_vectors
            ),
        )
        with session_settings(
            spark, {"spark.sql.files.maxRecordsPerFile": str(layout.rows_per_file)}
        ):
            spark.sql(
                f"CREATE OR REPLACE TABLE {name} USING delta TBLPROPERTIES ({listed}) "
                f"AS SELECT * FROM {view} ORDER BY {order}"
            )
        spark.catalog.dropTempView(view)

    def _requarantine(self, rows: DataFrame, staging: TableRef) -> None:
        """Quarantine the rows the new model failed on; release those it embedded.

        Runs after the swap, so between the two commits a failed key is in neither
        table and a recovered one in both (as between a batch's commits). A re-run
        after a crash in between finds the target swapped and skips this; the
        next batch that touches those keys settles them.
        """
        from pyspark.sql import functions as F

        cfg = self.config
        spark = self.spark
        keys = list(cfg.source.key)
        quarantine = cfg.target.quarantine
        if not tables.exists(spark, quarantine):
            return
        staged = tables.read(spark, staging).select(
            *keys,
            BATCH_TEXT_HASH,
            F.col(EMBEDDING).isNotNull().alias("_ok"),
            ERROR_CODE,
            ERROR_MESSAGE,
        )
        outcome = rows.join(staged, on=[*keys, BATCH_TEXT_HASH], how="inner")
        failed = outcome.where(~F.col("_ok")).select(
            F.col(KEY_JSON).alias("key"),
            F.col(BATCH_SOURCE_VERSION).cast("long").alias("source_version"),
            F.col(ERROR_CODE).alias("reason"),
            F.col(ERROR_MESSAGE).alias("message"),
            F.substring(F.col(TEXT), 1, VALUE_CHARS).alias("value"),
            F.length(F.col(TEXT)).cast("long").alias("value_length"),
            F.lit(None).cast("long").alias("batch_id"),
            F.current_timestamp().alias("quarantined_at"),
            F.lit(False).alias("_clear"),
        )
        held = tables.read(spark, quarantine).select("key")
        recovered = (
            outcome.where(F.col("_ok"))
            .select(F.col(KEY_JSON).alias("key"))
            .join(held, on="key", how="left_semi")
            .withColumn("_clear", F.lit(True))
        )
        source = failed.unionByName(recovered, allowMissingColumns=True)
        columns = [c for c in failed.columns if c != "_clear"]
        (
            tables.delta_table(spark, quarantine)
            .alias("q")
            .merge(source.alias("s"), f"q.key = s.key AND q.reason <> '{changes.NULL_KEY}'")
            .whenMatchedDelete(condition="s._clear")
            .whenMatchedUpdate(condition="NOT s._clear", set={c: f"s.`{c}`" for c in columns})
            .whenNotMatchedInsert(condition="NOT s._clear", values={c: f"s.`{c}`" for c in columns})
            .execute()
        )

    def _finish(self, checkpoint: Checkpoint, job: Job) -> None:
        notes = checkpoint.notes()
        notes["model"] = job.model_identity
        checkpoint.write_notes(notes)
        staging = f"{checkpoint.location}/{STAGING}"
        fs, path = tables.hadoop_fs(self.spark, staging)
        if fs.exists(path):
            fs.delete(path, True)

    def _tell(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


def _embedded_schema(inputs: StructType) -> StructType:
    from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

    return StructType(
        [
            *[StructField(f.name, f.dataType, nullable=True) for f in inputs.fields],
            StructField(EMBEDDING, ArrayType(FloatType(), containsNull=False)),
            StructField(ERROR_CODE, StringType()),
            StructField(ERROR_MESSAGE, StringType()),
        ]
    )


def _with_names(embed: Any, schema: StructType) -> Any:
    from dataclasses import replace

    return replace(embed, output_names=tuple(schema.names))


def _sql(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")
