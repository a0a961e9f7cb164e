"""Read the source Delta table as a stream, after checking it can feed this job.

``mode = "append"`` streams the table's new rows and skips commits that update or
delete rows (counted, with a warning pointing to ``changes``); ``mode =
"changes"`` streams its Change Data Feed, so updates and deletes reach the target.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from deltavec.config import DeltavecConfig, SourceConfig
from deltavec.errors import CheckpointError, DeltavecError, SchemaChangedError, SourceError
from deltavec.runtime import tables

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructField, StructType

log = logging.getLogger(__name__)

CDF_PROPERTY = "delta.enableChangeDataFeed"
# Equality must be exact for a MERGE key: floating point and nested types are not.
_KEY_TYPES = (
    "string",
    "bigint",
    "int",
    "smallint",
    "tinyint",
    "date",
    "timestamp",
    "timestamp_ntz",
    "binary",
    "boolean",
)


def check_source(spark: SparkSession, cfg: SourceConfig) -> StructType:
    """The source schema, once the table, its columns and its settings fit the config.

    Raises:
        SourceError: one line naming what is missing or unusable.
    """
    if not tables.exists(spark, cfg):
        if cfg.path and tables.path_has_files(spark, cfg.path):
            raise SourceError(f"source {cfg.name} is not a Delta table (no _delta_log)")
        raise SourceError(f"source table {cfg.name} does not exist")
    schema = tables.read(spark, cfg).schema
    columns = {f.name: f for f in schema.fields}
    for key in cfg.key:
        if key not in columns:
            raise SourceError(
                f"key column {key!r} is not in source {cfg.name} (columns: {', '.join(columns)})"
            )
        kind = columns[key].dataType.simpleString()
        if not (kind in _KEY_TYPES or kind.startswith("decimal")):
            raise SourceError(
                f"key column {key!r} has type {kind}, which cannot be a MERGE key "
                "(use a string, integer, decimal, date or timestamp column)"
            )
    for column in cfg.text_columns:
        if column not in columns:
            raise SourceError(
                f"template column {column!r} is not in source {cfg.name} "
                f"(columns: {', '.join(columns)})"
            )
    if cfg.mode == "changes":
        enabled = tables.properties(spark, cfg).get(CDF_PROPERTY, "false").lower() == "true"
        if not enabled:
            raise SourceError(
                f"source {cfg.name} does not record its Change Data Feed, which mode "
                f"'changes' reads; run ALTER TABLE ... SET TBLPROPERTIES ({CDF_PROPERTY} = true) "
                "or use mode 'append'"
            )
    return schema


def key_fields(schema: StructType, keys: list[str]) -> list[StructField]:
    by_name = {f.name: f for f in schema.fields}
    return [by_name[k] for k in keys]


def open_stream(spark: SparkSession, cfg: SourceConfig) -> DataFrame:
    """The source as a streaming DataFrame, limited per micro-batch by the config."""
    reader = spark.readStream.format("delta").option(
        "maxFilesPerTrigger", str(cfg.max_files_per_trigger)
    )
    if cfg.max_bytes_per_trigger:
        reader = reader.option("maxBytesPerTrigger", cfg.max_bytes_per_trigger)
    if cfg.mode == "changes":
        reader = reader.option("readChangeFeed", "true")
    else:
        # Updates and deletes would fail a plain Delta stream; in append mode they
        # are skipped (and counted by the metrics listener) instead.
        reader = reader.option("skipChangeCommits", "true")
    return tables.read_stream(reader, cfg)


_SCHEMA_CHANGE_MARKERS = (
    "DELTA_SCHEMA_CHANGED",
    "DELTA_STREAMING_INCOMPATIBLE_SCHEMA_CHANGE",
    "DELTA_STREAMING_CANNOT_CONTINUE_PROCESSING_POST_SCHEMA_EVOLUTION",
    "DELTA_STREAMING_METADATA_EVOLUTION",
    "SchemaChangedError",
)


def explain_stream_failure(error: BaseException, config: DeltavecConfig) -> BaseException:
    """A one-line DeltavecError for stream failures a user can fix; other errors unchanged."""
    text = str(error)
    if "DIFFERENT_DELTA_TABLE_READ_BY_STREAMING_SOURCE" in text:
        return CheckpointError(
            f"checkpoint {config.checkpoint.location} was created for a different source table "
            f"than {config.source.name}; point checkpoint.location at a new folder for this "
            "source (the target stays correct: unchanged rows are not embedded again)"
        )
    if any(marker in text for marker in _SCHEMA_CHANGE_MARKERS):
        detail = _our_message(text, "SchemaChangedError")
        return SchemaChangedError(
            detail
            or f"source {config.source.name} changed its schema while the job was running; "
            "the stream stopped before writing the affected batch. Check source.key and "
            "source.template against the new columns, then restart"
        )
    for name in ("SourceError", "TargetError", "ModelError", "CheckpointError"):
        detail = _our_message(text, name)
        if detail:
            return DeltavecError(detail)
    return error


def _our_message(text: str, name: str) -> str | None:
    """The message of a deltavec error raised inside foreachBatch, from Spark's wrapper text."""
    marker = f"deltavec.errors.{name}: "
    if marker not in text:
        return None
    return text.split(marker, 1)[1].splitlines()[0].strip()


def check_batch_columns(columns: list[str], cfg_keys: list[str], text_columns: list[str]) -> None:
    """Raise SchemaChangedError if a micro-batch lacks a key or template column."""
    missing = [c for c in [*cfg_keys, *text_columns] if c not in columns]
    if missing:
        raise SchemaChangedError(
            f"the source no longer has column(s) {', '.join(missing)}, which source.key or "
            "source.template read; the stream stopped before writing this batch. Update the "
            "config (or restore the columns) and restart"
        )
