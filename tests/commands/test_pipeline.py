"""The whole job on the embedded default: Delta source -> stream -> model -> MERGE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import spearmanr

from deltavec.commands.job import Job
from deltavec.config import load_config
from deltavec.runtime.faults import ENV as FAULTS_ENV
from tests.conftest import STS_REFERENCE_SPEARMAN, read_target, write_config, write_rows

pytestmark = pytest.mark.slow


def _papers(pairs: list[tuple[float, str, str]], start: int, stop: int) -> list[dict[str, Any]]:
    return [{"id": i, "title": pairs[i][1], "abstract": pairs[i][2]} for i in range(start, stop)]


def _history(spark: Any, path: Path) -> list[Any]:
    return spark.sql(f"DESCRIBE HISTORY delta.`{path}`").orderBy("version").collect()


def test_each_source_row_lands_once_and_is_never_embedded_twice(
    spark: Any, tmp_path: Path, sts_pairs: list[tuple[float, str, str]]
) -> None:
    config = load_config(write_config(tmp_path))
    write_rows(spark, tmp_path / "source", _papers(sts_pairs, 0, 120))
    first = Job(config, spark).run(once=True)
    before = {r["id"]: r for r in read_target(spark, tmp_path / "target")}

    write_rows(spark, tmp_path / "source", _papers(sts_pairs, 120, 200))
    second = Job(config, spark).run(once=True)
    third = Job(config, spark).run(once=True)
    after = read_target(spark, tmp_path / "target")

    assert (first.embedded, second.embedded, third.embedded) == (120, 80, 0)
    ids = [r["id"] for r in after]
    assert sorted(ids) == list(range(200))  # every row, no duplicates
    for row in after:
        if row["id"] in before:  # the first run's vectors were not rewritten
            assert row["embedded_at"] == before[row["id"]]["embedded_at"]
            assert row["embedding"] == before[row["id"]]["embedding"]
        assert row["dim"] == 384 and len(row["embedding"]) == 384
        assert row["model"].startswith("sentence-transformers/all-MiniLM-L6-v2@")
    # Each run's rows carry the source version they were read from.
    assert {r["source_version"] for r in after if r["id"] < 120} == {0}
    assert {r["source_version"] for r in after if r["id"] >= 120} == {1}


def test_target_vectors_equal_sentence_transformers(
    spark: Any, tmp_path: Path, st_model: Any, sts_pairs: list[tuple[float, str, str]]
) -> None:
    rows = _papers(sts_pairs, 0, 60)
    write_rows(spark, tmp_path / "source", rows)
    Job(load_config(write_config(tmp_path)), spark).run(once=True)

    by_id = {r["id"]: np.asarray(r["embedding"]) for r in read_target(spark, tmp_path / "target")}
    texts = [f"{r['title']} [SEP] {r['abstract']}" for r in rows]
    reference = st_model.encode(texts, normalize_embeddings=True)
    cosine = [float(by_id[r["id"]] @ ref) for r, ref in zip(rows, reference, strict=True)]
    assert min(cosine) >= 0.9999


def _sts_spearman(spark: Any, target: Path, pairs: list[tuple[float, str, str]]) -> float:
    vectors = {r["id"]: np.asarray(r["embedding"]) for r in read_target(spark, target)}
    cosine = [float(vectors[2 * i] @ vectors[2 * i + 1]) for i in range(len(pairs))]
    return float(spearmanr(cosine, [score for score, _, _ in pairs]).statistic)


def test_sts_quality_survives_the_pipeline_in_fp32_and_int8(
    spark: Any, tmp_path: Path, sts_pairs: list[tuple[float, str, str]]
) -> None:
    """One source, two targets: fp32 matches the reference, int8 stays within 0.005 of it,
    and the fp32 target refuses the int8 job (one source write for all three checks)."""
    from deltavec.errors import TargetError
    from deltavec.search import open_search

    rows = []
    for i, (_, s1, s2) in enumerate(sts_pairs):
        rows.append({"id": 2 * i, "sentence": s1})
        rows.append({"id": 2 * i + 1, "sentence": s2})
    write_rows(spark, tmp_path / "source", rows, schema="id long, sentence string")
    config = load_config(write_config(tmp_path, source={"template": "{sentence}"}))
    summary = Job(config, spark).run(once=True)
    rho = _sts_spearman(spark, tmp_path / "target", sts_pairs)
    assert summary.embedded == len(rows)
    assert abs(rho - STS_REFERENCE_SPEARMAN) <= 0.001, rho

    int8_on_fp32 = load_config(
        write_config(tmp_path, source={"template": "{sentence}"}, model={"precision": "int8"})
    )
    with pytest.raises(TargetError) as refused:
        Job(int8_on_fp32, spark).prepare()
    assert str(refused.value) == (
        f"target {tmp_path / 'target'} was embedded with model.precision = floating point "
        "(fp32, or fp16/bf16 on a GPU), but this job uses 'int8'; run 'deltavec reembed' to "
        "re-embed it with the new settings, or write to a new target"
    )

    int8_path = tmp_path / "target_int8"
    int8_config = load_config(
        write_config(
            tmp_path,
            source={"template": "{sentence}"},
            model={"precision": "int8"},
            target={"path": str(int8_path)},
            checkpoint={"location": str(tmp_path / "checkpoint_int8")},
        )
    )
    int8_summary = Job(int8_config, spark).run(once=True)
    int8_rho = _sts_spearman(spark, int8_path, sts_pairs)
    assert int8_summary.embedded == len(rows)
    assert int8_rho >= 0.862 and abs(int8_rho - rho) <= 0.005, (int8_rho, rho)
    # Search embeds queries with the target's precision: a sentence finds its own row.
    search = open_search(str(int8_path))
    assert search.encoder.spec.precision == "int8"
    sentences = [r["sentence"] for r in rows]
    unique = [r for r in rows if sentences.count(r["sentence"]) == 1][:5]
    assert [search.search(r["sentence"], k=1)[0].key for r in unique] == [
        {"id": r["id"]} for r in unique
    ]


def test_replayed_batch_after_a_crash_between_merge_and_checkpoint_changes_nothing(
    spark: Any,
    tmp_path: Path,
    sts_pairs: list[tuple[float, str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = load_config(write_config(tmp_path))
    write_rows(spark, tmp_path / "source", _papers(sts_pairs, 0, 50))
    Job(config, spark).run(once=True)
    write_rows(spark, tmp_path / "source", _papers(sts_pairs, 50, 90))

    # The MERGE of batch 1 commits, then the driver "dies" before Spark records
    # the batch in the checkpoint's commits/ folder.
    monkeypatch.setenv(FAULTS_ENV, "after_merge:raise")
    with pytest.raises(Exception, match="injected fault at after_merge"):
        Job(config, spark).run(once=True)
    assert not (tmp_path / "checkpoint" / "commits" / "1").exists()
    crashed = {r["id"]: r for r in read_target(spark, tmp_path / "target")}
    versions_after_crash = len(_history(spark, tmp_path / "target"))

    replay = Job(config, spark).run(once=True)  # Spark replays batch 1
    after = {r["id"]: r for r in read_target(spark, tmp_path / "target")}

    assert [r.batch_id for r in replay.reports] == [1]
    assert replay.embedded == 0  # the replay recognised every row as already embedded
    assert len(_history(spark, tmp_path / "target")) == versions_after_crash
    assert sorted(after) == list(range(90))
    assert all(after[k]["embedded_at"] == crashed[k]["embedded_at"] for k in after)
    assert (tmp_path / "checkpoint" / "commits" / "1").exists()


def test_the_delta_txn_makes_a_repeated_merge_a_no_op(
    spark: Any, tmp_path: Path, sts_pairs: list[tuple[float, str, str]]
) -> None:
    """The second line of defence: even a MERGE with new values is skipped on replay."""
    import hashlib

    from pyspark.sql import functions as F

    config = load_config(write_config(tmp_path))
    write_rows(spark, tmp_path / "source", _papers(sts_pairs, 0, 10))
    job = Job(config, spark)
    job.run(once=True)
    sink = job.sink
    assert sink is not None
    base = (
        spark.read.format("delta")
        .load(str(tmp_path / "source"))
        .withColumn("title", F.concat(F.col("title"), F.lit(" (revised)")))
    )
    first = sink.process(base, batch_id=7, source_version=5)
    versions = len(_history(spark, tmp_path / "target"))
    # Same batch id, different text: a replay must not write, whatever it holds.
    again = sink.process(
        base.withColumn("title", F.lit("something else")), batch_id=7, source_version=5
    )

    assert first.embedded == 10 and again.embedded == 10
    assert len(_history(spark, tmp_path / "target")) == versions
    rows = {r["id"]: r for r in read_target(spark, tmp_path / "target")}
    assert sorted(rows) == list(range(10))
    for i, (_, title, abstract) in enumerate(sts_pairs[:10]):
        revised = f"{title} (revised) [SEP] {abstract}"
        assert rows[i]["text_hash"] == hashlib.sha256(revised.encode()).hexdigest()
