"""After a batch writes, the target's new version is prepared for the next batch's read.

The preparation only reads: when it fails, no batch fails and no row is lost; when
it works, it has read exactly the version the batch committed (the one the next
batch's read starts from). The last batch of a drain (``run --once``) has no next
batch, and prepares nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from deltavec.runtime import faults, tables
from tests.conftest import read_target, write_config, write_rows

pytestmark = pytest.mark.slow


def _rows(ids: range) -> list[dict[str, Any]]:
    return [{"id": i, "title": f"Paper {i}", "abstract": "a"} for i in ids]


def test_a_failed_preparation_fails_no_batch_and_the_next_one_reads_the_new_version(
    spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(faults.ENV, "warm_snapshot:raise")
    monkeypatch.setattr(faults, "_fired", set())
    source = tmp_path / "source"
    # Each commit writes two files (two partitions): two files a trigger make one
    # batch of each commit, so every run below drains in two batches.
    config = load_config(write_config(tmp_path, source={"max_files_per_trigger": 2}))

    write_rows(spark, source, _rows(range(10)))
    write_rows(spark, source, _rows(range(10, 15)))
    first = Job(config, spark)
    with caplog.at_level(logging.WARNING, logger="deltavec.sink.snapshot_warmer"):
        summary = first.run(once=True)
    assert (summary.batches, summary.embedded) == (2, 15)
    assert first.sink is not None and first.sink.warmer.warmed_version is None
    warning = next(r.getMessage() for r in caplog.records if "next batch" in r.getMessage())
    assert "InjectedFault" in warning and str(tmp_path / "target") in warning
    assert sorted(r["id"] for r in read_target(spark, tmp_path / "target")) == list(range(15))

    # The fault fires once: this run's preparation works.
    write_rows(spark, source, _rows(range(15, 20)))
    write_rows(spark, source, _rows(range(20, 25)))
    second = Job(config, spark)
    written: list[int] = []
    second.on_batch(lambda _: written.append(tables.latest_version(spark, config.target)))
    summary = second.run(once=True)
    assert (summary.batches, summary.embedded) == (2, 10)
    assert second.sink is not None
    # The first batch's version was prepared for the second; after the second, the
    # drain's last, nothing was.
    assert second.sink.warmer.warmed_version == written[0] < written[1]
    ids = [r["id"] for r in read_target(spark, tmp_path / "target")]
    assert sorted(ids) == list(range(25)), "one vector per key, none lost or doubled"
