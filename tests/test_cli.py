"""The ``deltavec`` command as a user runs it: a separate process, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from tests.conftest import read_target, write_config, write_rows

pytestmark = pytest.mark.slow


def _deltavec(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltavec.cli", *args]


def test_ctrl_c_stops_the_continuous_job_cleanly(
    spark: Any, tmp_path: Path, sts_pairs: list[tuple[float, str, str]]
) -> None:
    rows = [{"id": i, "title": s1, "abstract": s2} for i, (_, s1, s2) in enumerate(sts_pairs)]
    write_rows(spark, tmp_path / "source", rows[:40])
    config = write_config(tmp_path, trigger={"interval": "1 second"})
    job = subprocess.Popen(
        _deltavec("run", "--config", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DELTAVEC_SPARK__CONF": '{"spark.ui.enabled": "false"}'},
    )
    try:
        commits = tmp_path / "checkpoint" / "commits"
        deadline = time.monotonic() + 240
        while not (commits / "0").exists():
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first batch never committed"
            time.sleep(0.5)
        write_rows(spark, tmp_path / "source", rows[40:80])
        time.sleep(2)  # let the next batch start, so Ctrl-C may land inside it
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err[-3000:]
    assert "query stopped" in err
    summary = json.loads(out.strip().splitlines()[-1])
    # Whatever was written is whole: every batch in the target is committed, and
    # a second run picks up exactly what the first left.
    written = {r["id"] for r in read_target(spark, tmp_path / "target")}
    assert summary["embedded"] == len(written)
    # The next start (here in this process: a second JVM would add half a minute).
    rerun = Job(load_config(config), spark).run(once=True)
    after = [r["id"] for r in read_target(spark, tmp_path / "target")]
    assert sorted(after) == list(range(80))
    assert rerun.embedded == 80 - len(written)


def test_help_answers_without_starting_spark() -> None:
    started = time.monotonic()
    result = subprocess.run(_deltavec("--help"), capture_output=True, text=True, check=True)
    assert "run" in result.stdout and "demo" in result.stdout
    assert time.monotonic() - started < 10
