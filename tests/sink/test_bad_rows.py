"""Bad rows are quarantined with a reason; every good row of the same batch still lands."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deltavec.cli import main
from deltavec.commands import quarantine
from deltavec.commands.job import Job
from deltavec.config import load_config
from deltavec.runtime.faults import POISON_ENV
from tests.conftest import read_target, write_config, write_rows

pytestmark = pytest.mark.slow

POISON = "\u2063poison\u2063"


@contextmanager
def poisoned_workers(spark: Any) -> Iterator[None]:
    """Make the model raise, on Spark's Python workers, for texts holding POISON."""
    environment = spark.sparkContext.environment
    environment[POISON_ENV] = POISON
    try:
        yield
    finally:
        environment.pop(POISON_ENV, None)


def _quarantine(spark: Any, tmp_path: Path) -> list[Any]:
    return spark.read.format("delta").load(str(tmp_path / "target_quarantine")).collect()


def _invalid_utf8_row(spark: Any, path: Path, key: int) -> None:
    # Spark casts binary to string without validating it, so bytes that are not
    # UTF-8 (here a CESU-8 lone surrogate) reach the table as another engine's
    # writer could leave them.
    spark.sql(
        f"SELECT CAST({key} AS BIGINT) AS id, CAST(unhex('4142EDA080') AS STRING) AS title, "
        "'abstract' AS abstract"
    ).write.format("delta").mode("append").save(str(path))


def test_each_kind_of_bad_row_is_quarantined_and_the_rest_embedded(
    spark: Any, tmp_path: Path, encoder: Any
) -> None:
    source = tmp_path / "source"
    long_1mb = "protein folding " * 65_536  # 1 MiB
    long_10mb = "lakehouse " * 1_048_576  # 10 MiB
    rows = [
        {"id": 1, "title": "A normal paper", "abstract": "Nothing unusual here."},
        {"id": 2, "title": None, "abstract": None},
        {"id": 3, "title": "", "abstract": "   \t\n  "},
        {"id": 4, "title": "\u00a0\u3000", "abstract": None},
        {"id": None, "title": "No key", "abstract": "This row has a null key."},
        {"id": 5, "title": "First of two", "abstract": "Same key twice in one commit."},
        {"id": 5, "title": "Second of two", "abstract": "Same key twice in one commit."},
        {"id": 6, "title": "One megabyte", "abstract": long_1mb},
        {"id": 7, "title": "Ten megabytes", "abstract": long_10mb},
        {"id": 8, "title": "Control\x00chars\x01\x1b[31m", "abstract": "NUL and ESC bytes"},
        {"id": 9, "title": "مرحبا بالعالم", "abstract": "שלום עולם, right to left"},
        {"id": 10, "title": "Rockets 🚀🔥", "abstract": "emoji 👩‍🔬 and flags 🇪🇺"},
        {"id": 11, "title": "Lone \ud800 surrogate", "abstract": "from a Python string"},
        {"id": 12, "title": f"Model fails {POISON}", "abstract": "injected"},
        {"id": 13, "title": "Another good paper", "abstract": "Embedded next to a failing row."},
    ]
    write_rows(spark, source, rows)
    _invalid_utf8_row(spark, source, 14)  # a second source commit

    with poisoned_workers(spark):
        summary = Job(load_config(write_config(tmp_path)), spark).run(once=True)

    target = {r["id"]: r for r in read_target(spark, tmp_path / "target")}
    assert sorted(target) == [1, 5, 6, 7, 8, 9, 10, 11, 13]
    quarantined = _quarantine(spark, tmp_path)
    reasons = Counter(r["reason"] for r in quarantined)
    assert reasons == {"empty_text": 3, "null_key": 1, "encode_error": 1, "invalid_utf8": 1}
    assert summary.quarantined == 6 and summary.duplicates == 1
    by_key = {r["key"]: r for r in quarantined}
    blank = by_key['{"id":3}']
    assert blank["message"] == "every template column (title, abstract) is null, empty or blank"
    assert blank["value"] == " [SEP]    \t\n  " and blank["value_length"] == 14
    assert by_key['{"id":12}']["message"].startswith("InjectedFault: injected model failure")
    assert by_key['{"id":14}']["message"].startswith("text is not valid UTF-8")
    assert by_key['{"id":14}']["source_version"] == 1
    assert {r["batch_id"] for r in quarantined} == {0}
    # The duplicate key kept the row whose text hash is greatest.
    texts = [
        "First of two [SEP] Same key twice in one commit.",
        "Second of two [SEP] Same key twice in one commit.",
    ]
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    assert target[5]["text_hash"] == max(hashes)
    # Long texts were truncated to the model's window, not dropped or crashed on.
    [expected], _ = encoder.encode(["One megabyte [SEP] " + long_1mb[:20_000]])
    assert float(np.asarray(target[6]["embedding"]) @ expected) > 0.9999


