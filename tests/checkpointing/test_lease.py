"""The checkpoint lease: one job per checkpoint, and a killed job never blocks its restart."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltavec.checkpointing.lease import CheckpointLease
from deltavec.checkpointing.lease_stores import LEASE_DIR, LocalStore, store_for
from deltavec.errors import CheckpointError


def _lease(location: Path, ttl_s: float = 30.0) -> CheckpointLease:
    return CheckpointLease(store_for(str(location)), location=str(location), ttl_s=ttl_s)


def _write_holder(location: Path, generation: int, **fields: object) -> None:
    folder = location / LEASE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    holder = {
        "owner": "someone",
        "host": "another-host",
        "pid": 1,
        "started": None,
        "renewed_at": time.time(),
        "beat": 0,
        "released": False,
    }
    holder.update(fields)
    (folder / f"{generation:020d}.json").write_text(json.dumps(holder))


def test_a_second_job_on_a_held_checkpoint_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = _lease(tmp_path)
    first.acquire()
    first.start_heartbeat()
    try:
        with pytest.raises(CheckpointError) as refused:
            _lease(tmp_path).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"checkpoint {tmp_path} is in use by another deltavec job" in message
        assert f"pid {first.pid}" in message
    finally:
        first.release()
    # Given back, the checkpoint is free at once.
    again = _lease(tmp_path)
    again.acquire()
    again.release()


def test_the_lease_of_a_sigkilled_job_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from deltavec.checkpointing.lease import CheckpointLease;"
            " from deltavec.checkpointing.lease_stores import store_for;"
            "loc = sys.argv[1]; lease = CheckpointLease(store_for(loc), location=loc);"
            "lease.acquire(); print('held', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError):
            _lease(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    started = time.monotonic()
    successor = _lease(tmp_path, ttl_s=300)
    successor.acquire()
    assert time.monotonic() - started < 5  # not the 300 s lease period
    assert successor.generation == 2
    successor.release()


def test_a_lease_held_on_another_host_is_taken_over_once_its_heartbeat_stops(
    tmp_path: Path,
) -> None:
    _write_holder(tmp_path, 7)
    started = time.monotonic()
    lease = _lease(tmp_path, ttl_s=3)
    lease.acquire(wait_s=10)
    assert 2.5 <= time.monotonic() - started < 10
    assert lease.generation == 8
    lease.release()


def test_a_lease_renewed_on_another_host_is_refused(tmp_path: Path) -> None:
    _write_holder(tmp_path, 3)

    def renew() -> None:
        time.sleep(1)
        _write_holder(tmp_path, 3, beat=1)

    import threading

    threading.Thread(target=renew, daemon=True).start()
    with pytest.raises(CheckpointError, match="pid 1 on another-host"):
        _lease(tmp_path, ttl_s=6).acquire()


def test_a_job_that_lost_its_lease_is_told_to_stop(tmp_path: Path) -> None:
    lost: list[str] = []
    lease = CheckpointLease(
        LocalStore(str(tmp_path / LEASE_DIR)),
        location=str(tmp_path),
        ttl_s=3,
        on_lost=lost.append,
    )
    lease.acquire()
    lease.start_heartbeat()
    # Another job took over (this one was paused longer than the lease period).
    _write_holder(tmp_path, 2)
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.2)
    lease.release()
    assert lease.lost
    assert lost and "lease lost to pid 1 on another-host" in lost[0]
    # The new holder's lease is left alone.
    assert (tmp_path / LEASE_DIR / f"{2:020d}.json").exists()


def test_deltavec_run_on_a_checkpoint_in_use_exits_with_one_line_and_touches_nothing(
    tmp_path: Path,
) -> None:
    from tests.conftest import write_config

    config = write_config(tmp_path)
    running = _lease(tmp_path / "checkpoint")  # what a running job holds
    running.acquire()
    running.start_heartbeat()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "deltavec.cli", "run", "--once", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        running.release()
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"deltavec: error: checkpoint {tmp_path / 'checkpoint'} is in use")
    assert f"pid {running.pid}" in error
    assert not (tmp_path / "target").exists()


def test_a_live_lease_on_a_host_whose_clock_is_behind_is_refused(tmp_path: Path) -> None:
    # The holder renews every half second, but its wall clock is an hour behind:
    # only the heartbeat changing says it is alive.
    import threading

    skewed = time.time() - 3600
    _write_holder(tmp_path, 4, renewed_at=skewed)
    stop = threading.Event()

    def renew() -> None:
        beat = 0
        while not stop.wait(0.5):
            beat += 1
            _write_holder(tmp_path, 4, renewed_at=skewed + beat / 2, beat=beat)

    threading.Thread(target=renew, daemon=True).start()
    try:
        with pytest.raises(CheckpointError, match="pid 1 on another-host"):
            _lease(tmp_path, ttl_s=3).acquire()
    finally:
        stop.set()
    assert sorted(p.name for p in (tmp_path / LEASE_DIR).glob("*.json")) == [f"{4:020d}.json"]


def test_a_lease_file_caught_half_written_is_not_free(tmp_path: Path) -> None:
    folder = tmp_path / LEASE_DIR
    folder.mkdir(parents=True)
    (folder / f"{1:020d}.json").write_text('{"owner": "someone", "ho')  # cut short
    started = time.monotonic()
    lease = _lease(tmp_path, ttl_s=2)
    lease.acquire()
    # Taken only after the file stayed unchanged for a whole lease period.
    assert time.monotonic() - started >= 1.9
    assert lease.generation == 2
    lease.release()


def test_lease_files_appear_whole(tmp_path: Path) -> None:
    import threading

    store = LocalStore(str(tmp_path / LEASE_DIR))
    payload = json.dumps({"owner": "x" * 200_000})
    seen_partial: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for name in store.names():
                text = store.read(name)
                if text is not None and text != payload:
                    seen_partial.append(name)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for generation in range(1, 200):
        assert store.create_exclusive(f"{generation:020d}.json", payload)
        assert not store.create_exclusive(f"{generation:020d}.json", payload)
        store.overwrite(f"{generation:020d}.json", payload)
    done.set()
    watcher.join()
    assert seen_partial == []
    assert len(store.names()) == 199  # no temporary file left behind


def test_a_sink_whose_job_lost_the_lease_writes_nothing(tmp_path: Path) -> None:
    from deltavec.config import TableRef
    from deltavec.embed.udf import EmbedBatches
    from deltavec.sink.batch import MergeSink

    lease = _lease(tmp_path, ttl_s=3)
    lease.acquire()
    lease.start_heartbeat()
    _write_holder(tmp_path, 2)  # another job took the checkpoint over
    deadline = time.monotonic() + 10
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.2)
    sink = MergeSink(
        target=TableRef(path=str(tmp_path / "target")),
        quarantine=TableRef(path=str(tmp_path / "quarantine")),
        checkpoint=object(),  # type: ignore[arg-type] - never reached
        keys=["id"],
        template="{title}",
        text_columns=["title"],
        mode="append",
        embed=EmbedBatches(model="default", spec=None),  # type: ignore[arg-type]
        model_identity="m",
        dim=3,
        parallelism=1,
        still_leased=lambda: not lease.lost,
    )
    try:
        # The batch is never looked at: no Spark, no table is touched.
        with pytest.raises(CheckpointError, match="batch 5 not written: this job lost"):
            sink(None, 5)  # type: ignore[arg-type]
    finally:
        lease.release()
    assert not (tmp_path / "target").exists()


@pytest.mark.slow
def test_a_lease_through_hadoop_is_exclusive_and_written_whole(
    spark: object, tmp_path: Path
) -> None:
    from deltavec.checkpointing.lease_stores import HadoopStore

    store = HadoopStore(spark, f"file://{tmp_path}/{LEASE_DIR}")  # type: ignore[arg-type]
    assert store.create_exclusive("00000000000000000001.json", '{"beat": 0}')
    assert not store.create_exclusive("00000000000000000001.json", '{"beat": 9}')
    store.overwrite("00000000000000000001.json", '{"beat": 1}')
    assert store.read("00000000000000000001.json") == '{"beat": 1}'
    assert store.names() == ["00000000000000000001.json"]  # no temporary file left
