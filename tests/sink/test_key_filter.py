"""A batch's keys reach the Parquet reader, and the MERGE stays exact (real Spark and Delta).

A target created by the job has row groups of about 100 rows; the lookup and the
MERGE list the batch's keys, so they read only the row groups that can hold them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from benchmarks.merge_scaling import DIMENSIONS, synthetic_vectors, write_deltavec
from deltavec.columns import BATCH_SOURCE_VERSION, BATCH_TEXT_HASH, DELETE, EMBEDDING, UPSERT
from deltavec.config import TableRef
from deltavec.search import VectorIndex
from deltavec.sink import target
from deltavec.sink.key_filter import IN_LIST_VALUES, KeyFilter, key_ranges
from deltavec.sink.merge import ACTION, Layout, TargetWriter
from deltavec.sink.transactions import session_settings

pytestmark = pytest.mark.slow

DIM = DIMENSIONS  # the default model's 384: 1.5 KB a row, so row groups of about 100 rows
MODEL_ID = "test/model@0123456789abcdef"
ROWS = 3_000


def write(spark: Any, writer: TargetWriter, plan: list[tuple[int, str]], batch_id: int) -> None:
    """One batch through the writer, as the sink hands it over: lookup, then write."""
    from pyspark.sql import functions as F

    frame = spark.createDataFrame(plan, f"id long, {ACTION} string")
    upsert = F.col(ACTION) == UPSERT
    batch = frame.select(
        "id",
        ACTION,
        # Incompressible, so row groups fill as real vectors do.
        F.when(upsert, synthetic_vectors(F.col("id") + F.lit(batch_id))).alias(EMBEDDING),
        F.when(upsert, F.concat(F.col("id").cast("string"), F.lit(f"#{batch_id}"))).alias(
            BATCH_TEXT_HASH
        ),
        F.lit(batch_id).cast("long").alias(BATCH_SOURCE_VERSION),
    )
    write_deltavec(spark, writer, batch, app_id="test", batch_id=batch_id)


def new_target(spark: Any, path: Path, layout: Layout) -> TargetWriter:
    from pyspark.sql.types import LongType, StructField

    ref = TableRef(path=str(path))
    target.ensure_target(
        spark, ref, key_fields=[StructField("id", LongType())], model_identity=MODEL_ID, dim=DIM
    )
    writer = TargetWriter(target=ref, keys=["id"], model_identity=MODEL_ID, dim=DIM, layout=layout)
    write(spark, writer, [(k, UPSERT) for k in range(ROWS)], batch_id=1)
    return writer


@pytest.fixture(scope="module")
def loaded(spark: Any, tmp_path_factory: pytest.TempPathFactory) -> TargetWriter:
    return new_target(spark, tmp_path_factory.mktemp("keys") / "target", Layout())


def scanned_rows(frame: Any) -> int:
    """Rows the frame's file scan handed to Spark: what the Parquet reader did not skip."""
    plan = frame._jdf.queryExecution().executedPlan()
    leaves = plan.collectLeaves()
    total = 0
    for i in range(leaves.size()):
        leaf = leaves.apply(i)
        if "FileSourceScanExec" in leaf.getClass().getName():
            total += leaf.metrics().apply("numOutputRows").value()
    return int(total)


def test_a_new_target_is_written_in_small_row_groups(loaded: TargetWriter) -> None:
    files = list(Path(loaded.target.path or "").glob("*.parquet"))
    assert len(files) == 1  # 3,000 rows are one file of the job's 50,000-row files
    meta = pq.ParquetFile(files[0]).metadata
    assert meta.num_rows == ROWS
    assert meta.num_row_groups >= ROWS // 200


def test_a_lookup_reads_only_the_row_groups_that_can_hold_the_batch_keys(
    spark: Any, loaded: TargetWriter
) -> None:
    wanted = [7, 1_234, 2_999, 9_999]  # the last is not in the target

    def lookup(layout: Layout) -> tuple[list[int], int]:
        # One key range, 7 to 9,999, spans the whole target: only the listed keys
        # can skip row groups.
        writer = TargetWriter(
            target=loaded.target, keys=["id"], model_identity=MODEL_ID, dim=DIM, layout=layout
        )
        batch = spark.createDataFrame([(k,) for k in wanted], "id long")
        # Without adaptive execution the executed plan keeps the scan and its metrics.
        with session_settings(spark, {"spark.sql.adaptive.enabled": "false"}):
            found = writer.existing(spark, batch, writer.key_filter(batch))
            return sorted(r["id"] for r in found.collect()), scanned_rows(found)

    found, read = lookup(Layout(max_key_ranges=1))
    assert found == wanted[:3]
    assert 3 <= read <= 600  # three row groups of about 100 rows
    found, read = lookup(Layout(max_key_ranges=1, max_listed_keys=0))
    assert found == wanted[:3]
    assert read == ROWS  # the range alone reads every row


