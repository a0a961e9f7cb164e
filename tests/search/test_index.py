"""VectorIndex on real Delta tables written by delta-rs: load, exact top-k, refresh, refusals.

The tables here carry synthetic vectors (no model), so each test runs in
seconds; tests/search/test_search_pipeline.py does the same against the job's output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, TableFeatures, write_deltalake

from deltavec.errors import DeltavecError, ModelError, TargetError
from deltavec.search import VectorIndex
from deltavec.search.semantic import open_search

DIM = 32
MODEL_ID = "test/model@0123456789abcdef"


def unit_vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def target_rows(ids: np.ndarray, vectors: np.ndarray, model: str = MODEL_ID) -> pa.Table:
    """Rows in the target's layout (keys, embedding, model, dim)."""
    n, dim = vectors.shape
    offsets = pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "embedding": pa.ListArray.from_arrays(offsets, pa.array(vectors.ravel())),
            "model": pa.array([model] * n),
            "dim": pa.array([dim] * n, pa.int32()),
        }
    )


def write_target(
    path: Path, ids: np.ndarray, vectors: np.ndarray, *, model: str = MODEL_ID, **props: str
) -> None:
    """Append rows; a new table gets the deltavec properties the job writes."""
    new = not (path / "_delta_log").exists()
    write_deltalake(str(path), target_rows(ids, vectors, model), mode="append")
    if new:
        # delta-rs refuses unknown keys at create time; ALTER accepts them.
        DeltaTable(str(path)).alter.set_table_properties(
            {
                "deltavec.model": model,
                "deltavec.keys": "id",
                "deltavec.dim": str(vectors.shape[1]),
                **props,
            },
            raise_if_not_exists=False,
        )


def merge(path: Path, ids: np.ndarray, vectors: np.ndarray, model: str = MODEL_ID) -> None:
    """Upsert by id, as the job's MERGE does (matched rows' files are rewritten)."""
    (
        DeltaTable(str(path))
        .merge(target_rows(ids, vectors, model), "t.id = s.id", source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )


def brute_force(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    scores = vectors @ query
    order = np.lexsort((ids, -scores))
    return [int(ids[i]) for i in order[:k]]


def table_state(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the table as delta-rs reads it now, sorted by id."""
    data = DeltaTable(str(path)).to_pyarrow_table(columns=["id", "embedding"]).sort_by("id")
    ids = data.column("id").to_numpy()
    vectors = np.array(data.column("embedding").to_pylist(), dtype=np.float32)
    return ids, vectors


@pytest.fixture
def five_files(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 2,500-row target written as five commits of 500 rows (five data files)."""
    path = tmp_path / "target"
    vectors = unit_vectors(2500, seed=1)
    for i in range(5):
        rows = slice(500 * i, 500 * (i + 1))
        write_target(path, np.arange(2500)[rows], vectors[rows])
    return path, vectors


def test_exact_search_returns_the_true_top_k_with_scores(
    five_files: tuple[Path, np.ndarray],
) -> None:
    path, vectors = five_files
    index = VectorIndex(str(path))
    assert (len(index), index.dim, index.keys, index.model_identity) == (
        2500,
        DIM,
        ["id"],
        MODEL_ID,
    )
    for query in unit_vectors(20, seed=2):
        hits = index.search(query, k=10)
        assert [h.key["id"] for h in hits] == brute_force(np.arange(2500), vectors, query, 10)
        expected = np.sort(vectors @ query)[::-1][:10]
        np.testing.assert_allclose([h.score for h in hits], expected, rtol=1e-5)
    assert index.search(vectors[123], k=1)[0].key == {"id": 123}
    assert len(index.search(vectors[0], k=10_000)) == 2500


def test_refresh_after_merge_and_delete_reads_only_the_files_they_rewrote(
    five_files: tuple[Path, np.ndarray],
) -> None:
    path, _ = five_files
    index = VectorIndex(str(path))
    # 40 updates that all live in the third file, 60 new keys, then a delete in the first.
    updated = np.concatenate([np.arange(1000, 1040), np.arange(5000, 5060)])
    merge(path, updated, unit_vectors(100, seed=3))
    DeltaTable(str(path)).delete("id < 7")

    report = index.refresh()

    assert (report.from_version, report.to_version) == (5, 7)
    assert (report.files_removed, report.rows_removed) == (2, 1000)
    assert report.files_added == 2 and report.rows_added == 500 + 60 + 493
    ids, vectors = table_state(path)
    assert len(index) == len(ids) == 2500 + 60 - 7
    for query in [*unit_vectors(20, seed=4), vectors[ids == 1005][0]]:
        assert [h.key["id"] for h in index.search(query, k=10)] == brute_force(
            ids, vectors, query, 10
        )
    assert index.search(vectors[ids == 1005][0], k=1)[0].key == {"id": 1005}
    assert index.refresh().files_added == 0  # nothing new: nothing read


def test_refresh_keeps_serving_the_old_version_when_a_commit_brings_another_model(
    five_files: tuple[Path, np.ndarray],
) -> None:
    path, vectors = five_files
    index = VectorIndex(str(path))
    write_target(path, np.arange(9000, 9010), unit_vectors(10, seed=5), model="other/model@ff")

    with pytest.raises(TargetError, match="mixes vectors of 2 models") as raised:
        index.refresh()

    assert "\n" not in str(raised.value)
    assert (index.version, len(index)) == (5, 2500)
    assert index.search(vectors[42], k=1)[0].key == {"id": 42}
    with pytest.raises(TargetError, match="mixes vectors of 2 models"):
        VectorIndex(str(path))


def test_compaction_after_many_rewrites_keeps_the_same_answers(tmp_path: Path) -> None:
    path = tmp_path / "target"
    write_target(path, np.arange(300), unit_vectors(300, seed=6))
    index = VectorIndex(str(path))
    for round_ in range(4):  # each MERGE rewrites the whole (one-file) table
        merge(path, np.arange(round_ * 10, round_ * 10 + 10), unit_vectors(10, seed=10 + round_))
        index.refresh()
    assert index.slots == len(index) == 300  # dead rows were dropped, not kept
    ids, vectors = table_state(path)
    for query in unit_vectors(10, seed=7):
        assert [h.key["id"] for h in index.search(query, k=5)] == brute_force(
            ids, vectors, query, 5
        )


def test_a_table_feature_the_reader_cannot_read_is_refused_in_one_line(
    five_files: tuple[Path, np.ndarray],
) -> None:
    path, _ = five_files
    index = VectorIndex(str(path))
    # Column mapping stores columns under physical names that a plain Parquet read
    # would not find; deletion vectors, by contrast, the reader applies itself.
    DeltaTable(str(path)).alter.add_feature(
        TableFeatures.ColumnMapping, allow_protocol_versions_increase=True
    )

    with pytest.raises(TargetError) as on_refresh:
        index.refresh()
    with pytest.raises(TargetError) as on_open:
        VectorIndex(str(path))

    for raised in (on_refresh, on_open):
        message = str(raised.value)
        assert "columnMapping" in message and str(path) in message and "\n" not in message
    assert len(index) == 2500  # still answering from the version it had


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: None, "is not a Delta table"),
        (
            lambda p: write_deltalake(str(p), pa.table({"id": [1]})),
            r"is not a deltavec target \(no deltavec.keys table property\)",
        ),
    ],
)
def test_a_path_that_is_not_a_target_is_refused_in_one_line(
    tmp_path: Path, make: Any, expected: str
) -> None:
    make(tmp_path / "t")
    with pytest.raises(TargetError, match=expected) as raised:
        VectorIndex(str(tmp_path / "t"))
    assert "\n" not in str(raised.value)


