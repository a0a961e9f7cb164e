"""One action per key from a micro-batch of source rows or Change Data Feed records.

Rules, applied in this order:

* A ``delete`` record, and an ``update_preimage``, mean "remove this key's vector".
  An UPDATE that keeps a row's key also writes that key's postimage in the same
  commit, which wins (below); one that changes the key leaves the preimage alone
  for the old key, which is then gone from the source.
* Everything else (inserts, postimages, rows of a plain append stream) is an upsert.
* Among the records of one key, the newest source commit wins; within one commit an
  upsert wins over a delete (an overwrite deletes and re-adds the same key).
* Two upserts of one key in the same commit are a duplicate key in the source.
  The one whose text has the greatest SHA-256 wins, so every replay of the batch
  picks the same row; the others are counted (``duplicates``) and logged.
* An upsert with a null key column, or whose template columns are all blank, is
  marked with a problem code for the quarantine.
* Records with a null key cannot be collapsed by key: each is kept. An upsert adds
  its row to the quarantine; a delete or preimage (op ``delete``, problem
  ``null_key``) takes the quarantine row with the same text out again
  (``deltavec.sink.quarantine``); neither reaches the target.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltavec.columns import (
    BATCH_SOURCE_VERSION as SOURCE_VERSION,
)
from deltavec.columns import (
    BATCH_TEXT_HASH as TEXT_HASH,
)
from deltavec.columns import (
    DELETE,
    IS_DUPLICATE,
    KEY_JSON,
    OP,
    PROBLEM,
    TEXT,
    UPSERT,
)
from deltavec.source import text
from deltavec.source.commit_versions import COMMIT_VERSION

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

NULL_KEY = "null_key"
EMPTY_TEXT = "empty_text"


def actions(
    batch: DataFrame,
    *,
    keys: list[str],
    template: str,
    text_columns: list[str],
    mode: str,
    batch_version: int | None,
) -> DataFrame:
    """Collapse a micro-batch to the latest action per key.

    Args:
        batch: the rows Spark handed to ``foreachBatch``.
        keys: key columns.
        template: text template over ``text_columns``.
        text_columns: the columns the template reads.
        mode: "append" (plain rows) or "changes" (Change Data Feed records).
        batch_version: in append mode, the newest source version in this batch; rows
            carry their own commit in ``_commit_version`` where the caller added it.

    Returns:
        Key columns plus ``_op``, ``_source_version``, ``_text``, ``_text_hash``,
        ``_key_json``, ``_problem`` and ``_duplicate``; the winner of each key has
        ``_duplicate`` false, losing duplicates true.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if mode == "changes":
        is_upsert = F.col("_change_type").isin("insert", "update_postimage")
        version = F.col("_commit_version").cast("long")
    else:
        is_upsert = F.lit(True)
        # Each row's own commit where the sink found it (``commit_versions``).
        version = (
            F.col(COMMIT_VERSION)
            if COMMIT_VERSION in batch.columns
            else F.lit(batch_version).cast("long")
        )
    op = F.when(is_upsert, F.lit(UPSERT)).otherwise(F.lit(DELETE))

    rendered = text.render(template)
    null_key = any_null(keys)
    rows = batch.select(
        *[F.col(k) for k in keys],
        op.alias(OP),
        version.alias(SOURCE_VERSION),
        rendered.alias(TEXT),
        text.text_hash(rendered).alias(TEXT_HASH),
        F.to_json(F.struct(*[F.col(k) for k in keys])).alias(KEY_JSON),
        F.when(null_key, F.lit(NULL_KEY))
        .when(is_upsert & text.is_blank(text_columns), F.lit(EMPTY_TEXT))
        .alias(PROBLEM),
    )
    order = Window.partitionBy(*keys).orderBy(
        F.col(SOURCE_VERSION).desc(),
        F.when(F.col(OP) == UPSERT, 1).otherwise(0).desc(),
        F.col(TEXT_HASH).desc_nulls_last(),
    )
    ranked = rows.withColumn("_rank", F.row_number().over(order)).withColumn(
        "_winner_version", F.first(SOURCE_VERSION).over(order)
    )
    keyed = ranked.where(~null_key)
    winners = keyed.where(F.col("_rank") == 1).withColumn(IS_DUPLICATE, F.lit(False))
    losers = keyed.where(
        (F.col("_rank") > 1)
        & (F.col(OP) == UPSERT)
        & (F.col(SOURCE_VERSION) == F.col("_winner_version"))
    ).withColumn(IS_DUPLICATE, F.lit(True))
    # Rows without a key cannot be collapsed; each one goes to the quarantine.
    keyless = ranked.where(null_key).withColumn(IS_DUPLICATE, F.lit(False))
    return winners.unionByName(losers).unionByName(keyless).drop("_rank", "_winner_version")


def any_null(keys: list[str]) -> Column:
    """True when any key column is null."""
    from pyspark.sql import functions as F

    result = F.col(keys[0]).isNull()
    for key in keys[1:]:
        result = result | F.col(key).isNull()
    return result