def test_keys_beyond_one_in_list_all_match(spark: Any, loaded: TargetWriter) -> None:
    from pyspark.sql import functions as F

    keys = list(range(1, ROWS, 3))  # 1,000 keys: many IN lists joined by OR
    assert len(keys) > 10 * IN_LIST_VALUES
    table = spark.read.format("delta").load(loaded.target.path)
    key_filter = KeyFilter(ranges=[(0, ROWS)], values=keys)
    got = [r["id"] for r in table.where(key_filter.predicate(F.col("id"))).collect()]
    assert sorted(got) == keys


@pytest.mark.parametrize(
    "layout",
    [
        Layout(),
        Layout(max_listed_keys=100),
        Layout(max_listed_keys=100, max_collected_keys=200),
    ],
    ids=["keys-listed", "ranges-cut-on-the-driver", "ranges-cut-by-spark"],
)
def test_a_merge_of_a_thousand_scattered_changes_is_exact(
    spark: Any, tmp_path: Path, layout: Layout
) -> None:
    writer = new_target(spark, tmp_path / "target", layout)
    updates = list(range(0, ROWS, 5))  # 600 keys across every row group
    deletes = list(range(2, ROWS, 10))  # 300
    fresh = list(range(ROWS, ROWS + 100))
    plan = [(k, UPSERT) for k in updates + fresh] + [(k, DELETE) for k in deletes]
    write(spark, writer, plan, batch_id=2)

    rows = spark.read.format("delta").load(writer.target.path).select("id", "text_hash").collect()
    hashes = {r["id"]: r["text_hash"] for r in rows}
    assert len(rows) == len(hashes)  # no key twice
    assert set(hashes) == (set(range(ROWS)) - set(deletes)) | set(fresh)
    assert all(hashes[k] == f"{k}#2" for k in updates + fresh)
    untouched = set(range(ROWS)) - set(updates) - set(deletes)
    assert all(hashes[k] == f"{k}#1" for k in untouched)
    # Search consumers read the layout without Spark (delta-rs), row for row.
    keys, _ = VectorIndex(writer.target.path or "").rows()
    assert sorted(keys.column("id").to_pylist()) == sorted(hashes)


def test_a_large_batch_gets_its_key_ranges_from_spark_not_the_driver(
    spark: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyspark.sql import functions as F

    # Count what comes back to the driver: the first batch of a big table can hold
    # tens of millions of keys, of which at most max_collected_keys + 1 may come.
    collected: list[int] = []
    frames = type(spark.range(1))  # the session's DataFrame class (classic or Connect)
    real_collect = frames.collect

    def counting_collect(self: Any) -> list[Any]:
        rows = real_collect(self)
        collected.append(len(rows))
        return rows

    monkeypatch.setattr(frames, "collect", counting_collect)
    writer = TargetWriter(
        target=TableRef(path="unused"), keys=["id"], model_identity=MODEL_ID, dim=DIM
    )
    keys = 200_000
    scattered = spark.range(keys).select((F.col("id") * 7).alias("id"))
    key_filter = writer.key_filter(scattered)
    assert key_filter is not None and key_filter.values is None
    assert 1 <= len(key_filter.ranges) <= writer.layout.max_key_ranges
    assert max(collected) <= writer.layout.max_collected_keys + 1
    # Every key is inside a range, and the ranges stay within the keys' span.
    covered = F.lit(False)
    for lo, hi in key_filter.ranges:
        covered = covered | F.col("id").between(lo, hi)
    assert real_collect(scattered.where(~covered).agg(F.count("*")))[0][0] == 0
    assert key_filter.ranges[0][0] == 0 and key_filter.ranges[-1][1] == 7 * (keys - 1)

    # A batch of fewer keys than the driver takes gets ranges cut from every key.
    middle = spark.range(5_000).select((F.col("id") * 7).alias("id"))
    middle_filter = writer.key_filter(middle)
    assert middle_filter is not None and middle_filter.values is None
    assert middle_filter.ranges == key_ranges(
        [7 * i for i in range(5_000)], writer.layout.max_key_ranges
    )

    # Consecutive keys collapse into one range; string keys are cut into ranges too.
    contiguous = writer.key_filter(spark.range(keys))
    assert contiguous is not None and contiguous.ranges == [(0, keys - 1)]
    words = spark.range(keys).select(F.format_string("key-%07d", "id").alias("id"))
    text_filter = writer.key_filter(words)
    assert text_filter is not None
    assert len(text_filter.ranges) <= writer.layout.max_key_ranges
    assert text_filter.ranges[0][0] == "key-0000000"
    assert text_filter.ranges[-1][1] == f"key-{keys - 1:07d}"
    assert max(collected) <= writer.layout.max_collected_keys + 1