def test_non_string_columns_are_cast_as_documented(spark: Any, tmp_path: Path) -> None:
    write_rows(
        spark,
        tmp_path / "source",
        [{"id": 1, "title": "Typed", "year": 2021, "tags": ["a", "b"], "meta": {"x": "q", "n": 7}}],
        schema="id long, title string, year int, tags array<string>, meta struct<x:string,n:int>",
    )
    config = write_config(tmp_path, source={"template": "{title} {year} {tags} {meta}"})
    Job(load_config(config), spark).run(once=True)
    [row] = read_target(spark, tmp_path / "target")
    assert row["text_hash"] == hashlib.sha256(b"Typed 2021 [a, b] {q, 7}").hexdigest()


def test_quarantine_retry_embeds_rows_once_the_cause_is_fixed(
    spark: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "source"
    write_rows(
        spark,
        source,
        [
            {"id": 1, "title": "Fine", "abstract": "A good row."},
            {"id": 2, "title": None, "abstract": " "},
            {"id": 3, "title": f"Failing {POISON}", "abstract": "x"},
            {"id": 4, "title": "", "abstract": ""},
        ],
    )
    config = write_config(tmp_path)
    job = Job(load_config(config), spark)
    with poisoned_workers(spark):
        job.run(once=True)
    assert quarantine.counts_by_reason(job) == {"empty_text": 2, "encode_error": 1}
    assert main(["quarantine", "list", "--json", "--config", str(config)]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert listed["counts"] == {"empty_text": 2, "encode_error": 1}
    assert {row["key"] for row in listed["rows"]} == {'{"id":2}', '{"id":3}', '{"id":4}'}

    # Fix row 2 in the data; the model failure (row 3) goes away by itself; row 4 is deleted.
    spark.sql(f"UPDATE delta.`{source}` SET title = 'Fixed' WHERE id = 2")
    spark.sql(f"DELETE FROM delta.`{source}` WHERE id = 4")
    assert main(["quarantine", "retry", "--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert (report["retried"], report["embedded"], report["gone_from_source"]) == (2, 2, 1)
    assert sorted(r["id"] for r in read_target(spark, tmp_path / "target")) == [1, 2, 3]
    assert _quarantine(spark, tmp_path) == []


def test_ten_thousand_rows_with_five_percent_bad_lose_nothing(spark: Any, tmp_path: Path) -> None:
    rng = random.Random(7)
    words = [
        "delta",
        "lake",
        "stream",
        "vector",
        "model",
        "table",
        "merge",
        "batch",
        "spark",
        "query",
    ]
    rows: list[dict[str, Any]] = []
    bad: Counter[str] = Counter()
    for i in range(10_000):
        row: dict[str, Any] = {"id": i, "title": " ".join(rng.choices(words, k=6)), "abstract": ""}
        if rng.random() < 0.05:
            kind = rng.choice(["null_key", "empty_text", "blank_text", "encode_error"])
            if kind == "null_key":
                row["id"] = None
            elif kind == "empty_text":
                row["title"] = None
            elif kind == "blank_text":
                row["title"] = " \t "
            else:
                row["title"] += POISON
            bad["empty_text" if kind == "blank_text" else kind] += 1
        rows.append(row)
    write_rows(spark, tmp_path / "source", rows)

    with poisoned_workers(spark):
        summary = Job(load_config(write_config(tmp_path)), spark).run(once=True)

    target_rows = len(read_target(spark, tmp_path / "target"))
    quarantined = _quarantine(spark, tmp_path)
    print(f"source={len(rows)} target={target_rows} quarantine={len(quarantined)} bad={dict(bad)}")
    assert target_rows + len(quarantined) == len(rows)
    assert Counter(r["reason"] for r in quarantined) == bad
    assert summary.embedded == target_rows


def test_a_batch_writes_only_the_commits_its_rows_need(spark: Any, tmp_path: Path) -> None:
    """New keys are one target commit; the quarantine is written only when one of its
    rows changes (a key clears), however many rows it holds."""
    from delta.tables import DeltaTable

    source, config = tmp_path / "source", write_config(tmp_path)

    def versions() -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            DeltaTable.forPath(spark, str(tmp_path / name)).history(1).first()["version"]
            for name in ("target", "target_quarantine")
        )

    def run(rows: list[dict[str, Any]]) -> tuple[int, int]:
        before = versions() if (tmp_path / "target").exists() else None
        write_rows(spark, source, rows)
        Job(load_config(config), spark).run(once=True)
        after = versions()
        return (after[0] - before[0], after[1] - before[1]) if before else (0, 0)

    run(
        [
            {"id": 1, "title": "Fine", "abstract": "A good row."},
            {"id": 2, "title": " ", "abstract": None},
        ]
    )
    assert [r["key"] for r in _quarantine(spark, tmp_path)] == ['{"id":2}']
    new_keys = [{"id": i, "title": f"New {i}", "abstract": "Another good row."} for i in (3, 4)]
    assert run(new_keys) == (1, 0)
    assert run([{"id": 2, "title": "Fixed", "abstract": "Now it has text."}]) == (1, 1)
    assert sorted(r["id"] for r in read_target(spark, tmp_path / "target")) == [1, 2, 3, 4]
    assert _quarantine(spark, tmp_path) == []
