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
  its nearest row (so the new vector, not only the row, is searchable);
* the floor: the job is stopped and ``--floor-commits`` more inserts are timed
  through ``freshness_floor.py``, a stream over the same source, with the same
  session, trigger and consumer, that only appends each batch's rows (same vector
  for every row) under Delta's idempotent-write options: what any exactly-once
  Spark stream into Delta pays on this machine before doing any work of its own.
  ``ratio_p50_vs_floor`` says how much the job adds.

Setting up the 100,000-row target is not timed (under 3 minutes on 2 cores): the
target is created by the job's own code and its rows are written with delta-rs,
their vectors synthetic, with the model identity and text hashes the job
computes; a first drain finds every row unchanged and embeds nothing.

The last line printed is one JSON object: ``p50_s``, ``p90_s``, ``max_s`` for
inserts, ``update_p50_s``, ``startup_s``, the mean per-stage seconds of the
timed micro-batches from the job's batch log lines, and ``floor_p50_s``,
``floor_p90_s``, ``floor_max_s``, ``floor_startup_s`` and ``ratio_p50_vs_floor``.

    python benchmarks/freshness.py                          # make bench-freshness
    python benchmarks/freshness.py --interval "0 seconds"   # as fast as possible
"""

from __future__ import annotations

import argparse
import hashlib
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
from datetime import UTC, datetime
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
# About the rows per row group of the target's parquet.block.size (128 KiB, 384 floats a row).
TARGET_ROW_GROUP = 100
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

    The source is written with delta-rs. The target is created by the job's own
    code (``Job.prepare``, so it has exactly the schema and properties a job
    writes), and its rows are appended with delta-rs: the model identity and the
    text hash the job computes, with random unit vectors, in row groups of about
    the size the target's ``parquet.block.size`` gives. The same session's stream
    then drains the source once (``availableNow``), finding every row unchanged,
    and leaves the checkpoint at the source's latest version.
    """
    from deltalake import WriterProperties, write_deltalake

    from deltavec.commands.job import Job, RunSummary
    from deltavec.config import load_config
    from deltavec.runtime.session import build_session

    papers = [paper(i) for i in range(rows)]
    write_deltalake(
        str(root / "source"),
        pa.Table.from_pylist(papers, schema=SCHEMA),
        configuration={"delta.enableChangeDataFeed": "true"},
    )
    cfg = load_config(config)
    # The set-up's Python workers, too, import this checkout's package.
    os.environ["PYTHONPATH"] = job_env()["PYTHONPATH"]
    spark = build_session(
        master="local[2]", app_name="freshness-setup", conf={"spark.ui.enabled": "false"}
    )
    try:
        job = Job(cfg, spark)
        job.prepare()
        write_deltalake(
            str(root / "target"),
            synthetic_target(papers, identity=job.model_identity, dim=job.dim),
            mode="append",
            writer_properties=WriterProperties(max_row_group_size=TARGET_ROW_GROUP),
        )
        summary = RunSummary()
        job.on_batch(summary.add)
        job.start(once=True).awaitTermination()
        job.close()
    finally:
        spark.stop()
    if summary.embedded or summary.rows_read != rows:
        raise SystemExit(
            f"the set-up drain read {summary.rows_read} rows and embedded {summary.embedded}; "
            "the synthetic target is off"
        )


