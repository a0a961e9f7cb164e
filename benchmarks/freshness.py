"""Freshness benchmark: how soon a small source commit can be found in the target.

The job runs as a user runs it (``deltavec run``, its own process, ``changes``
mode, ``trigger.interval`` of one second by default) over a source of
``--target-rows`` rows whose target already holds every one of them. Then:

* ``startup_s``: a 10-row commit is made, the job is started, and the clock runs
  from the command's start until a consumer's ``VectorIndex.refresh()`` finds
  those rows (the model is on disk; nothing is embedded but those 10 rows);
* inserts: ``--commits`` commits of ``--rows`` new rows each, one every
  ``--every`` seconds, written by this process with delta-rs (no Spark), each
  timed from its commit to the refresh that finds all its keys;
* updates: ``--updates`` commits that change the text of 10 existing keys,
  each timed until a search with the new text's own vector finds every key as
  its nearest row (so the new vector, not only the row, is searchable).

Setting up the 100,000-row target is not timed: its vectors are synthetic, with
the model identity and text hashes the job computes, and a first ``--once``
run finds every row unchanged and embeds nothing.

The last line printed is one JSON object: ``p50_s``, ``p90_s``, ``max_s`` for
inserts, ``update_p50_s``, ``startup_s``, and the mean per-stage seconds of the
timed micro-batches from the job's batch log lines.

    python benchmarks/freshness.py --target-rows 20000      # the set-up at 100,000 rows
                                                            # still takes over 7 minutes
    python benchmarks/freshness.py --interval "0 seconds"   # as fast as possible
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "streaming"))

TEMPLATE = "{title} [SEP] {abstract}"
SCHEMA = pa.schema([("id", pa.int64()), ("title", pa.string()), ("abstract", pa.string())])
STAGES = ("read_s", "embed_s", "merge_s", "total_s")
BATCH_LINE = re.compile(r"event=batch\b(?P<fields>.*)")
FIELD = re.compile(r"(\w+)=(\S*)")
# A consumer polls about this often; finer than a Delta commit takes.
POLL_S = 0.05


def paper(i: int, revision: int = 0) -> dict[str, Any]:
    """A short paper-like row; a new revision changes its text."""
    words = ["delta", "vector", "stream", "index", "search", "merge", "model", "batch"]
    topic = " ".join(words[(i + k) % len(words)] for k in range(3))
    suffix = f" (revision {revision})" if revision else ""
    return {
        "id": i,
        "title": f"Paper {i} on {topic}{suffix}",
        "abstract": f"We study {topic} at scale, item {i}{suffix}.",
    }


def text_of(row: dict[str, Any]) -> str:
    return TEMPLATE.format(**row)


def write_config(root: Path, interval: str) -> Path:
    config = root / "deltavec.toml"
    config.write_text(
        f"""
[source]
path = "{root / "source"}"
key = ["id"]
template = "{TEMPLATE}"
mode = "changes"

[target]
path = "{root / "target"}"

[checkpoint]
location = "{root / "checkpoint"}"

[trigger]
interval = "{interval}"

[spark]
master = "local[*]"

[spark.conf]
"spark.ui.enabled" = "false"

