"""The keys of one micro-batch as literal terms on the target's first key column.

Delta prunes the target's files by their min/max statistics on ``BETWEEN`` terms,
and the Parquet reader skips row groups whose statistics hold none of an ``IN``
list's values; both need the batch's keys as literals in the plan. See
``deltavec.sink.merge`` for how the MERGE and the lookup use them.

This module imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

PARQUET_IN_THRESHOLD = "spark.sql.parquet.pushdown.inFilterThreshold"
# Batches with at most this many distinct keys list them for row-group skipping,
# as IN lists of at most IN_LIST_VALUES keys joined by a balanced OR. Spark hands
# an IN list to Parquet as a chain of ORs as deep as the list is long (a list of
# 700 overflowed a task's stack), and only up to the session's
# PARQUET_IN_THRESHOLD values; Delta turns each list into one range for file
# pruning, and past about 100 terms its generated pruning code outgrows the JVM's
# method size limit (see ``max_key_ranges``).
LISTED_KEYS = 2_048
IN_LIST_VALUES = 64
# A batch with up to this many distinct keys brings them to the driver (a few MB
# at most), which cuts its ranges from every key across the largest gaps: one more
# Spark job, where a range partitioning costs three and RANGE_PARTITIONS_PER_RANGE *
# max_ranges tasks (4.7 s of an 8,000-key batch on two cores).
COLLECTED_KEYS = 65_536
# A batch with more keys than that is cut by Spark into this many range
# partitions per key range it may use: the finer cut lets the driver join them
# across the largest gaps, from a bounded number of rows.
RANGE_PARTITIONS_PER_RANGE = 4


@dataclass(frozen=True)
class KeyFilter:
    """The target rows one batch can touch, as literal terms on the first key column.

    Attributes:
        ranges: closed ranges covering the batch's keys, for Delta's file pruning.
        values: the keys themselves, for the Parquet reader's row-group skipping;
            None when the batch has too many.
    """

    ranges: list[tuple[Any, Any]]
    values: list[Any] | None = None

    def predicate(self, column: Column) -> Column:
        condition = ranges_predicate(column, self.ranges)
        if self.values:
            ordered = sorted(self.values)
            lists = [
                column.isin(ordered[i : i + IN_LIST_VALUES])
                for i in range(0, len(ordered), IN_LIST_VALUES)
            ]
            condition = condition & balanced_or(lists)
        return condition


def key_ranges(values: Sequence[Any], max_ranges: int) -> list[tuple[Any, Any]]:
    """Cover sorted distinct key values with at most ``max_ranges`` closed ranges.

    Runs of consecutive integers become one range. Beyond ``max_ranges``, numeric
    keys are joined across the smallest gaps first (so the ranges cover as little
    of the key space as possible); other types are cut into equal runs.
    """
    ordered = sorted({v for v in values if v is not None})
    return merge_ranges([(v, v) for v in ordered], max_ranges)


def merge_ranges(ranges: Sequence[tuple[Any, Any]], max_ranges: int) -> list[tuple[Any, Any]]:
    """Join sorted, disjoint closed ranges into at most ``max_ranges``.

    Integer ranges that touch (one ends at n, the next starts at n + 1) become one.
    Beyond ``max_ranges``, numeric ranges are joined across the smallest gaps first;
    others are cut into runs of equal count.
    """
    if not ranges:
        return []
    runs: list[tuple[Any, Any]] = []
    integers = all(_is_int(lo) and _is_int(hi) for lo, hi in ranges)
    for lo, hi in ranges:
        if integers and runs and lo == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    if len(runs) <= max_ranges:
        return runs
    if all(isinstance(lo, int | float | Decimal) for lo, _ in runs):
        gaps = sorted(range(1, len(runs)), key=lambda i: runs[i][0] - runs[i - 1][1])
        cuts = sorted(gaps[len(gaps) - (max_ranges - 1) :]) if max_ranges > 1 else []
    else:
        step = len(runs) / max_ranges
        cuts = sorted({math.ceil(i * step) for i in range(1, max_ranges)} - {0})
    merged = []
    start = 0
    for cut in [*cuts, len(runs)]:
        merged.append((runs[start][0], runs[cut - 1][1]))
        start = cut
    return merged


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def frame_key_filter(
    frame: DataFrame,
    column: str,
    *,
    max_ranges: int,
    max_listed: int,
    max_collected: int = COLLECTED_KEYS,
) -> KeyFilter | None:
    """The distinct values of ``frame[column]`` as a ``KeyFilter``; None when a value
    cannot be a literal.

    At most ``max(max_listed, max_collected) + 1`` values, or
    ``RANGE_PARTITIONS_PER_RANGE * max_ranges`` partition bounds, come to the driver,
    however many keys the batch holds: the first micro-batch of a large table can
    hold tens of millions.
    """
    from pyspark.sql import functions as F

    keys = frame.select(F.col(column).alias("k")).where(F.col("k").isNotNull()).distinct()
    head = [r[0] for r in keys.limit(max_listed + 1).collect()]
    if len(head) <= max_listed:
        return listed_key_filter(head, max_ranges=max_ranges)
    if not all(literal_safe(v) for v in head):
        return None
    # Asked for only now: the small batches of a running stream keep their one
    # small collect, and only a batch of more keys pays a second job.
    if max_collected > max_listed:
        head = [r[0] for r in keys.limit(max_collected + 1).collect()]
        if not all(literal_safe(v) for v in head):
            return None
        if len(head) <= max_collected:
            return KeyFilter(ranges=key_ranges(head, max_ranges))
    # Too many keys to bring to the driver: Spark cuts them into key ranges (a range
    # partitioning, sampled) and returns each partition's smallest and largest key.
    parts = max(1, RANGE_PARTITIONS_PER_RANGE * max_ranges)
    bounds = (
        keys.repartitionByRange(parts, "k")
        .groupBy(F.spark_partition_id().alias("p"))
        .agg(F.min("k").alias("lo"), F.max("k").alias("hi"))
        .collect()
    )
    ranges = sorted((r["lo"], r["hi"]) for r in bounds)
    if not all(literal_safe(v) for pair in ranges for v in pair):
        return None
    return KeyFilter(ranges=merge_ranges(ranges, max_ranges))


def listed_key_filter(values: Collection[Any], *, max_ranges: int) -> KeyFilter | None:
    """The filter of distinct keys already on the driver; None when one cannot be a literal."""
    listed = [v for v in values if v is not None]
    if not all(literal_safe(v) for v in listed):
        return None
    return KeyFilter(ranges=key_ranges(listed, max_ranges), values=listed)


def ranges_predicate(column: Column, ranges: Sequence[tuple[Any, Any]]) -> Column:
    """``column`` within any of ``ranges``, as a balanced OR tree (deep chains overflow)."""
    from pyspark.sql import functions as F

    return balanced_or(
        [
            column == F.lit(lo) if lo == hi else column.between(F.lit(lo), F.lit(hi))
            for lo, hi in ranges
        ]
    )


def balanced_or(terms: Sequence[Column]) -> Column:
    """Any of ``terms``, as a balanced OR tree: a chain as deep as it is long
    overflows the stack of whatever walks it."""
    from pyspark.sql import functions as F

    if not terms:
        return F.lit(False)
    while len(terms) > 1:
        terms = [a | b for a, b in zip(terms[::2], terms[1::2], strict=False)] + (
            [terms[-1]] if len(terms) % 2 else []
        )
    return terms[0]


def literal_safe(value: Any) -> bool:
    return isinstance(value, int | float | str | bytes | bool | date | datetime | Decimal)
