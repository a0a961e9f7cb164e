"""Exactly-once under crashes: SIGKILL the job again and again while the source changes.

The job runs as a user runs it (``python -m deltavec.cli run``) in its own process
group; another process keeps inserting, re-texting, editing, deleting and merging
rows of the source, blanking some (quarantined) and fixing them again. The job is
killed with SIGKILL (in start-up, just after a batch, and on purpose at chosen
points inside ``foreachBatch``, such as after the MERGE committed but before Spark's
checkpoint did) and restarted each time. ``deltavec quarantine retry`` runs too: beside the
live stream (it must be refused: it needs the stream's lease) and between kills
(it must take the dead job's lease and write). At the end the target must equal
the source: no key missing, none extra, none twice, every vector from the key's
latest text, and the quarantine must hold exactly the blanked keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO, write_config
from tests.source_mutator import create

pytestmark = pytest.mark.fault

# The kills, in order: in start-up, shortly after a batch committed (often inside
# the next one), and by the job itself at a chosen point of the first batch that
# reaches it: after the MERGE committed but before Spark's checkpoint did (twice:
# the restart replays a batch Delta already holds), between the MERGE of existing
# keys and the append of new ones, and before the MERGE. Each kill costs a restart
# (a JVM and two model loads), so every kind and point is here, none many times over.
PLAN = (
    ("start-up", None),
    ("after a batch", None),
    ("in a batch", "after_merge:kill"),
    ("start-up", None),
    ("after a batch", None),
    ("in a batch", "between_writes:kill"),
    ("in a batch", "before_merge:kill"),
    ("in a batch", "after_merge:kill"),
)
# After this start-up kill, ``quarantine retry`` takes the dead job's lease and
# writes (a JVM start and a batch of its own: a minute on a busy machine).
RETRY_AFTER = 3
SPARK_CONF = """
[spark.conf]
"spark.ui.enabled" = "false"
"spark.sql.shuffle.partitions" = "2"
"spark.default.parallelism" = "2"
"spark.databricks.delta.snapshotPartitions" = "2"
"spark.driver.memory" = "1g"
"""


def _start(config: Path, log: Path, faults: str | None) -> subprocess.Popen[bytes]:
    # The conftest's PYTHONPATH: this checkout's package first, not an installed copy.
    env = dict(os.environ)
    env.pop("DELTAVEC_TEST_FAULTS", None)
    if faults:
        env["DELTAVEC_TEST_FAULTS"] = faults
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "deltavec.cli", "run", "--config", str(config)],
            stdout=out,
            stderr=out,
            env=env,
            cwd=REPO,
            # Its own process group: SIGKILL takes the driver, its JVM and the
            # Python workers together, as a lost container would.
            start_new_session=True,
        )


def _retry(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deltavec.cli", "quarantine", "retry", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def _kill_group(job: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)


def _batches_committed(checkpoint: Path) -> int:
    commits = checkpoint / "commits"
    return len([p for p in commits.iterdir() if p.name.isdigit()]) if commits.exists() else 0


def test_target_converges_to_the_source_through_repeated_sigkills(
    tmp_path: Path, encoder: Any
) -> None:
    import pyarrow as pa
    from deltalake import DeltaTable

    rng = random.Random(20240611)
    source, target, checkpoint = tmp_path / "source", tmp_path / "target", tmp_path / "checkpoint"
    create(str(source), rows=120)
    config = write_config(
        tmp_path,
        SPARK_CONF,
        source={"mode": "changes", "max_files_per_trigger": 4},
        trigger={"interval": "1 second"},
    )
    stop = tmp_path / "stop-mutating"
    ledger = tmp_path / "ledger.json"
    mutator = subprocess.Popen(
        [sys.executable, "-m", "tests.source_mutator", str(source), str(stop), str(ledger), "7"],
        cwd=REPO,
        env=dict(os.environ),
    )
    log = tmp_path / "job.log"
    log.touch()
    kills = {"start-up": 0, "after a batch": 0, "in a batch": 0}
    retries = {"refused beside the stream": 0, "between kills": 0}
    try:
        # Kill moments follow the job's own progress, not the clock, so the test
        # means the same on a fast machine and a busy one.
        for run, (kind, faults) in enumerate(PLAN):
            fired = log.read_text(errors="replace").count("deltavec-fault: kill at")
            job = _start(config, log, faults)
            try:
                committed = _batches_committed(checkpoint)
                deadline = time.monotonic() + (rng.uniform(2, 12) if kind == "start-up" else 300)
                while time.monotonic() < deadline and job.poll() is None:
                    if kind == "after a batch" and _batches_committed(checkpoint) > committed:
                        if retries["refused beside the stream"] < 2:
                            # The stream holds the lease once it committed a batch.
                            beside = _retry(config)
                            assert beside.returncode != 0, beside.stdout[-2000:]
                            assert "in use by another deltavec job" in beside.stderr
                            assert job.poll() is None
                            retries["refused beside the stream"] += 1
                        time.sleep(rng.uniform(0, 3))
                        break
                    time.sleep(0.2)
                died_by_itself = job.poll() is not None
            finally:
                _kill_group(job)
            if run == RETRY_AFTER:
                between = _retry(config)
                assert between.returncode == 0, between.stderr[-3000:]
                retries["between kills"] += 1
            if kind == "in a batch":
                assert died_by_itself, "no batch reached an injected fault in 300 s"
                assert log.read_text(errors="replace").count("deltavec-fault: kill at") > fired
            kills[kind] += 1
    finally:
        stop.touch()
        mutator.wait(timeout=120)
    assert mutator.returncode == 0

    # Drain what is left, without faults, in larger batches (the admission limit may
    # change between restarts); the stale lease of the last kill must not block.
    final = subprocess.run(
        [sys.executable, "-m", "deltavec.cli", "run", "--once", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={
            **os.environ,
            "DELTAVEC_SOURCE__MAX_FILES_PER_TRIGGER": "1000",
        },
        timeout=900,
    )
    assert final.returncode == 0, final.stderr[-3000:]

    source_rows = DeltaTable(str(source)).to_pyarrow_table().to_pylist()
    expected = {
        r["id"]: f"{r['title']} [SEP] {r['abstract']}"
        for r in source_rows
        if r["title"] is not None
    }
    blank = sorted(r["id"] for r in source_rows if r["title"] is None)
    written = json.loads(ledger.read_text())
    # The mutator's own record and the source agree: the expectation is independent.
    assert {int(k): v for k, v in written["live"].items()} == expected
    assert written["blank"] == blank
    quarantined = sorted(
        json.loads(r["key"])["id"]
        for r in DeltaTable(str(tmp_path / "target_quarantine")).to_pyarrow_table().to_pylist()
    )
    # As a JVM-free consumer reads it: delta-rs's scan applies the deletion vectors.
    scan = DeltaTable(str(target)).scan()
    rows = pa.RecordBatchReader.from_stream(scan).read_all().to_pylist()
    keys = [r["id"] for r in rows]
    by_key = {r["id"]: r for r in rows}
    missing = sorted(set(expected) - set(by_key))
    extra = sorted(set(by_key) - set(expected))
    duplicates = len(keys) - len(set(keys))
    stale = sorted(
        k
        for k in set(expected) & set(by_key)
        if by_key[k]["text_hash"] != hashlib.sha256(expected[k].encode()).hexdigest()
    )
    sample = rng.sample(sorted(set(expected) & set(by_key)), 20)
    vectors, _ = encoder.encode([expected[k] for k in sample])
    wrong_vectors = [
        k
        for k, v in zip(sample, vectors, strict=True)
        if float(np.asarray(by_key[k]["embedding"]) @ v) < 0.9999
    ]
    log_text = log.read_text(errors="replace")
    print(
        f"\nfault test: {sum(kills.values())} SIGKILLs ({kills}); killed by the job itself at "
        f"after_merge={log_text.count('kill at after_merge')}, "
        f"between_writes={log_text.count('kill at between_writes')}, "
        f"before_merge={log_text.count('kill at before_merge')}; "
        f"source commits={written['commits']}; batches committed={_batches_committed(checkpoint)}; "
        f"quarantine retries={retries}"
        f"\n  expected keys={len(expected)} target rows={len(rows)} missing={len(missing)} "
        f"extra={len(extra)} duplicate={duplicates} stale text={len(stale)} "
        f"wrong vectors={len(wrong_vectors)} of {len(sample)} sampled; "
        f"blank keys={len(blank)} quarantined={len(quarantined)}"
    )
    assert (missing, extra, duplicates, stale, wrong_vectors) == ([], [], 0, [], [])
    assert blank and quarantined == blank
    assert retries == {"refused beside the stream": 2, "between kills": 1}
    assert log_text.count("kill at after_merge") >= 2
    assert log_text.count("kill at between_writes") and log_text.count("kill at before_merge")
