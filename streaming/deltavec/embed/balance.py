"""Dealing a micro-batch's texts to the task slots so every slot gets the same work.

The model's cost grows with a text's length, and a micro-batch waits for its
slowest task. Spreading rows round-robin gives every slot the same number of
rows, but not the same number of tokens: on the benchmark mix, two tasks of
1,000 rows held 62,000 and 67,000 tokens, and one core sat idle for the last
1.3 of 17 seconds. Here each input partition sorts its rows by length, longest
first, and deals them to the slots in snake order (0, 1, ..., n-1, n-1, ..., 0),
so every slot receives about the same number of characters from every input
partition, with one shuffle, as before.

Spark's ``repartition(n, column)`` places a row by ``pmod(hash(column), n)``, so
the slot numbers are first mapped to values that hash to exactly those
partitions; hashing the slot numbers themselves would put two slots in one
partition as often as not.

This module imports no torch.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

# A record's number within its partition: monotonically_increasing_id puts the
# partition id above bit 33 and the record number below it.
_RECORD_BITS = (1 << 33) - 1
_SLOT = "_slot"
_RECORD = "_record"

_slot_values: dict[int, list[int]] = {}
_slot_values_lock = threading.Lock()


def spread_by_length(frame: DataFrame, *, slots: int, text: str, keys: list[str]) -> DataFrame:
    """``frame`` in ``slots`` partitions holding about the same number of characters.

    Args:
        frame: the rows to embed.
        slots: partitions wanted, one per task slot.
        text: the column whose length stands for the model's work.
        keys: columns that break ties between equally long texts, so the order of
            dealing (and with it the partitioning) is the same when Spark recomputes
            a partition.
    """
    from pyspark.sql import functions as F

    slots = max(1, slots)
    values = slot_values(frame.sparkSession, slots)
    # The record number gets a column of its own: the expression below reads it
    # twice, and each evaluation of monotonically_increasing_id counts one up.
    turn = F.pmod(F.col(_RECORD).bitwiseAND(F.lit(_RECORD_BITS)), F.lit(2 * slots))
    slot = F.when(turn < slots, turn).otherwise(F.lit(2 * slots - 1) - turn)
    targets = F.array(*[F.lit(v).cast("long") for v in values])
    longest_first: list[Column | str] = [F.length(F.col(text)).desc_nulls_last(), *keys]
    return (
        frame.sortWithinPartitions(*longest_first)
        .withColumn(_RECORD, F.monotonically_increasing_id())
        .withColumn(_SLOT, F.element_at(targets, (slot + 1).cast("int")))
        .repartition(slots, _SLOT)
        .drop(_RECORD, _SLOT)
        # The encoder sorts each Arrow batch by length; sorting the whole task first
        # makes each batch a narrow band of lengths, so its forward passes pad less.
        .sortWithinPartitions(*longest_first)
    )


def in_one_task(frame: DataFrame, *, text: str, keys: list[str]) -> DataFrame:
    """``frame`` in one partition, longest text first: what ``spread_by_length`` gives
    for one slot, without its shuffle (a stage of its own, about 0.1 s of a small
    batch on two cores)."""
    from pyspark.sql import functions as F

    return frame.coalesce(1).sortWithinPartitions(F.length(F.col(text)).desc_nulls_last(), *keys)


def slot_values(spark: SparkSession, slots: int) -> list[int]:
    """Longs ``v[i]`` with ``pmod(hash(v[i]), slots) == i``, i.e. that Spark's hash
    partitioning into ``slots`` partitions sends to partition ``i``.

    Computed by Spark itself (its Murmur3 with seed 42, as ``HashPartitioning``
    uses), once per process and slot count.
    """
    from pyspark.sql import functions as F

    with _slot_values_lock:
        cached = _slot_values.get(slots)
        if cached is not None:
            return cached
        found: dict[int, int] = {}
        span = 64 * slots
        while len(found) < slots:
            rows = (
                spark.range(span)
                .select(F.col("id"), F.pmod(F.hash(F.col("id")), F.lit(slots)).alias("p"))
                .groupBy("p")
                .agg(F.min("id").alias("id"))
                .collect()
            )
            found = {int(r["p"]): int(r["id"]) for r in rows}
            span *= 4
        values = [found[i] for i in range(slots)]
        _slot_values[slots] = values
        return values
