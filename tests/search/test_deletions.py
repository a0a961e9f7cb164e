"""VectorIndex on targets with deletion vectors, written by deltavec's own MERGE in real Spark.

Vectors are synthetic (no model), so the MERGEs are the job's target-side work
(``TargetWriter``) and nothing else: the job's default layout, deletion vectors on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from deltavec.columns import BATCH_SOURCE_VERSION, BATCH_TEXT_HASH, DELETE, EMBEDDING, UPSERT
from deltavec.config import TableRef
from deltavec.search import VectorIndex
from deltavec.sink import target
from deltavec.sink.merge import ACTION, EXISTS, TARGET_HASH, Layout, TargetWriter

pytestmark = pytest.mark.slow

DIM = 8
MODEL_ID = "test/model@0123456789abcdef"


def vector(key: int, batch: int) -> list[float]:
    """A unit vector that differs per (key, batch), so an update is visible."""
    v = np.random.default_rng(key * 1000 + batch).standard_normal(DIM).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


class Target:
    """A deltavec target at ``path`` written batch by batch as the sink writes it."""

    def __init__(self, spark: Any, path: Path) -> None:
        from pyspark.sql.types import LongType, StructField

        self.spark, self.path = spark, str(path)
        ref = TableRef(path=self.path)
        target.ensure_target(
            spark,
            ref,
            key_fields=[StructField("id", LongType())],
            model_identity=MODEL_ID,
            dim=DIM,
        )  # the default: deletion vectors on
        self.writer = TargetWriter(
            target=ref,
            keys=["id"],
            model_identity=MODEL_ID,
            dim=DIM,
            layout=Layout(max_rows_per_file=50),
        )
        self.batches = 0

    def write(self, upserts: list[int], deletes: list[int] | None = None) -> None:
        from pyspark.sql import functions as F

        b = self.batches = self.batches + 1
        plan = [(k, UPSERT, vector(k, b), f"{k}#{b}", b) for k in upserts]
        # One change per key and batch, as the sink deduplicates them.
        plan += [(k, DELETE, None, None, b) for k in deletes or [] if k not in upserts]
        batch = self.spark.createDataFrame(
            plan,
            f"id long, {ACTION} string, {EMBEDDING} array<float>, "
            f"{BATCH_TEXT_HASH} string, {BATCH_SOURCE_VERSION} long",
        )
        # The target's vectors hold no null elements; Spark only casts into that
        # from an array that provably has none.
        zero = F.lit(0.0).cast("float")
        batch = batch.withColumn(EMBEDDING, F.transform(EMBEDDING, lambda x: F.coalesce(x, zero)))
        key_filter = self.writer.key_filter(batch)
        existing = self.writer.existing(self.spark, batch, key_filter)
        changes = batch.join(existing, on="id", how="left").withColumn(
            EXISTS, F.col(TARGET_HASH).isNotNull()
        )
        changes = changes.where(F.col(EXISTS) | (F.col(ACTION) == UPSERT)).drop(TARGET_HASH)
        self.writer.write(self.spark, changes, app_id="test", batch_id=b, key_filter=key_filter)

    def spark_rows(self) -> tuple[np.ndarray, np.ndarray]:
        rows = sorted(
            self.spark.read.format("delta").load(self.path).select("id", EMBEDDING).collect()
        )
        return np.array([r[0] for r in rows]), np.array([r[1] for r in rows], np.float32)

    def files(self) -> dict[str, int]:
        """Data file -> rows it holds, as the log lists them now."""
        actions = pa.table(DeltaTable(self.path).get_add_actions(flatten=True))
        return dict(
            zip(
                actions.column("path").to_pylist(),
                actions.column("num_records").to_pylist(),
                strict=True,
            )
        )

    def deletion_vectors(self) -> dict[str, list[bool]]:
        """File name -> selection vector, for files with a deletion vector."""
        out = {}
        for batch in map(pa.record_batch, DeltaTable(self.path).deletion_vectors()):
            for uri, keep in zip(
                batch.column("filepath").to_pylist(),
                batch.column("selection_vector").to_pylist(),
                strict=True,
            ):
                out[uri.rsplit("/", 1)[-1]] = keep
        return out


def index_rows(index: VectorIndex) -> tuple[np.ndarray, np.ndarray]:
    keys, vectors = index.rows()
    ids = keys.column("id").to_numpy()
    order = np.argsort(ids)
    return ids[order], vectors[order]


def assert_same_rows(
    got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]
) -> None:
    assert np.array_equal(got[0], want[0])  # no deleted row, no live row missing, no duplicate
    assert np.array_equal(got[1], want[1])  # bit for bit


@pytest.fixture
def merged(spark: Any, tmp_path: Path) -> Target:
    """400 keys in 8 files, then a MERGE updating 31 and deleting 19 scattered keys."""
    t = Target(spark, tmp_path / "target")
    t.write(list(range(400)))
    t.write(upserts=list(range(3, 400, 13)), deletes=list(range(5, 400, 20)))
    return t


def test_a_target_with_deletion_vectors_reads_exactly_as_spark_reads_it(merged: Target) -> None:
    assert "deletionVectors" in (DeltaTable(merged.path).protocol().reader_features or [])
    assert len(merged.deletion_vectors()) >= 4  # the MERGE marked rows, it did not rewrite

    index = VectorIndex(merged.path)

    ids, vectors = merged.spark_rows()
    assert len(ids) == 400 - 19 and len(index) == len(ids)  # 185 is updated, not deleted
    assert_same_rows(index_rows(index), (ids, vectors))
    updated = 16  # a key the MERGE updated: its new vector finds it, the old one is gone
    hits = index.search(np.array(vector(updated, 2), np.float32), k=2)
    assert hits[0].key == {"id": updated} and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert index.search(np.array(vector(updated, 1), np.float32), k=1)[0].score < 0.9999


def test_refresh_masks_rows_of_files_whose_deletion_vector_grew_without_reading_them(
    merged: Target,
) -> None:
    index = VectorIndex(merged.path)
    files_before, vectors_before = merged.files(), merged.deletion_vectors()

    merged.write(upserts=[*range(1, 400, 17), 500, 501], deletes=list(range(2, 400, 23)))
    merged.write(upserts=[], deletes=[0, 7, 9, 100])
    report = index.refresh()

    files_after, vectors_after = merged.files(), merged.deletion_vectors()
    new_files = files_after.keys() - files_before.keys()
    grown = {
        name
        for name, keep in vectors_after.items()
        if name in files_before and vectors_before.get(name) != keep
    }
    assert grown and not grown & new_files
    assert report.files_added == len(new_files)  # only the genuinely new files were read
    assert report.rows_added == sum(files_after[f] for f in new_files)
    assert report.files_masked == len(grown)
    assert report.files_removed == len(files_before.keys() - files_after.keys())
    assert not report.full_reload

    want = merged.spark_rows()
    assert_same_rows(index_rows(index), want)
    assert_same_rows(index_rows(VectorIndex(merged.path)), want)
    assert len(index) == len(want[0])
    assert index.refresh().rows_masked == 0  # nothing new: nothing masked or read


def test_the_approximate_index_drops_masked_rows_and_keeps_new_ones(merged: Target) -> None:
    pytest.importorskip("faiss")
    index = VectorIndex(merged.path)
    # Every cluster probed: the IVF index must then hold exactly the live rows.
    index.use_approximate(nlist=4, nprobe=4)
    deleted = [10, 30, 50, 77]
    merged.write(upserts=[11, 31, 600], deletes=deleted)

    report = index.refresh()

    assert report.rows_masked == len(deleted) + 2 and not report.full_reload
    live_ids = set(merged.spark_rows()[0].tolist())
    query = np.array(vector(11, 3), np.float32)
    approximate = index.search(query, k=10_000)
    assert {h.key["id"] for h in approximate} == live_ids
    assert len(approximate) == len(live_ids)  # no slot twice, no masked slot
    assert [h.key for h in approximate[:1]] == [{"id": 11}]
    assert [h.key for h in approximate] == [h.key for h in index.search(query, 10_000, exact=True)]


def test_a_new_target_gets_deletion_vectors_and_an_existing_one_keeps_its_layout(
    spark: Any, tmp_path: Path
) -> None:
    from pyspark.sql.types import LongType, StructField

    keys = [StructField("id", LongType())]
    new, old = TableRef(path=str(tmp_path / "new")), TableRef(path=str(tmp_path / "old"))
    assert target.target_deletion_vectors(spark, new, default=True) is True  # not there yet
    target.ensure_target(spark, new, key_fields=keys, model_identity=MODEL_ID, dim=DIM)
    target.ensure_target(
        spark, old, key_fields=keys, model_identity=MODEL_ID, dim=DIM, deletion_vectors=False
    )

    assert target.target_deletion_vectors(spark, new, default=False) is True
    # A target created without them stays so, whatever the config says now.
    assert target.target_deletion_vectors(spark, old, default=True) is False