[metrics]
port = 0
""",
        encoding="utf-8",
    )
    return config


def deltavec(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltavec.cli", *args]


def job_env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO / "streaming"), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


# -- set-up (not timed) ----------------------------------------------------------------


def build_target(root: Path, config: Path, rows: int) -> None:
    """A ``rows``-row source and a target that already holds a vector for each row.

    The target is created by the job's own checks (``Job.prepare``), so it has the
    properties a job writes; its rows carry the model identity and the text hash the
    job computes, with random unit vectors. A ``--once`` run then drains the source
    finding every row unchanged, and leaves the checkpoint at its latest version.
    """
    from deltalake import write_deltalake
    from pyspark.sql import functions as F

    from deltavec.columns import DIM, EMBEDDED_AT, EMBEDDING, MODEL, SOURCE_VERSION, TEXT_HASH
    from deltavec.commands.job import Job
    from deltavec.config import load_config
    from deltavec.runtime.session import build_session
    from deltavec.source.text import render, text_hash

    source = pa.Table.from_pylist([paper(i) for i in range(rows)], schema=SCHEMA)
    write_deltalake(
        str(root / "source"), source, configuration={"delta.enableChangeDataFeed": "true"}
    )
    cfg = load_config(config)
    spark = build_session(
        master="local[2]", app_name="freshness-setup", conf={"spark.ui.enabled": "false"}
    )
    try:
        job = Job(cfg, spark)
        job.prepare()
        job.close()
        # Unit vectors computed in Spark from the key (nothing to ship from Python):
        # far from any real text's vector, so a search finds a row only once its
        # real vector has landed.
        frame = spark.read.format("delta").load(str(root / "source"))
        raw = F.transform(
            F.sequence(F.lit(1), F.lit(job.dim)),
            lambda j: F.sin(F.col("id") * F.lit(12.9898) + j * F.lit(78.233)),
        )
        norm = F.sqrt(F.aggregate(raw, F.lit(0.0), lambda acc, x: acc + x * x))
        frame = frame.withColumn(
            EMBEDDING, F.transform(raw, lambda x: x / norm).cast("array<float>")
        )
        target_schema = spark.read.format("delta").load(str(root / "target")).schema
        synthetic = frame.select(
            F.col("id"),
            F.col(EMBEDDING),
            F.lit(job.model_identity).alias(MODEL),
            F.lit(job.dim).alias(DIM),
            text_hash(render(TEMPLATE)).alias(TEXT_HASH),
            F.lit(0).cast("long").alias(SOURCE_VERSION),
            F.current_timestamp().alias(EMBEDDED_AT),
        ).select(*[f.name for f in target_schema.fields])
        synthetic.write.format("delta").mode("append").save(str(root / "target"))
    finally:
        spark.stop()
    drained = subprocess.run(
        deltavec("run", "--once", "--config", str(config)),
        env=job_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if drained.returncode != 0:
        raise SystemExit(f"the set-up run failed:\n{drained.stderr[-3000:]}")
    output = (drained.stdout + drained.stderr).splitlines()
    batches = [parse_batch(line) for line in output if "event=batch" in line]
    embedded = sum(int(b.get("embedded", 0)) for b in batches)
    if embedded:
        raise SystemExit(f"the set-up run embedded {embedded} rows; the synthetic target is off")


# -- the running job and its consumer --------------------------------------------------


def parse_batch(line: str) -> dict[str, str]:
    found = BATCH_LINE.search(line)
    return dict(FIELD.findall(found.group("fields"))) if found else {}


@dataclass
class JobLog:
    """The job's output, read line by line on a thread."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    batches: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def follow(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "event=batch" in line:
                self.batches.append((time.time(), parse_batch(line)))


class Consumer:
    """A search consumer: refreshes in a loop and tells when a condition first holds."""

    def __init__(self, target: Path) -> None:
        from deltavec.search import open_search

        self.search = open_search(str(target))
        self.index = self.search.index
        self.lock = threading.Lock()
        self.waiting: list[tuple[Callable[[], bool], list[float]]] = []
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.index.refresh()
                with self.lock:
                    pending = list(self.waiting)
                for check, seen in pending:
                    if not seen and check():
                        seen.append(time.time())
                        with self.lock:
                            self.waiting.remove((check, seen))
            except Exception as exc:  # noqa: BLE001 - reported, and the benchmark fails
                self.errors.append(repr(exc))
            time.sleep(POLL_S)

    def when(self, check: Callable[[], bool]) -> list[float]:
        seen: list[float] = []
        with self.lock:
            self.waiting.append((check, seen))
        return seen

    def has_keys(self, ids: list[int]) -> Callable[[], bool]:
        wanted = pa.table({"id": pa.array(ids, pa.int64())})
        return lambda: len(self.index.slots_of(wanted)) == len(ids)

    def finds_new_vectors(self, rows: list[dict[str, Any]]) -> Callable[[], bool]:
        queries = [(row["id"], self.search.embed(text_of(row))) for row in rows]

        def check() -> bool:
            for key, vector in queries:
                hits = self.index.search(vector, 1)
                if not hits or hits[0].key["id"] != key or hits[0].score < 0.999:
                    return False
            return True

        return check


