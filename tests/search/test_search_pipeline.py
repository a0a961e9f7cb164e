"""Search over a target the real job wrote: quality, the CLI, and four readers agreeing.

One target is built per module from the STS-B dev sentences (each distinct
sentence2 is a row), through ``Job(...).run(once=True)`` in ``changes`` mode so
that the last test can update the source and follow the job's MERGE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from deltavec.search import VectorIndex, open_search
from deltavec.search.source_table import matching_keys
from tests.conftest import read_target, write_config, write_rows

pytestmark = pytest.mark.slow


@dataclass
class StsTarget:
    root: Path
    config: Path
    texts: dict[int, str]  # id -> sentence in the source
    queries: list[tuple[str, int]]  # (sentence1, id of its sentence2) for gold >= 4.5

    @property
    def target(self) -> str:
        return str(self.root / "target")


def year_of(row_id: int) -> int:
    return 2015 + row_id % 10


@pytest.fixture(scope="module")
def sts_target(
    spark: Any, tmp_path_factory: pytest.TempPathFactory, sts_pairs: list[tuple[float, str, str]]
) -> StsTarget:
    root = tmp_path_factory.mktemp("sts_search")
    ids: dict[str, int] = {}
    for _, _, s2 in sts_pairs:
        ids.setdefault(s2, len(ids))
    rows = [{"id": i, "sentence": s, "year": year_of(i)} for s, i in ids.items()]
    write_rows(spark, root / "source", rows, schema="id long, sentence string, year int")
    # A source may use deletion vectors (Databricks turns them on by default);
    # the consumer reads it through delta-rs's scan, which must apply them.
    spark.sql(
        f"ALTER TABLE delta.`{root / 'source'}` "
        "SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')"
    )
    config = write_config(root, source={"template": "{sentence}", "mode": "changes"})
    summary = Job(load_config(config), spark).run(once=True)
    assert summary.embedded == len(rows)
    queries = [(s1, ids[s2]) for gold, s1, s2 in sts_pairs if gold >= 4.5]
    return StsTarget(root, config, {i: s for s, i in ids.items()}, queries)


def test_recall_equals_sentence_transformers_semantic_search(
    spark: Any, sts_target: StsTarget, st_model: Any
) -> None:
    import torch
    from sentence_transformers import util

    search = open_search(sts_target.target)  # the model named by the target, weights checked
    sentences = [s1 for s1, _ in sts_target.queries]
    wanted = np.array([i for _, i in sts_target.queries])
    queries = np.stack([search.embed(s) for s in sentences])
    reference = st_model.encode(sentences, normalize_embeddings=True)
    assert float(np.min(np.sum(queries * reference, axis=1))) >= 0.9999

    ours = np.array([[h.key["id"] for h in search.index.search(q, 10)] for q in queries])
    # The reference ranks the same vectors, as Spark reads them from the target.
    rows = read_target(spark, sts_target.target)
    corpus_ids = np.array([r["id"] for r in rows])
    corpus = torch.tensor(np.array([r["embedding"] for r in rows], dtype=np.float32))
    found = util.semantic_search(torch.from_numpy(queries), corpus, top_k=10)
    theirs = np.array([[corpus_ids[h["corpus_id"]] for h in hits] for hits in found])

    recall = {n: float(np.mean((ours[:, :n] == wanted[:, None]).any(axis=1))) for n in (1, 10)}
    reference_recall = {
        n: float(np.mean((theirs[:, :n] == wanted[:, None]).any(axis=1))) for n in (1, 10)
    }
    print(f"\nSTS-B dev, {len(wanted)} pairs with gold >= 4.5: recall {recall}")
    assert np.array_equal(ours, theirs)  # identical ranking, not just similar recall
    assert recall == reference_recall
    assert recall[10] > 0.9  # the pipeline kept the model's quality (measured: see the report)


def test_cli_prints_key_score_and_text(sts_target: StsTarget) -> None:
    top_text = sts_target.texts[sts_target.queries[0][1]]
    result = subprocess.run(
        _deltavec("search", top_text, "-k", "3", "--table", sts_target.target),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "COLUMNS": "400"},
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"3 nearest to {top_text!r} in {sts_target.target} (version ")
    assert lines[1].split() == ["rank", "score", "id", "text"]
    rank, score, key, text = lines[2].split(maxsplit=3)
    assert (rank, score) == ("1", "1.0000")  # the sentence itself, found by key and text
    assert sts_target.texts[int(key)] == top_text
    assert text == " ".join(top_text.split())
    assert len(lines) == 5


def test_cli_where_filters_before_ranking(sts_target: StsTarget) -> None:
    index = VectorIndex(sts_target.target)
    keys, vectors = index.rows()
    ids = keys.column("id").to_numpy()
    query_text = sts_target.queries[1][0]
    result = subprocess.run(
        _deltavec(
            "search", query_text, "-k", "7", "--config", str(sts_target.config),
            "--where", "year >= 2022 AND id % 2 = 0", "--json",
        ),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )  # fmt: skip
    out = json.loads(result.stdout)
    got = [h["key"]["id"] for h in out["hits"]]

    search = open_search(sts_target.target)
    allowed = np.array([year_of(int(i)) >= 2022 and i % 2 == 0 for i in ids])
    scores = vectors[allowed] @ search.embed(query_text)
    expected = ids[allowed][np.argsort(-scores, kind="stable")[:7]].tolist()
    assert got == expected  # seven hits, all passing the filter, in exact order
    assert all(h["text"] == sts_target.texts[h["key"]["id"]] for h in out["hits"])
    assert (out["rows"], out["model"]) == (len(ids), index.model_identity)


def test_cli_bad_filter_is_one_line_naming_the_column(sts_target: StsTarget) -> None:
    result = subprocess.run(
        _deltavec("search", "anything", "--table", sts_target.target, "--where", "yeer > 1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("deltavec: error: filter 'yeer > 1' fails on source ")
    assert "yeer" in error and "year" in error  # names the bad column and the valid ones


def test_spark_deltalake_and_duckdb_read_the_same_keys_and_vectors_across_a_merge(
    spark: Any, sts_target: StsTarget
) -> None:
    from deltalake import DeltaTable

    index = VectorIndex(sts_target.target)
    _assert_readers_agree(spark, sts_target.target, index)

    # Change 20 sentences and delete 10 rows in the source; the job MERGEs them.
    source = sts_target.root / "source"
    spark.sql(f"UPDATE delta.`{source}` SET sentence = concat('Revised: ', sentence) WHERE id < 20")
    spark.sql(f"DELETE FROM delta.`{source}` WHERE id >= 100 AND id < 110")
    summary = Job(load_config(sts_target.config), spark).run(once=True)
    assert (summary.embedded, summary.deleted) == (20, 10)

    # The target has deletion vectors (the default): the MERGE marked the 20 old
    # vectors and the 10 deleted rows in their files and wrote only the 20 new ones.
    assert list(DeltaTable(sts_target.target).deletion_vectors())
    report = index.refresh()
    assert report.to_version > report.from_version and report.files_masked >= 1
    assert (report.rows_masked, report.rows_added) == (30, 20)  # no file was read again
    _assert_readers_agree(spark, sts_target.target, index)
    keys, _ = index.rows()
    assert len(index) == len(sts_target.texts) - 10
    assert not set(range(100, 110)) & set(keys.column("id").to_pylist())

    # The DELETE left deletion vectors in the source; the filter path honours them.
    deletion_vectors = list(DeltaTable(str(source)).deletion_vectors())
    assert sum(batch.num_rows for batch in deletion_vectors) >= 1
    kept = matching_keys(DeltaTable(str(source)), ["id"], "id >= 95 AND id < 115")
    assert sorted(kept.column("id").to_pylist()) == [*range(95, 100), *range(110, 115)]


def _assert_readers_agree(spark: Any, path: str, index: VectorIndex) -> None:
    import duckdb
    import pyarrow as pa
    from deltalake import DeltaTable

    keys, vectors = index.rows()
    order = np.argsort(keys.column("id").to_numpy())
    ours = (keys.column("id").to_numpy()[order], vectors[order])

    rows = sorted(read_target(spark, path), key=lambda r: r["id"])
    by_spark = (np.array([r["id"] for r in rows]), np.array([r["embedding"] for r in rows]))

    # DuckDB's delta extension cannot be installed here (no download; the PyPI
    # builds are for DuckDB 1.x), so DuckDB's own Parquet reader reads the files
    # that delta-rs lists as the table's current version, and drops the rows their
    # deletion vectors name by row number within the file.
    table = DeltaTable(path)
    files = [uri.removeprefix("file://") for uri in table.file_uris()]
    deleted: dict[str, list[Any]] = {"filename": [], "row": []}
    for batch in map(pa.record_batch, table.deletion_vectors()):
        for uri, keep in zip(
            batch.column("filepath").to_pylist(),
            batch.column("selection_vector").to_pylist(),
            strict=True,
        ):
            rows = [i for i, kept in enumerate(keep) if not kept]
            deleted["filename"] += [uri.removeprefix("file://")] * len(rows)
            deleted["row"] += rows
    con = duckdb.connect()
    con.register(
        "deleted",
        pa.table(deleted, schema=pa.schema([("filename", pa.string()), ("row", pa.int64())])),
    )
    fetched = con.execute(
        "SELECT id, embedding FROM read_parquet($files, filename = true, file_row_number = true) p "
        "WHERE NOT EXISTS (SELECT 1 FROM deleted d "
        "WHERE d.filename = p.filename AND d.row = p.file_row_number) ORDER BY id",
        {"files": files},
    ).fetchall()
    by_duckdb = (np.array([r[0] for r in fetched]), np.array([r[1] for r in fetched]))

    # delta-rs's own engine (DataFusion), which applies deletion vectors itself.
    scanned = pa.RecordBatchReader.from_stream(table.scan(columns=["id", "embedding"]))
    data = scanned.read_all().sort_by("id")
    by_scan = (data.column("id").to_numpy(), np.array(data.column("embedding").to_pylist()))

    for ids, matrix in (by_spark, by_duckdb, by_scan):
        assert np.array_equal(ids, ours[0])
        assert np.array_equal(matrix.astype(np.float32), ours[1])  # bit for bit


def _deltavec(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltavec.cli", *args]
