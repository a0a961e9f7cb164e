"""The quarantine writer: one row per source key that currently cannot be embedded.

A row lands here with its reason (``empty_text``, ``null_key``, the model's error
code), a message and the first characters of its text, and leaves again as soon as
its key embeds or is deleted. Its MERGE carries the same (app id, batch id) as the
target's writes, so a replayed batch changes nothing twice.

This module imports no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltavec.columns import (
    BATCH_SOURCE_VERSION,
    DELETE,
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
from deltavec.runtime import tables
from deltavec.sink.transactions import retry_conflicts, transaction
from deltavec.source import changes

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

# The quarantine keeps the start of a failing text, enough to recognise it.
VALUE_CHARS = 1000


class QuarantineWriter:
    """Upserts a batch's failures into the quarantine table and clears recovered keys.

    Args:
        quarantine: the quarantine table.
        keys: the source's key columns (named in the messages).
        text_columns: the template's columns (named in the messages).
    """

    def __init__(self, *, quarantine: TableRef, keys: list[str], text_columns: list[str]) -> None:
        self.quarantine = quarantine
        self.keys = keys
        self.text_columns = text_columns

    def write(
        self,
        spark: SparkSession,
        acts: DataFrame,
        embedded: DataFrame,
        *,
        app_id: str,
        batch_id: int,
        any_new: bool,
    ) -> None:
        """Upsert this batch's failures; clear keys that now embed or were deleted.

        Args:
            acts: the batch's actions (``deltavec.source.changes``).
            embedded: the model's output rows, failed ones with an error code.
            app_id: the writer's Delta txn app id.
            batch_id: the micro-batch id, the Delta txn version.
            any_new: the batch quarantines at least one row, or removes a keyless
                row's (by its text); without one, the MERGE only clears keys, and is
                skipped when the quarantine holds none of the batch's keys.
        """
        from pyspark.sql import functions as F

        if not any_new and not self._holds_any(spark, acts):
            return
        upserts = acts.where(F.col(OP) == UPSERT)
        problems = upserts.where(F.col(PROBLEM).isNotNull() & ~F.col(IS_DUPLICATE)).select(
            F.col(KEY_JSON),
            F.col(BATCH_SOURCE_VERSION),
            F.col(PROBLEM).alias("reason"),
            problem_message(self.keys, self.text_columns).alias("message"),
            F.col(TEXT),
        )
        failures = embedded.where(F.col(ERROR_CODE).isNotNull()).select(
            F.col(KEY_JSON),
            F.col(BATCH_SOURCE_VERSION),
            F.col(ERROR_CODE).alias("reason"),
            F.col(ERROR_MESSAGE).alias("message"),
            F.col(TEXT),
        )
        bad = problems.unionByName(failures).select(
            F.col(KEY_JSON).alias("key"),
            F.col(BATCH_SOURCE_VERSION).alias("source_version"),
            F.col("reason"),
            F.col("message"),
            *_value(F.col(TEXT)),
            F.lit(batch_id).cast("long").alias("batch_id"),
            F.current_timestamp().alias("quarantined_at"),
            F.lit(False).alias("_clear"),
        )
        failed_keys = bad.select("key")
        cleared = (
            acts.where(~F.col(IS_DUPLICATE) & F.col(PROBLEM).isNull())
            .select(F.col(KEY_JSON).alias("key"))
            .join(failed_keys, on="key", how="left_anti")
            .withColumn("_clear", F.lit(True))
        )
        # A keyless row has no key to find its quarantine row by, only its text: the
        # deletes and preimages of keyless rows take out the row with the same text.
        # Within the batch, an add and a removal of the same text cancel first (a
        # multiset difference: the n-th removal cancels the n-th add), so an insert
        # followed by an edit leaves one row, of the newer text.
        removed = _numbered(
            acts.where((F.col(OP) == DELETE) & (F.col(PROBLEM) == changes.NULL_KEY)).select(
                F.col(KEY_JSON).alias("key"), *_value(F.col(TEXT))
            )
        )
        added = _numbered(bad.where(F.col("reason") == changes.NULL_KEY))
        still_added = added.join(removed, on=[*_TEXT_ID, "_n"], how="left_anti").drop("_n")
        still_removed = (
            removed.join(added, on=[*_TEXT_ID, "_n"], how="left_anti")
            .select(*_TEXT_ID)
            .distinct()  # one source row per quarantine row the MERGE may match
            .withColumn("_clear", F.lit(True))
            .withColumn("_keyless", F.lit(True))
        )
        source = (
            bad.where(F.col("reason") != changes.NULL_KEY)
            .unionByName(still_added)
            .unionByName(cleared, allowMissingColumns=True)
            .unionByName(still_removed, allowMissingColumns=True)
            .withColumn("_keyless", F.coalesce(F.col("_keyless"), F.lit(False)))
        )
        columns = [c for c in bad.columns if c != "_clear"]
        condition = (
            f"(q.key = s.key AND s.reason IS DISTINCT FROM '{changes.NULL_KEY}' AND NOT s._keyless)"
            f" OR (s._keyless AND q.reason = '{changes.NULL_KEY}' AND q.key = s.key"
            " AND q.value <=> s.value AND q.value_length <=> s.value_length)"
        )

        def merge() -> None:
            with transaction(spark, app_id, batch_id):
                (
                    tables.delta_table(spark, self.quarantine)
                    .alias("q")
                    .merge(source.alias("s"), condition)
                    .whenMatchedDelete(condition="s._clear")
                    .whenMatchedUpdate(
                        condition="NOT s._clear", set={c: f"s.`{c}`" for c in columns}
                    )
                    .whenNotMatchedInsert(
                        condition="NOT s._clear", values={c: f"s.`{c}`" for c in columns}
                    )
                    .execute()
                )

        retry_conflicts(merge, what=f"MERGE of batch {batch_id} into {self.quarantine.name}")

    def _holds_any(self, spark: SparkSession, acts: DataFrame) -> bool:
        """Whether the quarantine holds a key of this batch (which it would then clear)."""
        from pyspark.sql import functions as F

        # The log answers for an empty quarantine, the usual case, without a scan.
        if tables.detail(spark, self.quarantine).get("numFiles", 0) == 0:
            return False
        keys = acts.where(~F.col(IS_DUPLICATE) & F.col(PROBLEM).isNull()).select(
            F.col(KEY_JSON).alias("key")
        )
        held = tables.read(spark, self.quarantine).select("key").join(keys, "key", "left_semi")
        return bool(held.limit(1).collect())


# What identifies a keyless row's quarantine entry: its key JSON (all nulls) and text.
_TEXT_ID = ["key", "value", "value_length"]


def _numbered(frame: DataFrame) -> DataFrame:
    """``frame`` with ``_n``: 1, 2, ... among the rows of the same ``_TEXT_ID``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy(*_TEXT_ID).orderBy(*_TEXT_ID)
    return frame.withColumn("_n", F.row_number().over(order))


def _value(text: Column) -> list[Column]:
    """The quarantine's ``value`` (the start of the text) and ``value_length``."""
    from pyspark.sql import functions as F

    return [
        F.substring(text, 1, VALUE_CHARS).alias("value"),
        F.length(text).cast("long").alias("value_length"),
    ]


def problem_message(keys: list[str], text_columns: list[str]) -> Column:
    from pyspark.sql import functions as F

    return (
        F.when(
            F.col(PROBLEM) == changes.NULL_KEY,
            F.lit(f"a key column ({', '.join(keys)}) is null"),
        )
        .when(
            F.col(PROBLEM) == changes.EMPTY_TEXT,
            F.lit(f"every template column ({', '.join(text_columns)}) is null, empty or blank"),
        )
        .otherwise(F.col(PROBLEM))
    )
