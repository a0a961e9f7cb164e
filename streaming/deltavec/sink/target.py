"""The target and quarantine tables: their schemas, creation and compatibility checks.

The target records which model made its vectors in the table property
``deltavec.model`` (weights digest and a fingerprint of the settings around
them) and the settings themselves in ``deltavec.settings``, so a job started
with another model, or the same model with another window, pooling, long-text
mode, document prompt or template, is refused before it writes a single row.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from deltavec.columns import DIM, EMBEDDED_AT, EMBEDDING, MODEL, SOURCE_VERSION, TEXT_HASH
from deltavec.config import TableRef
from deltavec.errors import TargetError
from deltavec.runtime import tables
from deltavec.sink import ownership

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
    from pyspark.sql.types import StructField, StructType

    from deltavec.embed.models import VectorSettings

MODEL_PROPERTY = "deltavec.model"
# Everything besides the weights that changed the vectors (VectorSettings, as JSON).
SETTINGS_PROPERTY = "deltavec.settings"
DIM_PROPERTY = "deltavec.dim"
KEYS_PROPERTY = "deltavec.keys"
# What a search consumer needs to query the target without the job's config:
# the model to load (checked against deltavec.model), the source and its template.
MODEL_NAME_PROPERTY = "deltavec.model_name"
MODEL_REVISION_PROPERTY = "deltavec.model_revision"
SOURCE_PROPERTY = "deltavec.source"
TEMPLATE_PROPERTY = "deltavec.template"
# The prompt search puts before a query (the document prompt is in deltavec.settings).
QUERY_PROMPT_PROPERTY = "deltavec.query_prompt"

DELETION_VECTORS_PROPERTY = "delta.enableDeletionVectors"
STATS_COLUMNS_PROPERTY = "delta.dataSkippingStatsColumns"
# Delta hands table properties to the Parquet writer of every write (append, MERGE,
# OPTIMIZE), so this one sizes the target's row groups whoever writes.
ROW_GROUP_PROPERTY = "parquet.block.size"
# Parquet checks a row group's size every 100 rows at first, so a row group holds
# at least 100 rows: about 100 with 384-dim vectors (1.5 KB a row). Small row
# groups let a lookup or a deletion-vector MERGE read only the rows near the
# batch's keys (deltavec/sink/merge.py).
ROW_GROUP_BYTES = 128 * 1024

QUARANTINE_COLUMNS = (
    "key",
    "source_version",
    "reason",
    "message",
    "value",
    "value_length",
    "batch_id",
    "quarantined_at",
)


def target_schema(key_fields: list[StructField]) -> StructType:
    from pyspark.sql.types import (
        ArrayType,
        FloatType,
        IntegerType,
        LongType,
        StringType,
        StructField,
        StructType,
        TimestampType,
    )

    return StructType(
        [
            *[StructField(f.name, f.dataType, nullable=False) for f in key_fields],
            StructField(EMBEDDING, ArrayType(FloatType(), containsNull=False), nullable=False),
            StructField(MODEL, StringType(), nullable=False),
            StructField(DIM, IntegerType(), nullable=False),
            StructField(TEXT_HASH, StringType(), nullable=False),
            StructField(SOURCE_VERSION, LongType(), nullable=True),
            StructField(EMBEDDED_AT, TimestampType(), nullable=False),
        ]
    )


def quarantine_schema() -> StructType:
    from pyspark.sql.types import LongType, StringType, StructField, StructType, TimestampType

    return StructType(
        [
            # The key columns as JSON, so one schema serves every source.
            StructField("key", StringType()),
            StructField("source_version", LongType()),
            StructField("reason", StringType(), nullable=False),
            StructField("message", StringType()),
            # The offending text, cut to its first 1,000 characters.
            StructField("value", StringType()),
            StructField("value_length", LongType()),
            StructField("batch_id", LongType()),
            StructField("quarantined_at", TimestampType(), nullable=False),
        ]
    )


def ensure_target(
    spark: SparkSession,
    ref: TableRef,
    *,
    key_fields: list[StructField],
    model_identity: str,
    dim: int,
    settings: VectorSettings | None = None,
    consumer_properties: dict[str, str] | None = None,
    deletion_vectors: bool = True,
    checkpoint: str | None = None,
) -> None:
    """Create the target if it is missing; refuse one this job cannot write.

    Args:
        settings: what besides the weights made the vectors, recorded for the checks.
        consumer_properties: more table properties for a new target, from
            ``consumer_properties()``.
        deletion_vectors: create the target with Delta deletion vectors. Set
            explicitly either way, so the table, not the platform's defaults, says
            whether they are on; ``target_deletion_vectors`` reads it back.
        checkpoint: the checkpoint location that owns the target: recorded in a new
            target, claimed in one that records none, refused if it records another.

    Raises:
        TargetError: the table exists with another schema, keys or model.
    """
    if check_target(
        spark,
        ref,
        key_fields=key_fields,
        model_identity=model_identity,
        settings=settings,
        checkpoint=checkpoint,
    ):
        if checkpoint is not None:
            ownership.claim(spark, ref, checkpoint)
        return
    _create(
        spark,
        ref,
        target_schema(key_fields),
        {
            MODEL_PROPERTY: model_identity,
            **({SETTINGS_PROPERTY: settings.to_json()} if settings else {}),
            DIM_PROPERTY: str(dim),
            KEYS_PROPERTY: ",".join(f.name for f in key_fields),
            DELETION_VECTORS_PROPERTY: str(deletion_vectors).lower(),
            # Statistics on the keys prune files for the MERGE; statistics on
            # vectors and hashes would only make the log larger.
            STATS_COLUMNS_PROPERTY: ",".join([*(f.name for f in key_fields), SOURCE_VERSION]),
            # Without deletion vectors a MERGE rewrites whole files anyway, and small
            # row groups would only make that slower.
            **({ROW_GROUP_PROPERTY: str(ROW_GROUP_BYTES)} if deletion_vectors else {}),
            **(consumer_properties or {}),
            **(
                {ownership.OWNER_PROPERTY: ownership.checkpoint_id(checkpoint)}
                if checkpoint is not None
                else {}
            ),
        },
    )
    if checkpoint is not None:
        # Two jobs creating the target at once: createIfNotExists lets both through.
        ownership.check(spark, ref, checkpoint)


def target_deletion_vectors(spark: SparkSession, ref: TableRef, *, default: bool) -> bool:
    """Whether the target's writes mark rows deleted (its table property), or
    ``default`` when there is no target yet.

    The MERGE lays out rewritten files differently with and without deletion
    vectors, so it follows the table, not the config, for a target created earlier.
    """
    if not tables.exists(spark, ref):
        return default
    value = tables.properties(spark, ref).get(DELETION_VECTORS_PROPERTY, "false")
    return value.strip().lower() == "true"


def consumer_properties(
    *,
    model_name: str,
    model_revision: str | None,
    source: TableRef,
    template: str,
    query_prompt: str = "",
) -> dict[str, str]:
    """Table properties that let ``deltavec search`` load the model and the source by itself."""
    properties = {
        MODEL_NAME_PROPERTY: model_name,
        TEMPLATE_PROPERTY: template,
        QUERY_PROMPT_PROPERTY: query_prompt,
    }
    if model_revision:
        properties[MODEL_REVISION_PROPERTY] = model_revision
    # A catalog name means nothing to a reader without the catalog.
    if source.path:
        properties[SOURCE_PROPERTY] = source.path
    return properties


def check_target(
    spark: SparkSession,
    ref: TableRef,
    *,
    key_fields: list[StructField],
    model_identity: str,
    settings: VectorSettings | None = None,
    checkpoint: str | None = None,
) -> bool:
    """Whether the target exists; raise TargetError if it exists but does not fit.

    Reads only; a job calls it before it writes anything anywhere.

    Args:
        checkpoint: the writer's checkpoint location; refused when the target
            records another one (``sink/ownership.py``).
    """
    if not _exists_as_delta(spark, ref, "target"):
        return False
    schema = tables.read(spark, ref).schema
    have = {f.name: f.dataType for f in schema.fields}
    for wanted in target_schema(key_fields).fields:
        if wanted.name not in have:
            raise TargetError(
                f"target {ref.name} has an incompatible schema: column {wanted.name} is missing"
            )
        # Types are compared without nullability: a re-embedding's CREATE OR REPLACE
        # makes every column nullable, and deltavec never writes nulls into them.
        if have[wanted.name].simpleString() != wanted.dataType.simpleString():
            raise TargetError(
                f"target {ref.name} has an incompatible schema: column {wanted.name} is "
                f"{have[wanted.name].simpleString()}, deltavec writes "
                f"{wanted.dataType.simpleString()}"
            )
    properties = tables.properties(spark, ref)
    recorded = properties.get(MODEL_PROPERTY)
    if recorded and recorded != model_identity:
        raise TargetError(mismatch(ref.name, recorded, model_identity, properties, settings))
    # After the model: what the vectors are is the first thing to get right.
    if checkpoint is not None:
        ownership.check_owner(ref, properties, checkpoint)
    return True


def mismatch(
    name: str,
    recorded: str,
    identity: str,
    properties: dict[str, str],
    settings: VectorSettings | None,
) -> str:
    """One line saying why vectors of ``identity`` do not belong in a target of ``recorded``."""
    from deltavec.embed.models import changed_setting, weights_of

    if weights_of(recorded) != weights_of(identity) or settings is None:
        return (
            f"target {name} holds vectors from model {weights_of(recorded)}, but this job uses "
            f"{weights_of(identity)}; run 'deltavec reembed --model ...' to switch models, "
            "or write to a new target"
        )
    change = changed_setting(recorded_settings(properties), settings) or "its settings"
    return (
        f"target {name} was embedded with {change}; run 'deltavec reembed' to re-embed it "
        "with the new settings, or write to a new target"
    )


def recorded_settings(properties: dict[str, str]) -> dict[str, Any]:
    """The ``deltavec.settings`` a target records; {} for a target that records none."""
    try:
        value = json.loads(properties.get(SETTINGS_PROPERTY) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def ensure_quarantine(spark: SparkSession, ref: TableRef) -> None:
    if not check_quarantine(spark, ref):
        _create(spark, ref, quarantine_schema(), {})


def check_quarantine(spark: SparkSession, ref: TableRef) -> bool:
    """Whether the quarantine table exists; raise TargetError if it cannot take rows."""
    if not _exists_as_delta(spark, ref, "quarantine table"):
        return False
    have = set(tables.read(spark, ref).columns)
    missing = [c for c in QUARANTINE_COLUMNS if c not in have]
    if missing:
        raise TargetError(
            f"quarantine table {ref.name} has an incompatible schema: missing {', '.join(missing)}"
        )
    return True


def _exists_as_delta(spark: SparkSession, ref: TableRef, role: str) -> bool:
    if tables.exists(spark, ref):
        return True
    if ref.path and tables.path_has_files(spark, ref.path):
        raise TargetError(
            f"{role} {ref.name} exists but is not a Delta table; "
            "point it at an empty folder or a deltavec table"
        )
    return False


def _create(
    spark: SparkSession, ref: TableRef, schema: StructType, properties: dict[str, str]
) -> None:
    from delta.tables import DeltaTable

    builder = DeltaTable.createIfNotExists(spark).addColumns(schema)
    builder = builder.tableName(ref.table) if ref.table else builder.location(ref.path or "")
    for key, value in properties.items():
        builder = builder.property(key, value)
    builder.execute()