def synthetic_target(papers: list[dict[str, Any]], *, identity: str, dim: int) -> pa.Table:
    """Target rows for ``papers`` in the target's own schema: the job's model identity and
    text hashes, and random unit vectors (far from any real text's vector, so a search
    finds a row only once its real vector has landed)."""
    from deltavec.columns import DIM, EMBEDDED_AT, EMBEDDING, MODEL, SOURCE_VERSION, TEXT_HASH

    rng = np.random.default_rng(17)
    vectors = rng.standard_normal((len(papers), dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    element = pa.field("element", pa.float32(), nullable=False)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim).cast(
        pa.list_(element)
    )
    hashes = [hashlib.sha256(text_of(p).encode("utf-8")).hexdigest() for p in papers]
    schema = pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field(EMBEDDING, pa.list_(element), nullable=False),
            pa.field(MODEL, pa.string(), nullable=False),
            pa.field(DIM, pa.int32(), nullable=False),
            pa.field(TEXT_HASH, pa.string(), nullable=False),
            pa.field(SOURCE_VERSION, pa.int64()),
            pa.field(EMBEDDED_AT, pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )
    n = len(papers)
    return pa.Table.from_arrays(
        [
            pa.array([p["id"] for p in papers], pa.int64()),
            embedding,
            pa.array([identity] * n, pa.string()),
            pa.array([dim] * n, pa.int32()),
            pa.array(hashes, pa.string()),
            pa.array([0] * n, pa.int64()),
            pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC")),
        ],
        schema=schema,
    )


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


def stop(process: subprocess.Popen[str] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def time_inserts(
    consumer: Consumer, source: str, first_id: int, commits: int, rows: int, every: float,
    timeout: float,
) -> list[float]:  # fmt: skip
    """Seconds from each of ``commits`` new-row commits to the refresh that finds its keys."""
    from deltalake import write_deltalake

    seconds: list[float] = []
    for n in range(commits):
        ids = list(range(first_id + n * rows, first_id + (n + 1) * rows))
        tick = time.time()
        write_deltalake(
            source, pa.Table.from_pylist([paper(i) for i in ids], schema=SCHEMA), mode="append"
        )
        committed = time.time()
        seen = consumer.when(consumer.has_keys(ids))
        seconds.append(wait_for(seen, timeout, f"keys {ids[0]}..") - committed)
        time.sleep(max(0.0, every - (time.time() - tick)))
    return seconds


def start_job(
    command: list[str], consumer: Consumer, keys: list[int], what: str
) -> tuple[subprocess.Popen[str], JobLog, float]:
    """Start a streaming job's process; seconds from its start until ``consumer``
    finds ``keys`` (a commit made before the start)."""
    started = time.time()
    process = subprocess.Popen(
        command, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = JobLog(process)
    threading.Thread(target=log.follow, daemon=True).start()
    try:
        seen = wait_for(consumer.when(consumer.has_keys(keys)), 300, what)
    except SystemExit:
        sys.stderr.write("".join(log.lines[-40:]))
        stop(process)
        raise
    return process, log, seen - started


def floor(root: Path, interval: str, first_id: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same inserts through ``freshness_floor.py``: a stream that only appends.

    Its target is a copy of the job's (the same 100,000 rows, so its consumer's
    refreshes cost the same); it starts from a 10-row commit it must make visible
    first, as the job's start-up is timed.
    """
    from deltalake import DeltaTable, write_deltalake

    source = str(root / "source")
    shutil.copytree(root / "target", root / "floor_target")
    consumer = Consumer(root / "floor_target")
    threading.Thread(target=consumer.run, daemon=True).start()
    warm_up = list(range(first_id, first_id + args.rows))
    write_deltalake(
        source, pa.Table.from_pylist([paper(i) for i in warm_up], schema=SCHEMA), mode="append"
    )
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "freshness_floor.py"),
        source,
        str(root / "floor_target"),
        str(root / "floor_checkpoint"),
        interval,
        str(DeltaTable(source).version()),
    ]
    try:
        process, log, startup = start_job(command, consumer, warm_up, "the floor's start")
        try:
            inserts = time_inserts(
                consumer, source, first_id + args.rows, args.floor_commits, args.rows, args.every,
                args.timeout,
            )  # fmt: skip
        except SystemExit:
            sys.stderr.write("".join(log.lines[-40:]))
            raise
        finally:
            stop(process)
    finally:
        consumer.stop.set()
    if consumer.errors:
        raise SystemExit(f"the floor's consumer failed: {consumer.errors[0]}")
    return {
        "floor_p50_s": round(percentile(inserts, 50), 3),
        "floor_p90_s": round(percentile(inserts, 90), 3),
        "floor_max_s": round(max(inserts), 3),
        "floor_startup_s": round(startup, 3),
    }


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
    parser.add_argument(
        "--floor-commits",
        type=int,
        default=10,
        help="inserts timed through freshness_floor.py, a stream that only appends (0: none)",
    )
    parser.add_argument("--job-log", type=Path, help="also write the job's output to this file")
    args = parser.parse_args()

    from deltalake import DeltaTable, write_deltalake

    root = Path(tempfile.mkdtemp(prefix="deltavec-freshness-"))
    process = None
    consumer = None
    log: JobLog | None = None
    try:
        config = write_config(root, args.interval)
        set_up = time.time()
        build_target(root, config, args.target_rows)
        print(f"set-up: {time.time() - set_up:.1f}s", file=sys.stderr, flush=True)
        source = str(root / "source")
        consumer = Consumer(root / "target")
        threading.Thread(target=consumer.run, daemon=True).start()

        next_id = args.target_rows
        first = list(range(next_id, next_id + args.rows))
        next_id += args.rows
        write_deltalake(
            source, pa.Table.from_pylist([paper(i) for i in first], schema=SCHEMA), mode="append"
        )
        process, log, startup = start_job(
            deltavec("run", "--config", str(config)), consumer, first, "the first batch"
        )
        timed_from = len(log.batches)

        inserts = time_inserts(
            consumer, source, next_id, args.commits, args.rows, args.every, args.timeout
        )
        next_id += args.commits * args.rows
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
        if args.floor_commits:
            consumer.stop.set()
            stop(process)
            result.update(floor(root, args.interval, next_id + 1_000, args))
            result["ratio_p50_vs_floor"] = round(result["p50_s"] / result["floor_p50_s"], 2)
        print(json.dumps(result))
    finally:
        if args.job_log is not None and log is not None:
            args.job_log.write_text("".join(log.lines), encoding="utf-8")
        if consumer is not None:
            consumer.stop.set()
        stop(process)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
