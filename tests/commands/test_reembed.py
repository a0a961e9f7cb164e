"""``deltavec reembed``: another model for every live row, resumable, switched in one commit."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deltavec.commands.job import Job
from deltavec.commands.reembed import Reembed
from deltavec.config import load_config
from deltavec.errors import DeltavecError
from deltavec.runtime.faults import ENV as FAULTS_ENV
from deltavec.runtime.faults import InjectedFault
from deltavec.search import VectorIndex
from tests.conftest import read_target, write_config, write_rows
from tests.other_model import truncated_model

pytestmark = pytest.mark.slow


def _history(spark: Any, path: Path) -> list[Any]:
    return spark.sql(f"DESCRIBE HISTORY delta.`{path}`").orderBy("version").collect()


def test_reembed_resumes_after_a_crash_and_switches_every_row_in_one_commit(
    spark: Any,
    tmp_path: Path,
    sts_pairs: list[tuple[float, str, str]],
    model_path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from delta.tables import DeltaTable

    from deltavec.embed.encoder import EncoderSpec
    from deltavec.embed.udf import get_encoder

    source, target = tmp_path / "source", tmp_path / "target"
    rows = [{"id": i, "title": s1, "abstract": s2} for i, (_, s1, s2) in enumerate(sts_pairs[:40])]
    write_rows(spark, source, rows)
    config = load_config(write_config(tmp_path, source={"mode": "changes"}))
    Job(config, spark).run(once=True)
    DeltaTable.forPath(spark, str(source)).update("id < 2", {"title": "'a corrected title'"})
    DeltaTable.forPath(spark, str(source)).delete("id = 39")
    Job(config, spark).run(once=True)
    old = {r["id"]: r for r in read_target(spark, target)}
    old_model = old[0]["model"]
    other = str(truncated_model(model_path, tmp_path / "other-model"))

    # Killed after its first chunk: nothing a consumer reads has changed.
    monkeypatch.setenv(FAULTS_ENV, "reembed_chunk:raise")
    with pytest.raises(InjectedFault):
        Reembed(config, model=other, spark=spark, chunk_rows=10).run()
    monkeypatch.delenv(FAULTS_ENV)
    assert {r["model"] for r in read_target(spark, target)} == {old_model}
    versions_before_swap = len(_history(spark, target))

    seen: list[tuple[int, int]] = []
    report = Reembed(
        config, model=other, spark=spark, chunk_rows=10, progress=lambda d, t: seen.append((d, t))
    ).run()

    after = {r["id"]: r for r in read_target(spark, target)}
    assert report.switched and report.rows == 39
    assert report.reused > 0 and report.embedded > 0  # resumed, not restarted
    assert report.reused + report.embedded == 39 and report.failed == 0
    assert seen[-1] == (39, 39)
    assert sorted(after) == sorted(old)  # the same live keys
    assert {r["model"] for r in after.values()} == {report.model_to}
    assert report.model_to.startswith(other + "@") and report.model_to != old_model
    # One commit switched every row and the model property together.
    history = _history(spark, target)
    assert len(history) == versions_before_swap + 1
    assert history[-1]["operation"] == "CREATE OR REPLACE TABLE AS SELECT"
    index = VectorIndex(str(target))  # deltalake reads it; it refuses mixed models
    assert index.model_identity == report.model_to and len(index) == 39
    texts = {
        r["id"]: f"{r['title']} [SEP] {r['abstract']}"
        for r in spark.read.format("delta").load(str(source)).collect()
    }
    assert all(
        after[k]["text_hash"] == hashlib.sha256(texts[k].encode()).hexdigest() for k in after
    )
    new_encoder = get_encoder(EncoderSpec(model=other, device="cpu"))
    sample = [0, 1, 7, 38]
    expected, _ = new_encoder.encode([texts[k] for k in sample])
    for key, vector in zip(sample, expected, strict=True):
        assert float(np.asarray(after[key]["embedding"]) @ vector) >= 0.9999
    assert not (tmp_path / "checkpoint" / "_deltavec" / "reembed").exists()

    # The job carries on with the new model, and refuses the old one.
    write_rows(spark, source, [{"id": 100, "title": "a new paper", "abstract": "on vectors"}])
    switched = load_config(
        write_config(tmp_path, source={"mode": "changes"}, model={"name": other})
    )
    run = Job(switched, spark).run(once=True)
    assert run.embedded == 1
    assert {r["model"] for r in read_target(spark, target)} == {report.model_to}
    with pytest.raises(DeltavecError, match="reembed"):
        Job(config, spark).run(once=True)


def test_reembed_quarantines_what_the_new_model_fails_on_and_releases_what_it_embeds(
    spark: Any, tmp_path: Path, model_path: str
) -> None:
    from deltavec.runtime.faults import POISON_ENV
    from deltavec.search import open_search

    source, target = tmp_path / "source", tmp_path / "target"
    rows = [{"id": i, "title": f"paper {i} on vectors", "abstract": "text"} for i in range(6)]
    rows[2]["title"] = "the old model fails on OLD-POISON"
    rows[4]["title"] = "the new model fails on NEW-POISON"
    write_rows(spark, source, rows)
    config = load_config(write_config(tmp_path, source={"mode": "changes"}))
    environment = spark.sparkContext.environment
    try:
        environment[POISON_ENV] = "OLD-POISON"
        Job(config, spark).run(once=True)
        quarantine = tmp_path / "target_quarantine"
        assert [r["key"] for r in read_target(spark, quarantine)] == ['{"id":2}']
        other = str(truncated_model(model_path, tmp_path / "other-model"))
        environment[POISON_ENV] = "NEW-POISON"
        report = Reembed(config, model=other, spark=spark).run()
    finally:
        environment.pop(POISON_ENV, None)

    assert report.switched and report.failed == 1
    after = {r["id"]: r for r in read_target(spark, target)}
    assert sorted(after) == [0, 1, 2, 3, 5]  # key 2 embeds now; key 4 is not lost:
    [failed] = read_target(spark, quarantine)
    assert (failed["key"], failed["reason"]) == ('{"id":4}', "encode_error")
    assert "NEW-POISON" in failed["value"]
    # The swap keeps the checkpoint that owns the target, so the job goes on.
    owner = spark.sql(f"DESCRIBE DETAIL delta.`{target}`").first()["properties"]
    assert owner["deltavec.checkpoint"] == str(tmp_path / "checkpoint")
    # The consumer properties name the new model, so a search opens and answers.
    search = open_search(str(target))
    assert search.index.model_identity == report.model_to
    assert len(search.search("paper on vectors", k=3)) == 3
