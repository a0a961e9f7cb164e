"""Key ranges that let Delta prune target files for a MERGE (pure Python, no Spark)."""

from __future__ import annotations

import itertools

from deltavec.sink.key_filter import key_ranges


def test_consecutive_integer_keys_become_one_range() -> None:
    assert key_ranges([5, 3, 4, 10, 11, 20], 10) == [(3, 5), (10, 11), (20, 20)]


def test_beyond_the_limit_the_smallest_gaps_are_joined_first() -> None:
    values = [1, 2, 100, 102, 5000, 9000]
    assert key_ranges(values, 3) == [(1, 102), (5000, 5000), (9000, 9000)]
    assert key_ranges(values, 1) == [(1, 9000)]


def test_every_key_is_covered_and_ranges_do_not_overlap() -> None:
    import random

    rng = random.Random(7)
    values = rng.sample(range(1_000_000), 3_000)
    ranges = key_ranges(values, 256)
    assert len(ranges) == 256
    assert all(lo <= hi for lo, hi in ranges)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
    assert all(any(lo <= v <= hi for lo, hi in ranges) for v in values)


def test_string_keys_are_cut_into_even_runs_and_nulls_ignored() -> None:
    values = [f"k{i:03d}" for i in range(10)] + [None]
    ranges = key_ranges(values, 3)
    assert ranges[0][0] == "k000" and ranges[-1][1] == "k009"
    assert len(ranges) == 3
    assert key_ranges([None], 3) == []
