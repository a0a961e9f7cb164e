"""Updates and deletes: ``changes`` mode follows them, ``append`` mode skips them loudly."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from deltavec.errors import CheckpointError, TargetError
from tests.conftest import read_target, write_config, write_rows
from tests.other_model import truncated_model

pytestmark = pytest.mark.slow

SCHEMA = "id long, title string, abstract string, year int"


def _rows(pairs: list[tuple[float, str, str]], ids: range) -> list[dict[str, Any]]:
    return [{"id": i, "title": pairs[i][1], "abstract": pairs[i][2], "year": 2000} for i in ids]


def _source_texts(spark: Any, path: Path) -> dict[int, str]:
    rows = spark.read.format("delta").load(str(path)).collect()
    return {r["id"]: f"{r['title']} [SEP] {r['abstract']}" for r in rows}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_changes_mode_reembeds_new_text_removes_deletes_and_keeps_the_latest(
    spark: Any, tmp_path: Path, sts_pairs: list[tuple[float, str, str]], encoder: Any
) -> None:
    from delta.tables import DeltaTable

    source = tmp_path / "source"
    config = load_config(write_config(tmp_path, source={"mode": "changes"}))
    write_rows(spark, source, _rows(sts_pairs, range(30)), schema=SCHEMA)
    Job(config, spark).run(once=True)
    before = {r["id"]: r for r in read_target(spark, tmp_path / "target")}

    table = DeltaTable.forPath(spark, str(source))
    table.update("id < 5", {"title": "concat(title, ' (corrected)')"})  # text changed
    table.update("id >= 5 AND id < 10", {"year": "2024"})  # text unchanged
    table.delete("id >= 10 AND id < 14")
    # Several changes to one key inside one micro-batch: the newest wins.
    table.update("id = 20", {"title": "'first rewrite'"})
    table.update("id = 20", {"title": "'second rewrite'"})
    table.update("id = 21", {"title": "'rewritten, then deleted'"})
    table.delete("id = 21")
    table.delete("id = 22")
    write_rows(
        spark,
        source,
        [{"id": 22, "title": "back again", "abstract": "x", "year": 1}],
        schema=SCHEMA,
    )
    write_rows(spark, source, _rows(sts_pairs, range(30, 35)), schema=SCHEMA)

    run = Job(config, spark).run(once=True)
    after = {r["id"]: r for r in read_target(spark, tmp_path / "target")}
    texts = _source_texts(spark, source)

    assert len(run.reports) == 1, "the changes were meant to land in one micro-batch"
    assert sorted(after) == sorted(texts)  # deletes removed, inserts added, one row per key
    assert all(after[k]["text_hash"] == _sha(texts[k]) for k in texts)  # all from the latest text
    assert texts[20].startswith("second rewrite") and 21 not in after and 22 in after
    # 5 corrected + id 20 + id 22 + 5 new rows went through the model; the year-only
    # edits did not (their vectors and write times are untouched).
    assert run.embedded == 12
    assert run.unchanged == 5
    assert run.deleted == 5  # ids 10-13 and 21
    for key in range(5, 10):
        assert after[key]["embedded_at"] == before[key]["embedded_at"]
        assert after[key]["embedding"] == before[key]["embedding"]
    changed = [0, 1, 2, 3, 4, 20, 22, 30]
    expected, _ = encoder.encode([texts[k] for k in changed])
    for key, vector in zip(changed, expected, strict=True):
        assert float(np.asarray(after[key]["embedding"]) @ vector) >= 0.9999
    # Each row records the source commit its text came from.
    versions = {r["version"]: r["operation"] for r in table.history().collect()}
    assert versions[after[20]["source_version"]] == "UPDATE"
    assert versions[after[22]["source_version"]] == "WRITE"


def test_append_mode_skips_update_and_delete_commits_with_a_warning(
    spark: Any,
    tmp_path: Path,
    sts_pairs: list[tuple[float, str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from delta.tables import DeltaTable

    source = tmp_path / "source"
    config = load_config(write_config(tmp_path))
    write_rows(spark, source, _rows(sts_pairs, range(20)), schema=SCHEMA)
    Job(config, spark).run(once=True)
    before = {r["id"]: r for r in read_target(spark, tmp_path / "target")}

    table = DeltaTable.forPath(spark, str(source))
    table.update("id < 3", {"title": "'edited'"})
    table.delete("id >= 18")
    write_rows(spark, source, _rows(sts_pairs, range(20, 25)), schema=SCHEMA)
    with caplog.at_level(logging.WARNING, logger="deltavec.sink.batch"):
        run = Job(config, spark).run(once=True)
    after = {r["id"]: r for r in read_target(spark, tmp_path / "target")}

    assert run.skipped_change_commits == 2
    assert sum(r.skipped_change_commits for r in run.reports) == 2
    warning = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "versions 1, 2" in warning and "source.mode = 'changes'" in warning
    # New rows arrive exactly once; the skipped commits neither crash nor duplicate.
    assert sorted(after) == list(range(25))
    assert run.embedded == 5
    assert all(after[k]["embedding"] == before[k]["embedding"] for k in range(20))


def test_a_job_with_another_model_is_refused_on_an_existing_checkpoint_and_target(
    spark: Any,
    tmp_path: Path,
    sts_pairs: list[tuple[float, str, str]],
    model_path: str,
) -> None:
    write_rows(spark, tmp_path / "source", _rows(sts_pairs, range(10)), schema=SCHEMA)
    Job(load_config(write_config(tmp_path)), spark).run(once=True)
    other = truncated_model(model_path, tmp_path / "other-model")
    before = read_target(spark, tmp_path / "target")

    # The checkpoint records its model: another model is refused even with a new target.
    switched = load_config(
        write_config(
            tmp_path, model={"name": str(other)}, target={"path": str(tmp_path / "new-target")}
        )
    )
    with pytest.raises(CheckpointError) as refused:
        Job(switched, spark).run(once=True)
    message = str(refused.value)
    assert "\n" not in message
    assert "was written with model sentence-transformers/all-MiniLM-L6-v2@" in message
    assert f"not {other}@" in message and "deltavec reembed" in message

    # A fresh checkpoint does not get around it: the target itself records its model.
    fresh = load_config(
        write_config(
            tmp_path,
            model={"name": str(other)},
            checkpoint={"location": str(tmp_path / "another-checkpoint")},
        )
    )
    with pytest.raises(TargetError, match=r"holds vectors from model .*reembed --model"):
        Job(fresh, spark).run(once=True)
    assert read_target(spark, tmp_path / "target") == before
    assert not (tmp_path / "new-target").exists()