def wait_for(seen: list[float], timeout: float, what: str) -> float:
    deadline = time.time() + timeout
    while not seen:
        if time.time() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)
    return seen[0]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=20, help="insert commits to time")
    parser.add_argument("--rows", type=int, default=10, help="rows per insert commit")
    parser.add_argument("--every", type=float, default=4.0, help="seconds between commits")
    parser.add_argument("--updates", type=int, default=5, help="update commits of 10 keys")
    parser.add_argument("--target-rows", type=int, default=100_000)
    parser.add_argument("--interval", default="1 second", help="the job's trigger.interval")
    parser.add_argument("--timeout", type=float, default=120.0, help="per commit, seconds")
    args = parser.parse_args()

    from deltalake import DeltaTable, write_deltalake

    root = Path(tempfile.mkdtemp(prefix="deltavec-freshness-"))
    process = None
    consumer = None
    try:
        config = write_config(root, args.interval)
        build_target(root, config, args.target_rows)
        source = str(root / "source")
        consumer = Consumer(root / "target")
        threading.Thread(target=consumer.run, daemon=True).start()

        next_id = args.target_rows
        first = list(range(next_id, next_id + args.rows))
        next_id += args.rows
        write_deltalake(
            source, pa.Table.from_pylist([paper(i) for i in first], schema=SCHEMA), mode="append"
        )
        started = time.time()
        process = subprocess.Popen(
            deltavec("run", "--config", str(config)),
            env=job_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log = JobLog(process)
        threading.Thread(target=log.follow, daemon=True).start()
        startup = (
            wait_for(consumer.when(consumer.has_keys(first)), 300, "the first batch") - started
        )
        timed_from = len(log.batches)

        inserts: list[float] = []
        for _ in range(args.commits):
            ids = list(range(next_id, next_id + args.rows))
            next_id += args.rows
            rows = pa.Table.from_pylist([paper(i) for i in ids], schema=SCHEMA)
            tick = time.time()
            write_deltalake(source, rows, mode="append")
            committed = time.time()
            seen = consumer.when(consumer.has_keys(ids))
            inserts.append(wait_for(seen, args.timeout, f"keys {ids[0]}..") - committed)
            time.sleep(max(0.0, args.every - (time.time() - tick)))
        insert_batches = len(log.batches)

        updates: list[float] = []
        for round_ in range(1, args.updates + 1):
            ids = [int(i) for i in np.linspace(0, args.target_rows - 1, 10).astype(int) + round_]
            changed = [paper(i, revision=round_) for i in ids]
            check = consumer.finds_new_vectors(changed)
            tick = time.time()
            # One commit that changes the ten keys' text, as an upstream MERGE would.
            (
                DeltaTable(source)
                .merge(
                    pa.Table.from_pylist(changed, schema=SCHEMA),
                    predicate="t.id = s.id",
                    source_alias="s",
                    target_alias="t",
                )
                .when_matched_update_all()
                .execute()
            )
            committed = time.time()
            seen = consumer.when(check)
            updates.append(wait_for(seen, args.timeout, f"update round {round_}") - committed)
            time.sleep(max(0.0, args.every - (time.time() - tick)))
        if consumer.errors:
            raise SystemExit(f"the consumer failed: {consumer.errors[0]}")

        def stage_means(batches: list[tuple[float, dict[str, str]]]) -> dict[str, float]:
            return {
                s: round(float(np.mean([float(b[s]) for _, b in batches if b.get(s)])), 3)
                for s in STAGES
                if any(b.get(s) for _, b in batches)
            }

        result = {
            "interval": args.interval,
            "target_rows": args.target_rows,
            "commits": args.commits,
            "rows_per_commit": args.rows,
            "p50_s": round(percentile(inserts, 50), 3),
            "p90_s": round(percentile(inserts, 90), 3),
            "max_s": round(max(inserts), 3),
            "update_p50_s": round(percentile(updates, 50), 3),
            "update_max_s": round(max(updates), 3) if updates else None,
            "startup_s": round(startup, 3),
            "insert_batches": insert_batches - timed_from,
            "stages_insert": stage_means(log.batches[timed_from:insert_batches]),
            "stages_update": stage_means(log.batches[insert_batches:]),
        }
        print(json.dumps(result))
    finally:
        if consumer is not None:
            consumer.stop.set()
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
