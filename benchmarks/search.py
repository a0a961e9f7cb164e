"""Search benchmark: query latency, open time, and refresh vs full reload on synthetic targets.

Writes deltavec-shaped targets of 100k and 1M clustered 384-dim unit vectors with
delta-rs (no Spark, no model), in files of about 40 MB as a streaming job leaves
them, then measures:

* the time to open (read the whole table into memory);
* exact query latency p50/p99 and queries/s, one query at a time, excluding the
  query's own embedding;
* the same for the approximate FAISS IVF index, with its build time and recall@10
  against exact search on the same queries;
* at the largest size, ``refresh()`` after a 1,000-row MERGE (500 updated keys
  in one mid-table file, 500 new ones) against a full reload of the same version.

The last line printed is one JSON object with every figure.

    python benchmarks/search.py                      # 100k and 1M (needs ~8 GB RAM, ~4 GB disk)
    python benchmarks/search.py --sizes 100000 --queries 100
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

# The checkout's package (streaming/deltavec) and benchmarks, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "streaming"))

from deltavec.search import VectorIndex
from deltavec.search.approximate import default_nlist, default_nprobe

DIM = 384
MODEL = "synthetic/bench@0000000000000000"
CLUSTERS = 2000
# Rows per data file: ~40 MB of vectors, the size a streaming job's MERGEs leave.
FILE_ROWS = 26_000
WRITE_BATCH = 50_000
REFRESH_ROUNDS = 3


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """Unit vectors around random centres: real embeddings have neighbours, noise has none."""
    noise = rng.standard_normal((n, centres.shape[1]), dtype=np.float32) * 0.04
    v = centres[rng.integers(0, len(centres), n)] + noise
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rows(ids: np.ndarray, vectors: np.ndarray) -> pa.RecordBatch:
    n = len(ids)
    offsets = pa.array(np.arange(0, n * DIM + 1, DIM, dtype=np.int32))
    return pa.RecordBatch.from_pydict(
        {
            "id": pa.array(ids, pa.int64()),
            "embedding": pa.ListArray.from_arrays(offsets, pa.array(vectors.ravel())),
            "model": pa.array([MODEL] * n),
            "dim": pa.array(np.full(n, DIM, np.int32)),
        }
    )


def write_target(path: Path, n: int, centres: np.ndarray, seed: int) -> None:
    from deltalake import DeltaTable, write_deltalake

    rng = np.random.default_rng(seed)

    def batches() -> Iterator[pa.RecordBatch]:
        for start in range(0, n, WRITE_BATCH):
            stop = min(n, start + WRITE_BATCH)
            yield rows(np.arange(start, stop), clustered(rng, centres, stop - start))

    schema = rows(np.arange(1), centres[:1]).schema
    write_deltalake(
        str(path),
        pa.RecordBatchReader.from_batches(schema, batches()),
        mode="overwrite",
        target_file_size=FILE_ROWS * DIM * 4,
    )
    DeltaTable(str(path)).alter.set_table_properties(
        {"deltavec.model": MODEL, "deltavec.keys": "id", "deltavec.dim": str(DIM)},
        raise_if_not_exists=False,
    )


def latency(index: VectorIndex, queries: np.ndarray, *, exact: bool) -> dict[str, float]:
    index.search(queries[0], 10, exact=exact)  # warm caches and FAISS threads
    took = []
    for q in queries:
        started = time.perf_counter()
        index.search(q, 10, exact=exact)
        took.append(time.perf_counter() - started)
    ms = np.array(took) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "qps": round(len(ms) / float(ms.sum() / 1000), 1),
    }


def recall_at_10(index: VectorIndex, queries: np.ndarray) -> float:
    hits = 0
    for q in queries:
        exact = {h.key["id"] for h in index.search(q, 10, exact=True)}
        approx = {h.key["id"] for h in index.search(q, 10)}
        hits += len(exact & approx)
    return round(hits / (10 * len(queries)), 4)


def seconds(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def bench_size(
    root: Path, n: int, args: argparse.Namespace, centres: np.ndarray, *, refresh: bool
) -> dict[str, Any]:
    from deltalake import DeltaTable

    path = root / f"target_{n}"
    started = time.perf_counter()
    write_target(path, n, centres, seed=n)
    result: dict[str, Any] = {"rows": n, "write_s": seconds(started)}
    result["files"] = len(DeltaTable(str(path)).file_uris())

    started = time.perf_counter()
    index = VectorIndex(str(path))
    result["open_s"] = seconds(started)
    rng = np.random.default_rng(1)
    queries = clustered(rng, centres, args.queries)
    result["exact"] = latency(index, queries, exact=True)
    # The bare matrix-vector product on the same matrix, timed in the same run:
    # the index's own overhead is the ratio, whatever the machine's load.
    keys, matrix = index.rows()
    took = []
    for q in queries:
        t0 = time.perf_counter()
        matrix @ q
        took.append(time.perf_counter() - t0)
    result["exact"]["bare_matvec_p50_ms"] = round(float(np.median(took)) * 1000, 2)
    del keys, matrix
    print(f"{n:>9,} rows  open {result['open_s']:.2f} s  exact {result['exact']}", flush=True)

    if not args.skip_approximate:
        started = time.perf_counter()
        index.use_approximate()
        approximate: dict[str, Any] = {"build_s": seconds(started)}
        approximate.update(latency(index, queries, exact=False))
        approximate["recall_at_10"] = recall_at_10(index, queries)
        nlist = default_nlist(n)
        approximate.update(nlist=nlist, nprobe=default_nprobe(nlist))
        result["approximate"] = approximate
        print(f"{'':>9}       approximate {approximate}", flush=True)
        index.use_exact()  # frees FAISS's copy of the vectors before the reload below

    if refresh:
        result["refresh"] = bench_refresh(path, index, n, centres, queries)
        print(f"{'':>9}       refresh {result['refresh']}", flush=True)
    del index
    shutil.rmtree(path, ignore_errors=True)
    return result


def bench_refresh(
    path: Path, index: VectorIndex, n: int, centres: np.ndarray, queries: np.ndarray
) -> dict[str, Any]:
    """Three rounds of (1,000-row MERGE, refresh), then two full reloads; medians compared."""
    from deltalake import DeltaTable

    rng = np.random.default_rng(2)
    refreshes, merges = [], []
    for round_ in range(REFRESH_ROUNDS):
        # The job's MERGE: 500 keys re-embedded and 500 new. The updated keys sit
        # in one full-size file mid-table (neighbouring keys arrived together); a
        # MERGE touching every file would rewrite, and a refresh read, every file.
        middle = (n // 2 // FILE_ROWS + 2 * round_) * FILE_ROWS + FILE_ROWS // 4
        new_keys = n + 500 * round_
        ids = np.concatenate([np.arange(middle, middle + 500), np.arange(new_keys, new_keys + 500)])
        source = pa.Table.from_batches([rows(ids, clustered(rng, centres, len(ids)))])
        started = time.perf_counter()
        (
            DeltaTable(str(path))
            .merge(source, "t.id = s.id", source_alias="s", target_alias="t")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )
        merges.append(seconds(started))
        refreshes.append(index.refresh())
    reloads = []
    for _ in range(2):
        started = time.perf_counter()
        fresh = VectorIndex(str(path))
        reloads.append(seconds(started))
    same = all(
        [h.key["id"] for h in index.search(q, 10)] == [h.key["id"] for h in fresh.search(q, 10)]
        for q in queries[:20]
    )
    refresh_s = float(np.median([r.seconds for r in refreshes]))
    reload_s = float(np.median(reloads))
    return {
        "merge_rows": 1000,
        "merge_write_s": merges,
        "refresh_s": [round(r.seconds, 3) for r in refreshes],
        "files_added": [r.files_added for r in refreshes],
        "files_removed": [r.files_removed for r in refreshes],
        # delta-rs writes this target without deletion vectors: always 0 here.
        "files_masked": [r.files_masked for r in refreshes],
        "rows_read": [r.rows_added for r in refreshes],
        "full_reload_s": reloads,
        "speedup_of_medians": round(reload_s / max(refresh_s, 1e-9), 1),
        "same_answers_as_full_reload": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200, help="queries per measurement")
    parser.add_argument("--skip-approximate", action="store_true")
    parser.add_argument("--root", help="where to write the tables (default: a temp folder)")
    args = parser.parse_args()

    root = Path(args.root or tempfile.mkdtemp(prefix="deltavec-search-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    centres = np.random.default_rng(0).standard_normal((CLUSTERS, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    results = []
    try:
        for n in args.sizes:
            results.append(bench_size(root, n, args, centres, refresh=n == max(args.sizes)))
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"dim": DIM, "sizes": results, "peak_rss_mb": round(peak_mb)}))


if __name__ == "__main__":
    main()