def test_a_model_with_other_weights_than_the_targets_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "target"
    # The default model's label, with a digest of weights that are not its own.
    identity = "sentence-transformers/all-MiniLM-L6-v2@0000000000000000"
    write_target(path, np.arange(3), unit_vectors(3, 8, dim=384), model=identity)

    with pytest.raises(ModelError, match=r"is not the model target .* was embedded with") as raised:
        open_search(str(path))
    assert "sentence-transformers/all-MiniLM-L6-v2@0000000000000000" in str(raised.value)
    assert isinstance(raised.value, DeltavecError) and "\n" not in str(raised.value)


def test_approximate_search_recall_and_refresh(tmp_path: Path) -> None:
    # Clustered vectors, like real embeddings (uniform random ones have no neighbours).
    rng = np.random.default_rng(9)
    centres = unit_vectors(64, seed=10)
    noisy = centres[rng.integers(0, 64, 20_000)] + 0.35 * unit_vectors(20_000, seed=11)
    vectors = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    path = tmp_path / "target"
    write_target(path, np.arange(20_000), vectors)
    index = VectorIndex(str(path))
    index.use_approximate()

    queries = vectors[rng.integers(0, 20_000, 200)] + 0.1 * unit_vectors(200, seed=12)
    found = [{h.key["id"] for h in index.search(q, 10)} for q in queries]
    truth = [{h.key["id"] for h in index.search(q, 10, exact=True)} for q in queries]
    recall = np.mean([len(f & t) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.9, recall

    moved = unit_vectors(5, seed=13)
    merge(path, np.array([7, 8, 9, 70_000, 70_001]), moved)
    index.refresh()
    assert [index.search(v, 1)[0].key["id"] for v in moved] == [7, 8, 9, 70_000, 70_001]
    assert len(index) == 20_002


def test_searches_on_other_threads_keep_answering_while_refresh_runs(
    five_files: tuple[Path, np.ndarray],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path, _ = five_files
    index = VectorIndex(str(path))
    queries = unit_vectors(50, seed=14)
    stop = False

    def keep_searching() -> int:
        answered = 0
        while not stop:
            for q in queries:
                hits = index.search(q, k=10)
                assert len(hits) == 10 and all(np.isfinite(h.score) for h in hits)
                answered += 1
        return answered

    with ThreadPoolExecutor(2) as pool:
        searchers = [pool.submit(keep_searching) for _ in range(2)]
        for round_ in range(6):  # rewrites, inserts, and a compaction along the way
            merge(path, np.arange(round_ * 400, round_ * 400 + 50), unit_vectors(50, 20 + round_))
            index.refresh()
        stop = True
        answered = [s.result() for s in searchers]

    assert min(answered) > 0
    ids, vectors = table_state(path)
    assert [h.key["id"] for h in index.search(queries[0], 10)] == brute_force(
        ids, vectors, queries[0], 10
    )
