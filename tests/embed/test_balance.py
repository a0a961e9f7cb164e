"""The model work of a micro-batch is dealt evenly over the task slots."""

from __future__ import annotations

import random
from typing import Any

import pytest

from deltavec.embed.balance import in_one_task, spread_by_length


def _frame(spark: Any, rows: int, *, partitions: int, seed: int = 1) -> Any:
    """Short sentences and long paragraphs mixed, as in a real source, over a few files."""
    rng = random.Random(seed)
    data = [
        (i, "w" * (rng.randint(600, 1800) if rng.random() < 0.25 else rng.randint(20, 120)))
        for i in range(rows)
    ]
    return spark.createDataFrame(data, "id long, text string").repartition(partitions)


def _partitions(frame: Any) -> list[list[tuple[int, int]]]:
    """(id, text length) per output partition, in the order the task sees them."""
    return frame.rdd.map(lambda r: (r["id"], len(r["text"]))).glom().collect()


@pytest.mark.parametrize(("slots", "inputs"), [(2, 2), (3, 5), (4, 1)])
def test_every_slot_gets_the_same_amount_of_text(spark: Any, slots: int, inputs: int) -> None:
    frame = _frame(spark, 3_000, partitions=inputs)

    parts = _partitions(spread_by_length(frame, slots=slots, text="text", keys=["id"]))

    assert len(parts) == slots
    ids = sorted(i for part in parts for i, _ in part)
    assert ids == list(range(3_000)), "a row was lost or repeated"
    chars = [sum(length for _, length in part) for part in parts]
    # Within 1% of each other, where round-robin dealing differs by several percent.
    assert max(chars) - min(chars) <= 0.01 * max(chars), chars
    print(f"characters per slot: {chars}")


def test_each_task_sees_its_longest_texts_first(spark: Any) -> None:
    """The encoder sorts within an Arrow batch; a length-sorted task makes each batch a
    narrow band of lengths, which pads less."""
    frame = _frame(spark, 2_000, partitions=3)

    for part in _partitions(spread_by_length(frame, slots=2, text="text", keys=["id"])):
        lengths = [length for _, length in part]
        assert lengths == sorted(lengths, reverse=True)


def test_dealing_is_the_same_on_every_run(spark: Any) -> None:
    """Spark recomputes a lost partition by running the plan again: the rows must land
    in the same slots, or a recomputed task would embed rows another task also did."""
    frame = _frame(spark, 1_000, partitions=2).cache()
    spread = spread_by_length(frame, slots=3, text="text", keys=["id"])

    first = [sorted(i for i, _ in part) for part in _partitions(spread)]
    second = [sorted(i for i, _ in part) for part in _partitions(spread)]

    assert first == second
    frame.unpersist()


def test_a_small_batch_goes_to_one_task_longest_first(spark: Any) -> None:
    """What the sink does with at most ``ONE_TASK_ROWS`` rows: one task, no row lost,
    longest text first, as ``spread_by_length`` orders a slot."""
    frame = _frame(spark, 60, partitions=3)

    parts = _partitions(in_one_task(frame, text="text", keys=["id"]))

    assert len(parts) == 1
    assert sorted(i for i, _ in parts[0]) == list(range(60)), "a row was lost or repeated"
    lengths = [length for _, length in parts[0]]
    assert lengths == sorted(lengths, reverse=True)
