"""Serving benchmark: `deltavec serve` under load while the target takes MERGEs.

Builds a 100,000-row target (synthetic 384-dim vectors recorded under the default
model's identity, so the server loads the real model for the queries, and each
row's text hash, as the job records it) and a
source of the same keys with text (a title, a body of vocabulary words, a
product code unique to the row, a year), written with delta-rs in files of
10,000 rows. The vectors lie in clusters (as ``benchmarks/search.py`` makes
them) around the model's own embeddings of 2,000 texts of the same vocabulary,
so the queries' vectors fall among the rows' as real ones would: random
vectors would leave every query equally far from all rows, and an approximate
index nothing to find. The server runs as its own process (``python -m deltavec.cli
serve``). Clients on loopback run 16 concurrent request loops per mode for
``--seconds`` each:

* ``vector``: a text query, embedded by the server with the target's model;
* ``keyword``: BM25 over the rendered template;
* ``hybrid``: both, fused by reciprocal rank;
* ``vector_where``: vector search restricted by ``year >= 2020`` (about 40% of rows).

Then, with ``--paced`` (by default vector at 150 queries/s, the QPS target, and
hybrid at 75), requests go out at a fixed rate whatever the answers: the latency
at that load, where the closed loops above give the most queries the server
answers (and, with 16 loops, a latency of 16 / QPS). ``targets_met`` judges
latency at the offered rate (vector at 150/s: the QPS target) and QPS from the
closed loops.

Meanwhile a writer (a process of its own, as the job is) commits a 1,000-row
MERGE (500 updated keys, 500 new) to the target and the source every 10 s; the
server refreshes every 2 s. The server and the writer each run in a session of
their own, as separate services do, so Linux's autogroup scheduler shares the
cores between them as groups (``--one-session``: both in the benchmark's session,
where every thread of the three processes competes alone). Reported per mode:
QPS, p50/p99 latency, errors; the refreshes the server applied; how it ranked
vector queries (``--index``, passed to the server: by default approximate at
this size) and their recall@10 against exact search of the version served.
The last line printed is one JSON object.

    python benchmarks/serve.py                # about 4 minutes
    python benchmarks/serve.py --index exact  # every query scans every vector
    python benchmarks/serve.py --seconds 10 --rows 20000
    # the latency at 150 vector queries/s alone, without the writer's MERGEs
    python benchmarks/serve.py --closed --paced vector=150 --merge-every 0
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "streaming"))
sys.path.insert(0, str(REPO))

from benchmarks.search import CLUSTERS, clustered  # noqa: E402

DIM = 384
FILE_ROWS = 10_000
CONCURRENCY = 16
MERGE_ROWS = 1000
MERGE_EVERY = 10.0
MODES = ("vector", "keyword", "hybrid", "vector_where")
REFRESH_SECONDS = 2.0
TEMPLATE = "{title}. {body}"
TARGETS = {
    "vector_p50_ms": 20.0,
    "vector_p99_ms": 60.0,
    "vector_qps": 150.0,
    "hybrid_p99_ms": 100.0,
}
_WORDS = [
    f"{a}{b}"
    for a in ("al", "be", "co", "da", "el", "fa", "ga", "ha", "io", "ju", "ka", "lo")
    for b in ("ron", "mex", "tid", "sul", "vor", "pak", "nel", "dis", "gor", "fen", "lum")
]


def texts(ids: np.ndarray, rng: np.random.Generator, edition: int = 0) -> pa.Table:
    words = np.array(_WORDS)
    bodies = [" ".join(words[rng.integers(0, len(words), 12)]) + f" code PX{i:06d}" for i in ids]
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "title": pa.array([f"Item {i} edition {edition}" for i in ids]),
            "body": pa.array(bodies),
            "year": pa.array((2010 + ids % 15).astype(np.int32)),
        }
    )


def centres_from_model() -> np.ndarray:
    """The default model's vectors of CLUSTERS texts of the benchmark's vocabulary."""
    from deltavec.embed.encoder import EncoderSpec
    from deltavec.embed.models import resolve_model
    from deltavec.embed.udf import get_encoder

    rng = np.random.default_rng(3)
    topics = [" ".join(rng.choice(_WORDS, 6)) for _ in range(CLUSTERS)]
    encoder = get_encoder(EncoderSpec(model=resolve_model("default"), device="cpu"))
    vectors, _ = encoder.encode(topics)
    return np.asarray(vectors, dtype=np.float32)


def vectors_for(
    source_rows: pa.Table,
    rng: np.random.Generator,
    identity: str,
    centres: np.ndarray,
    *,
    hashed: bool = True,
) -> pa.Table:
    """Target rows for ``source_rows``: a vector near a centre, and the job's text hash.

    The hash is what the job records (SHA-256 of the rendered template): the
    server tells from it which rows of a rewritten file have new text.
    ``hashed=False``: without it, as a target not written by the job may be.
    """
    from deltavec.search.source_table import render

    ids = source_rows.column("id").to_numpy()
    v = clustered(rng, centres, len(ids)).astype(np.float32)
    offsets = pa.array(np.arange(0, len(ids) * DIM + 1, DIM, dtype=np.int32))
    columns = {
        "id": pa.array(ids, pa.int64()),
        "embedding": pa.ListArray.from_arrays(offsets, pa.array(v.ravel())),
        "model": pa.array([identity] * len(ids)),
        "dim": pa.array(np.full(len(ids), DIM, np.int32)),
    }
    if hashed:
        rendered = [render(TEMPLATE, row) for row in source_rows.to_pylist()]
        columns["text_hash"] = pa.array([hashlib.sha256(t.encode()).hexdigest() for t in rendered])
    return pa.table(columns)


def build(
    root: Path, rows: int, identity: str, centres: np.ndarray, *, hashed: bool = True
) -> tuple[Path, Path]:
    from deltalake import DeltaTable, write_deltalake

    rng = np.random.default_rng(0)
    source, target = root / "source", root / "target"
    for start in range(0, rows, FILE_ROWS):
        ids = np.arange(start, min(rows, start + FILE_ROWS))
        rows_of_source = texts(ids, rng)
        write_deltalake(str(source), rows_of_source, mode="append")
        write_deltalake(
            str(target),
            vectors_for(rows_of_source, rng, identity, centres, hashed=hashed),
            mode="append",
        )
    DeltaTable(str(target)).alter.set_table_properties(
        {
            "deltavec.model": identity,
            "deltavec.model_name": "default",
            "deltavec.keys": "id",
            "deltavec.dim": str(DIM),
            "deltavec.source": str(source),
            "deltavec.template": TEMPLATE,
        },
        raise_if_not_exists=False,
    )
    return source, target


def merge_loop(source: Path, target: Path, rows: int, identity: str, centres: np.ndarray,
               every: float, stop: Any, done: Any, own_session: bool) -> None:  # fmt: skip
    """Every ``every`` s: 500 keys of one file updated, 500 new keys, in both tables.

    Runs in a process of its own, as the job that writes a target does, so it
    never holds the GIL the clients' event loop needs (measured at 150 vector
    queries/s: p99 113.7 ms this way, 109.7-127.6 ms as a thread: the writer's
    CPU, not the GIL, is what costs). ``done`` (a queue) gets each MERGE's seconds.
    ``own_session``: see ``--one-session``.
    """
    if own_session:
        os.setsid()
    rng = np.random.default_rng(1)
    edition = 1
    while every > 0 and not stop.wait(every):
        started = time.perf_counter()
        merge_once(source, target, rows, edition, rng, identity, centres)
        edition += 1
        done.put(time.perf_counter() - started)


def merge_once(source: Path, target: Path, rows: int, edition: int, rng: np.random.Generator,
               identity: str, centres: np.ndarray, *, hashed: bool = True) -> None:  # fmt: skip
    """The writer's MERGE number ``edition`` (from 1): 500 keys of one file updated, 500 new."""
    from deltalake import DeltaTable

    first = int(rng.integers(0, rows // FILE_ROWS)) * FILE_ROWS
    fresh = rows + (edition - 1) * 500
    ids = np.concatenate([np.arange(first, first + 500), np.arange(fresh, fresh + 500)])
    rows_of_source = texts(ids, rng, edition)
    for path, data in (
        (source, rows_of_source),
        (target, vectors_for(rows_of_source, rng, identity, centres, hashed=hashed)),
    ):
        (
            DeltaTable(str(path))
            .merge(data, "t.id = s.id", source_alias="s", target_alias="t")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )


def query_for(rng: np.random.Generator, mode: str, rows: int) -> dict[str, Any]:
    words = " ".join(rng.choice(_WORDS, 4))
    if mode == "keyword":
        return {"query": f"{words} PX{int(rng.integers(0, rows)):06d}", "mode": "keyword"}
    if mode == "hybrid":
        return {"query": f"{words} PX{int(rng.integers(0, rows)):06d}", "mode": "hybrid"}
    body: dict[str, Any] = {"query": words, "mode": "vector"}
    if mode == "vector_where":
        body["where"] = "year >= 2020"
    return body


async def _search(session: Any, url: str, body: dict[str, Any]) -> str | None:
    """POST one search; None when it was answered, else what went wrong."""
    import aiohttp

    try:
        async with session.post(f"{url}/search", json=body) as response:
            await response.read()
            return None if response.status == 200 else str(response.status)
    except aiohttp.ClientError as exc:
        return type(exc).__name__


def _summary(latencies: list[float], errors: dict[str, int], took: float) -> dict[str, Any]:
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "qps": round(len(latencies) / took, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


async def load(url: str, mode: str, seconds: float, rows: int) -> dict[str, Any]:
    """16 closed request loops on one aiohttp session for ``seconds``.

    aiohttp rather than httpx: the clients share the server's two cores, and
    side by side httpx spent 1.5-1.8 ms of CPU per request against aiohttp's
    0.2-0.4 ms, time the server then lacked.
    """
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds

    async def loop(worker: int, session: aiohttp.ClientSession) -> None:
        rng = np.random.default_rng(worker)
        while time.perf_counter() < deadline:
            body = {**query_for(rng, mode, rows), "k": 10}
            started = time.perf_counter()
            failure = await _search(session, url, body)
            if failure is None:
                latencies.append(time.perf_counter() - started)
            else:
                errors[failure] = errors.get(failure, 0) + 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _search(session, url, query_for(np.random.default_rng(99), mode, rows))
        started = time.perf_counter()
        await asyncio.gather(*(loop(w, session) for w in range(CONCURRENCY)))
        took = time.perf_counter() - started
    return _summary(latencies, errors, took)


async def paced(url: str, mode: str, seconds: float, rows: int, rate: float) -> dict[str, Any]:
    """Requests sent at ``rate`` a second whatever the answers (an open loop), on at
    most 16 connections: the latency at that load.

    Each request's latency runs from when it was due, not from when a connection
    was free, so an answer that holds the next request back counts against it too
    (no coordinated omission).
    """
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    rng = np.random.default_rng(7)

    async def one(session: aiohttp.ClientSession, due: float, body: dict[str, Any]) -> None:
        failure = await _search(session, url, body)
        if failure is None:
            latencies.append(time.perf_counter() - due)
        else:
            errors[failure] = errors.get(failure, 0) + 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _search(session, url, query_for(rng, mode, rows))
        bodies = [{**query_for(rng, mode, rows), "k": 10} for _ in range(int(seconds * rate))]
        # The clock starts once the bodies are made, and each request is started
        # when due: made and gathered up front, after the closed loops, the
        # first requests of a run went out up to 0.35 s late.
        sent = []
        started = time.perf_counter()
        for i, body in enumerate(bodies):
            due = started + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            sent.append(asyncio.create_task(one(session, due, body)))
        await asyncio.gather(*sent)
        took = time.perf_counter() - started
    return {"offered_qps": rate, **_summary(latencies, errors, took)}


def recall_at_10(url: str, target: Path, rows: int, queries: int = 100) -> dict[str, Any]:
    """Recall@10 of the server's vector search against exact search of the version it serves.

    Called once the target takes no more commits and the server holds its last
    version; the query vectors come from the server's own ``/embed``.
    """
    import httpx
    from deltalake import DeltaTable

    from deltavec.search import VectorIndex

    latest = DeltaTable(str(target)).version()
    deadline = time.perf_counter() + 60
    while httpx.get(f"{url}/healthz").json()["version"] != latest:
        if time.perf_counter() > deadline:
            raise SystemExit("the server did not catch up with the target's last version")
        time.sleep(0.2)
    rng = np.random.default_rng(11)
    texts = [query_for(rng, "vector", rows)["query"] for _ in range(queries)]
    embedded = httpx.post(f"{url}/embed", json={"texts": texts}, timeout=120).json()
    vectors = np.array(embedded["vectors"], dtype=np.float32)
    exact = VectorIndex(str(target), version=latest).view().search_many(vectors, 10)
    overlap = []
    for text, truth in zip(texts, exact, strict=True):
        hits = httpx.post(f"{url}/search", json={"query": text, "k": 10}).json()["hits"]
        found = {h["key"]["id"] for h in hits}
        overlap.append(len(found & {h.key["id"] for h in truth}) / 10)
    return {"recall_at_10": round(float(np.mean(overlap)), 4), "queries": queries}


def _load_of(summary: dict[str, Any]) -> str:
    if "offered_qps" in summary:
        return f"{summary['offered_qps']:g} queries/s offered"
    return f"{CONCURRENCY} closed loops"


def scrape(url: str, name: str, **labels: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def autogroup() -> bool | None:
    """Whether this Linux kernel schedules each session as a group (None: no such setting)."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=30.0, help="per mode")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument(
        "--paced",
        nargs="*",
        default=["vector=150", "hybrid=75"],
        metavar="MODE=QPS",
        help="then each MODE at a fixed QPS (an open loop), for the latency at that load",
    )
    parser.add_argument(
        "--index",
        choices=("auto", "exact", "approximate"),
        help="how the server ranks vector queries (default: the server's own, auto)",
    )
    parser.add_argument(
        "--query-runtime",
        choices=("auto", "torch", "onnx"),
        help="what runs the model for query vectors (default: the server's own, auto)",
    )
    parser.add_argument(
        "--closed",
        nargs="*",
        default=list(MODES),
        choices=MODES,
        metavar="MODE",
        help="the modes run in closed loops first (default all four)",
    )
    parser.add_argument(
        "--refresh-seconds",
        type=float,
        default=REFRESH_SECONDS,
        help="the server's --refresh-seconds (default 2)",
    )
    parser.add_argument(
        "--one-session",
        action="store_true",
        help="run the server and the writer in this process's session rather than each in "
        "its own (where Linux's autogroup scheduling then shares the CPU thread by thread)",
    )
    parser.add_argument(
        "--merge-every",
        type=float,
        default=MERGE_EVERY,
        help="seconds between the writer's MERGEs (0: none, for the latency without them)",
    )
    args = parser.parse_args()

    import httpx

    from deltavec.embed.models import model_identity, resolve_model
    from deltavec.serve.snapshot import AUTO_APPROXIMATE_ROWS

    identity = model_identity("default", resolve_model("default"))
    root = Path(tempfile.mkdtemp(prefix="deltavec-bench-serve-"))
    server = writer = None
    spawn = multiprocessing.get_context("spawn")
    stop, done = spawn.Event(), spawn.Queue()
    try:
        started = time.perf_counter()
        centres = centres_from_model()
        source, target = build(root, args.rows, identity, centres)
        built = time.perf_counter() - started
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "streaming"), str(REPO)])}
        command = [sys.executable, "-m", "deltavec.cli", "serve", "--table", str(target),
                   "--port", str(args.port),
                   "--refresh-seconds", str(args.refresh_seconds)]  # fmt: skip
        if args.index:
            command += ["--index", args.index]
        if args.query_runtime:
            command += ["--query-runtime", args.query_runtime]
        started = time.perf_counter()
        log_file = (root / "server.log").open("wb")
        # Each in a session of its own, as separate services are (a systemd unit,
        # a container): Linux then shares the CPU between them as groups, not
        # between their threads, so the writer's threads do not outnumber the server's.
        own_session = not args.one_session
        server = subprocess.Popen(command, env=env, stderr=log_file, start_new_session=own_session)
        url = f"http://127.0.0.1:{args.port}"
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.perf_counter() - started > 300:
                tail = (root / "server.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"the server did not become ready:\n{tail}")
            time.sleep(0.2)
        ready = time.perf_counter() - started
        # The server answers exactly until its first approximate index is built.
        approximate = args.index == "approximate" or (
            args.index in (None, "auto") and args.rows >= AUTO_APPROXIMATE_ROWS
        )
        while approximate and httpx.get(f"{url}/healthz").json()["index"] != "approximate":
            if time.perf_counter() - started > 600:
                raise SystemExit("the server built no approximate index within 10 minutes")
            time.sleep(0.2)
        index_ready = time.perf_counter() - started
        health = httpx.get(f"{url}/healthz").json()
        index_mode, query_runtime = health["index"], health["query_runtime"]
        writer = spawn.Process(
            target=merge_loop,
            args=(
                source,
                target,
                args.rows,
                identity,
                centres,
                args.merge_every,
                stop,
                done,
                own_session,
            ),
        )
        writer.start()
        # This process has torch loaded too (centres_from_model): frozen, its
        # 500,000 objects do not make the client's own full garbage collections
        # pause the requests it times (see deltavec.serve.collector).
        gc.collect()
        gc.freeze()
        results = {}
        for mode in args.closed:
            results[mode] = asyncio.run(load(url, mode, args.seconds, args.rows))
            print(mode, results[mode], flush=True)
        at_rate = {}
        for pace in args.paced:
            mode, rate = pace.split("=")
            at_rate[mode] = asyncio.run(paced(url, mode, args.seconds, args.rows, float(rate)))
            print(mode, "paced", at_rate[mode], flush=True)
        # Unfrozen, what was loaded is freed at exit as usual: nanobind-bound
        # modules (triton's, which torch loads) report what is left as leaks.
        gc.unfreeze()
        stop.set()
        writer.join()
        merges = [done.get() for _ in range(done.qsize())]
        recall = recall_at_10(url, target, args.rows)
        print("vector recall", recall, flush=True)
        applied = scrape(url, "deltavec_serve_refreshes_total", outcome="applied")
        failed = scrape(url, "deltavec_serve_refreshes_total", outcome="failed")
        refresh_count = scrape(url, "deltavec_serve_refresh_seconds_count")
        refresh_sum = scrape(url, "deltavec_serve_refresh_seconds_sum")
        served_version = scrape(url, "deltavec_serve_table_version")
    finally:
        stop.set()
        if writer is not None:
            writer.join(timeout=60)
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)

    # Latency is judged at the offered rate (--paced) when there is one: in the
    # closed loops it is 16 / QPS whatever the server does. QPS from the loops.
    # A target whose mode did not run is left out.
    vector = at_rate.get("vector") or results.get("vector")
    hybrid = at_rate.get("hybrid") or results.get("hybrid")
    met = {}
    if vector:
        met["vector_p50_ms"] = vector["p50_ms"] <= TARGETS["vector_p50_ms"]
        met["vector_p99_ms"] = vector["p99_ms"] <= TARGETS["vector_p99_ms"]
    if "vector" in results:
        met["vector_qps"] = results["vector"]["qps"] >= TARGETS["vector_qps"]
    if hybrid:
        met["hybrid_p99_ms"] = hybrid["p99_ms"] <= TARGETS["hybrid_p99_ms"]
    met["zero_errors"] = all(r["errors"] == 0 for r in [*results.values(), *at_rate.values()])
    judged = {name: _load_of(run) for name, run in (("vector", vector), ("hybrid", hybrid)) if run}
    print(
        json.dumps(
            {
                "benchmark": "serve",
                "rows": args.rows,
                "concurrency": CONCURRENCY,
                "seconds_per_mode": args.seconds,
                "cpus": os.cpu_count(),
                "build_seconds": round(built, 1),
                "server_ready_seconds": round(ready, 1),
                "index_ready_seconds": round(index_ready, 1),
                "index": index_mode,
                "query_runtime": query_runtime,
                "own_sessions": own_session,
                "autogroup": autogroup(),
                "vector_recall": recall,
                "modes": results,
                "paced": at_rate,
                "merges_committed": len(merges),
                "merge_mean_seconds": round(float(np.mean(merges)), 2) if merges else None,
                "refreshes_applied": int(applied),
                "refreshes_failed": int(failed),
                "refresh_mean_seconds": round(refresh_sum / refresh_count, 3)
                if refresh_count
                else None,
                "final_table_version": int(served_version),
                "targets": TARGETS,
                "targets_met": met,
                "latency_judged_at": judged,
            }
        )
    )


if __name__ == "__main__":
    main()
