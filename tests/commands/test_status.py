"""What a person watching a job sees: the progress of ``deltavec run --once`` on a
terminal, its per-batch log lines, and ``deltavec status`` once it has stopped.

One module-scoped run feeds every test here (a job costs tens of seconds): the
command drains a two-commit backlog on a pseudo-terminal, in several
micro-batches; then the source gets a commit that changes no rows, then one
that adds rows, and ``deltavec status`` is asked after each.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from deltavec.cli import main
from tests.conftest import read_target, write_config, write_rows
from tests.terminal import open_terminal, read_terminal

pytestmark = pytest.mark.slow


@dataclass
class Watched:
    started: float
    screen: str
    returncode: int | None
    caught_up: dict[str, Any]
    behind: dict[str, Any]
    text: str
    written_at: float
    target_rows: int


def _papers(pairs: list[tuple[float, str, str]], start: int, stop: int) -> list[dict[str, Any]]:
    return [{"id": i, "title": pairs[i][1], "abstract": pairs[i][2]} for i in range(start, stop)]


@pytest.fixture(scope="module")
def watched(
    spark: Any, tmp_path_factory: pytest.TempPathFactory, sts_pairs: list[tuple[float, str, str]]
) -> Watched:
    tmp = tmp_path_factory.mktemp("watch")
    source = tmp / "source"
    first = _papers(sts_pairs, 0, 60)
    first[3] = {"id": 3, "title": "", "abstract": " "}  # quarantined: nothing to embed
    write_rows(spark, source, first)
    write_rows(spark, source, _papers(sts_pairs, 60, 90))
    # Two source files per micro-batch: several batches, so the bar moves.
    config = write_config(tmp, source={"max_files_per_trigger": 2})

    started = time.time()
    master, slave = open_terminal()
    job = subprocess.Popen(
        [sys.executable, "-m", "deltavec.cli", "run", "--once", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "DELTAVEC_SPARK__CONF": '{"spark.ui.enabled": "false"}'},
    )
    os.close(slave)
    try:
        screen = read_terminal(master, timeout=600, done=lambda: job.poll() is not None)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
        os.close(master)

    def status(*args: str) -> str:
        # capsys is per test; this fixture is per module.
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["status", *args, "--config", str(config)]) == 0
        return out.getvalue()

    # A commit that changes no rows: the stream has nothing to read from it.
    spark.sql(f"ALTER TABLE delta.`{source}` SET TBLPROPERTIES ('team' = 'search')")
    caught_up = json.loads(status("--json"))
    write_rows(spark, source, _papers(sts_pairs, 90, 95))
    written = spark.sql(f"DESCRIBE HISTORY delta.`{source}`").orderBy("version").collect()[-1]
    return Watched(
        started=started,
        screen=screen,
        returncode=job.returncode,
        caught_up=caught_up,
        behind=json.loads(status("--json")),
        text=status(),
        written_at=written["timestamp"].timestamp(),
        target_rows=len(read_target(spark, tmp / "target")),
    )


def test_run_once_on_a_terminal_shows_a_progress_bar(watched: Watched) -> None:
    assert watched.returncode == 0, watched.screen[-3000:]
    # The backlog (90 rows, from the Delta log) drained to the end, with a rate.
    assert re.search(r"embed: 100%.*90/90 rows \[.*rows/s\]", watched.screen), watched.screen
    # Earlier states of the bar were drawn as the batches came in.
    assert re.search(r"embed:\s+[1-9]\d?%.*\b[1-9]\d?/90 rows", watched.screen), watched.screen


def test_each_micro_batch_logs_one_structured_line(watched: Watched) -> None:
    lines = [line for line in watched.screen.splitlines() if "event=batch " in line]
    assert len(lines) >= 2, watched.screen[-3000:]
    fields = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines]
    assert [int(f["batch_id"]) for f in fields] == list(range(len(lines)))
    assert sum(int(f["rows"]) for f in fields) == 90
    assert sum(int(f["embedded"]) for f in fields) == 89 == watched.target_rows
    assert sum(int(f["quarantined"]) for f in fields) == 1
    assert fields[-1]["source_version"] == "1"
    for f in fields:
        for name in ("read_s", "embed_s", "merge_s", "total_s", "tokens"):
            assert float(f[name]) >= 0


def test_status_after_a_commit_without_rows_is_caught_up(watched: Watched) -> None:
    status = watched.caught_up
    assert status["source"]["latest_version"] == 2
    assert status["checkpoint"]["processed_version"] == 1
    assert status["lag"] == {"versions": 0, "seconds": 0.0, "oldest_pending_version": None}


def test_status_shows_position_lag_sizes_model_and_last_batch(watched: Watched) -> None:
    status = watched.behind
    assert status["source"]["latest_version"] == 3
    assert status["checkpoint"]["processed_version"] == 1
    assert status["checkpoint"]["starts"] == 1
    assert status["lag"]["versions"] == 2
    assert status["lag"]["oldest_pending_version"] == 3
    assert 0 <= status["lag"]["seconds"] <= time.time() - watched.written_at + 1
    assert status["target"]["rows"] == watched.target_rows == 89
    assert status["quarantine"]["rows"] == 1
    assert status["model"]["identity"].startswith("sentence-transformers/all-MiniLM-L6-v2@")
    assert status["model"]["dim"] == 384
    last = status["last_batch"]
    assert last["batch_id"] == status["checkpoint"]["last_batch_id"] >= 1
    assert last["rows"] > 0 and last["source_version"] == 1
    assert set(last["seconds"]) == {"read", "embed", "merge"}
    finished = datetime.fromisoformat(last["finished_at"].replace("Z", "+00:00")).timestamp()
    assert watched.started <= finished <= time.time()


def test_status_text_answers_each_question_on_its_own_line(watched: Watched) -> None:
    lines = dict(
        (label.strip(), text.strip())
        for label, _, text in (line.partition(":") for line in watched.text.splitlines()[1:])
    )
    last = watched.behind["last_batch"]
    assert lines["latest commit"].startswith("version 3, committed ")
    assert lines["processed"] == f"through version 1 (batch {last['batch_id']})"
    assert lines["lag"].startswith("2 versions; oldest waiting commit (version 3) is ")
    assert lines["target"].endswith("(89 rows)") and lines["quarantine"].endswith("(1 row)")
    assert lines["model"].endswith("(dim 384)")
    assert lines["last batch"].startswith(f"#{last['batch_id']} finished ")
    assert f"{last['rows']} rows, {last['embedded']} embedded" in lines["last batch"]


def test_status_of_a_missing_source_is_one_line(
    spark: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    assert main(["status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"deltavec: error: source table {tmp_path / 'source'} does not exist" in err
