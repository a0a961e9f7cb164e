"""OPTIMIZE and VACUUM on the target while the stream writes: conflicts retried, nothing lost."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from deltavec.search import VectorIndex
from deltavec.sink import transactions
from deltavec.sink.transactions import retry_conflicts
from tests.conftest import read_target, write_config
from tests.source_mutator import create

pytestmark = pytest.mark.slow


def test_a_real_delta_conflict_with_optimize_is_retried_and_applied_once(
    spark: Any, tmp_path: Path
) -> None:
    """A MERGE that started before a concurrent OPTIMIZE committed conflicts, and retries."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    path = str(tmp_path / "table")
    for start in range(0, 100, 10):  # ten small files for OPTIMIZE to compact
        spark.range(start, start + 10).withColumn("v", F.lit("old")).write.format("delta").mode(
            "append"
        ).save(path)
    reached, released = tmp_path / "merge-reached-source", tmp_path / "optimize-done"

    @F.udf(StringType())
    def gate(value: str) -> str:
        # Runs inside the MERGE, after its transaction read the table: the first
        # time, hold the MERGE until OPTIMIZE has committed.
        import os
        import time as t

        if not os.path.exists(released):
            open(reached, "a").close()
            deadline = t.monotonic() + 120
            while not os.path.exists(released) and t.monotonic() < deadline:
                t.sleep(0.1)
        return value

    def optimize_when_reached() -> None:
        deadline = time.monotonic() + 120
        while not reached.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        spark.sql(f"OPTIMIZE delta.`{path}`")
        released.touch()

    conflicts: list[str] = []
    transactions.on_retry(conflicts.append)
    attempts = 0

    def merge() -> None:
        nonlocal attempts
        attempts += 1
        # One partition: the held task takes one of the two task slots, OPTIMIZE the other.
        source = spark.range(95, 105, numPartitions=1).withColumn("v", gate(F.lit("new")))
        (
            DeltaTable.forPath(spark, path)
            .alias("t")
            .merge(source.alias("s"), "t.id = s.id")
            .whenMatchedUpdate(set={"v": "s.v"})
            .whenNotMatchedInsert(values={"id": "s.id", "v": "s.v"})
            .execute()
        )

    optimizer = threading.Thread(target=optimize_when_reached)
    optimizer.start()
    try:
        retry_conflicts(merge, what="test MERGE", sleep=lambda _: None)
    finally:
        transactions._retries_listeners.remove(conflicts.append)
        optimizer.join()

    assert attempts == 2
    assert conflicts and conflicts[0].startswith("Concurrent")
    rows = {r["id"]: r["v"] for r in spark.read.format("delta").load(path).collect()}
    assert sorted(rows) == list(range(105))
    assert {k for k, v in rows.items() if v == "new"} == set(range(95, 105))
    operations = [
        r["operation"]
        for r in spark.sql(f"DESCRIBE HISTORY delta.`{path}`").orderBy("version").collect()
    ]
    assert operations[-2:] == ["OPTIMIZE", "MERGE"]


def test_optimize_and_vacuum_while_the_stream_writes_lose_nothing(
    spark: Any, tmp_path: Path
) -> None:
    from deltalake import DeltaTable as SourceTable
    from deltalake import write_deltalake

    from tests.source_mutator import _table

    source, target = tmp_path / "source", tmp_path / "target"
    create(str(source), rows=40)
    config = load_config(
        write_config(
            tmp_path,
            source={"mode": "changes", "max_files_per_trigger": 2},
            target={"max_rows_per_file": 10},
            trigger={"interval": "1 second"},
        )
    )
    job = Job(config, spark)
    failures: list[BaseException] = []

    def run_job() -> None:
        try:
            job.run(once=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failures.append(exc)

    runner = threading.Thread(target=run_job)
    runner.start()
    maintenance = {"optimize": 0, "vacuum": 0, "files_removed": 0}
    stop = threading.Event()

    def maintain() -> None:
        # Files OPTIMIZE removed become VACUUM's after 0.01 h (36 s): longer than a
        # micro-batch here, so no running MERGE loses a file it reads.
        while not stop.is_set():
            try:
                spark.sql(f"OPTIMIZE delta.`{target}` ZORDER BY (id)")
                maintenance["optimize"] += 1
                removed = spark.sql(f"VACUUM delta.`{target}` RETAIN 0.01 HOURS").count()
                maintenance["files_removed"] += removed
                maintenance["vacuum"] += 1
            except Exception as exc:  # noqa: BLE001 - maintenance may lose a race itself
                if "AnalysisException" in type(exc).__name__ and "not a Delta table" in str(exc):
                    time.sleep(1)  # the job has not created the target yet
                elif transactions.conflict_name(exc) is None:
                    failures.append(exc)
                    return
            time.sleep(0.5)

    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    # VACUUM lists the table in this many tasks (10,000 by default): 35-50 s of task
    # overhead per VACUUM on two cores, and the stream's jobs queue behind them.
    spark.conf.set("spark.sql.sources.parallelPartitionDiscovery.parallelism", "2")
    conflicts: list[str] = []
    transactions.on_retry(conflicts.append)
    maintainer = threading.Thread(target=maintain)
    maintainer.start()
    next_id = 1000
    try:
        # The first batch (JVM warm-up, model load on the workers) may take minutes
        # on a busy machine.
        deadline = time.monotonic() + 900
        while not (job.sink and job.sink.checkpoint.last_committed_batch() is not None):
            assert time.monotonic() < deadline and not failures, "the stream never started"
            time.sleep(1)
        # Source changes through deltalake, not this Spark session: the sink sets
        # session-wide txn settings while it writes.
        for round_ in range(10):
            ids = list(range(next_id, next_id + 5))
            next_id += 5
            write_deltalake(
                str(source),
                _table(ids, [f"new {i}" for i in ids], ["x"] * 5, [2024] * 5),
                mode="append",
            )
            table = SourceTable(str(source))
            table.update(predicate=f"id = {round_}", updates={"title": f"'edited {round_}'"})
            table.delete(f"id = {20 + round_}")
            time.sleep(3)
    finally:
        stop.set()
        maintainer.join()
        job.request_stop()
        runner.join(timeout=600)
        transactions._retries_listeners.remove(conflicts.append)
        spark.conf.unset("spark.databricks.delta.retentionDurationCheck.enabled")
        spark.conf.unset("spark.sql.sources.parallelPartitionDiscovery.parallelism")

    assert not failures, failures
    # What the continuous run had not reached yet, drained in larger batches.
    drain = write_config(
        tmp_path,
        source={"mode": "changes", "max_files_per_trigger": 1000},
        target={"max_rows_per_file": 10},
    )
    Job(load_config(drain), spark).run(once=True)
    expected = {
        r["id"]: f"{r['title']} [SEP] {r['abstract']}"
        for r in SourceTable(str(source)).to_pyarrow_table().to_pylist()
    }
    rows = read_target(spark, target)
    by_key = {r["id"]: r for r in rows}
    print(
        f"\nmaintenance: {maintenance}; conflicts retried by the sink: {len(conflicts)} "
        f"({', '.join(sorted(set(conflicts))) or 'none'})"
    )
    assert maintenance["optimize"] >= 3 and maintenance["vacuum"] >= 3
    assert len(rows) == len(by_key) == len(expected)
    assert sorted(by_key) == sorted(expected)
    assert all(
        by_key[k]["text_hash"] == hashlib.sha256(v.encode()).hexdigest()
        for k, v in expected.items()
    )
    # The search consumer's reader applies the deletion vectors the MERGEs left.
    assert len(VectorIndex(str(target))) == len(expected)
