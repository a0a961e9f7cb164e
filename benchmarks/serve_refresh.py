"""Refresh benchmark: what one `deltavec serve` refresh after the writer's MERGE costs the queries.

A server answers queries on threads of the process that refreshes, so what
matters about a refresh is not only its time but how long it holds the
interpreter (the GIL) at a stretch: a query thread waits that long, whatever
the cores are doing. This runs the refresher alone, in process, on the serving
benchmark's data (``benchmarks/serve.py``: a 100,000-row target and its source,
the approximate index built), applies the same MERGEs (500 updated keys of one
10,000-row file, 500 new keys) and refreshes after each, while a probe thread
sleeps 1 ms at a time and records how late it wakes: the wait a query thread
would see. Reported per refresh, mean and worst: wall and CPU time, the probe's
longest wait and its waits summed, and the keys the keyword index rendered
from the source or dropped.

Side by side in one run, the same data twice: a target with the job's
``text_hash`` column, and one without (a target not written by the job), where
the keyword index cannot tell which rows of a rewritten file have new text.
Each MERGE is applied to both, and the two are refreshed in turn, each first
every other time.
The last line printed is one JSON object.

    python benchmarks/serve_refresh.py               # about 1.5 minutes
    python benchmarks/serve_refresh.py --merges 4 --rows 20000
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "streaming"))
sys.path.insert(0, str(REPO))

from benchmarks.serve import build, centres_from_model, merge_once  # noqa: E402

PROBE_SECONDS = 0.001
# The same data with the job's text_hash column, and without it.
VARIANTS = {"text_hash": True, "no_text_hash": False}


class Probe:
    """A thread that sleeps ``PROBE_SECONDS`` at a time and records how late it wakes."""

    def __init__(self) -> None:
        self.wakes: list[tuple[float, float]] = []  # (went to sleep, seconds late)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            slept = time.perf_counter()
            time.sleep(PROBE_SECONDS)
            self.wakes.append((slept, time.perf_counter() - slept - PROBE_SECONDS))

    def waits(self, start: float, end: float) -> np.ndarray:
        return np.array([late for slept, late in self.wakes if start <= slept < end])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def refreshes(root: Path, rows: int, merges: int) -> dict[str, list[dict[str, float]]]:
    """Both targets built and opened as the server opens them, then after each
    MERGE (the same one on both) each refreshed in turn, timed."""
    from deltavec.embed.models import model_identity, resolve_model
    from deltavec.search.semantic import open_search
    from deltavec.serve.snapshot import ServedTarget

    identity = model_identity("default", resolve_model("default"))
    centres = centres_from_model()
    setups = {}
    for label, hashed in VARIANTS.items():
        source, target = build(root / label, rows, identity, centres, hashed=hashed)
        served = ServedTarget(lambda target=target: open_search(str(target)))
        served.complete()  # the approximate index, as the server builds it first
        setups[label] = (source, target, served, np.random.default_rng(1))
    # As `deltavec serve` does once loaded (deltavec.serve.collector): else a
    # full collection of the libraries' objects would read as a refresh's wait.
    gc.collect()
    gc.freeze()
    probe = Probe()
    out: dict[str, list[dict[str, float]]] = {label: [] for label in VARIANTS}
    try:
        for edition in range(1, merges + 1):
            # Each goes first every other time: a refresh reuses memory the one
            # before it freed, and fresh memory costs page faults here.
            labels = list(setups)[:: 1 if edition % 2 else -1]
            for label in labels:
                source, target, served, rng = setups[label]
                merge_once(
                    source, target, rows, edition, rng, identity, centres, hashed=VARIANTS[label]
                )
                time.sleep(0.05)
                started, cpu = time.perf_counter(), time.thread_time()
                outcome = served.refresh()
                ended = time.perf_counter()
                waits = probe.waits(started, ended)
                out[label].append(
                    {
                        "wall_ms": (ended - started) * 1000,
                        "cpu_ms": (time.thread_time() - cpu) * 1000,
                        "longest_wait_ms": float(waits.max()) * 1000 if waits.size else 0.0,
                        "waits_ms": float(waits.sum()) * 1000,
                        "keyword_updates": float(outcome.keyword_updates),
                    }
                )
    finally:
        probe.stop()
        gc.unfreeze()  # else nanobind-bound modules report what is left at exit as leaks
    return out


def summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        name: {
            "mean": round(float(np.mean([r[name] for r in runs])), 1),
            "max": round(float(np.max([r[name] for r in runs])), 1),
        }
        for name in runs[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--merges", type=int, default=16)
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    # As `deltavec serve` runs: one BLAS and one FAISS thread.
    threadpool_limits(limits=1, user_api="blas")
    import faiss

    faiss.omp_set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="deltavec-bench-refresh-"))
    try:
        results = {
            label: summary(runs) for label, runs in refreshes(root, args.rows, args.merges).items()
        }
        for label, figures in results.items():
            print(label, json.dumps(figures), flush=True)
        with_hash, without = results["text_hash"], results["no_text_hash"]
        print(
            json.dumps(
                {
                    "benchmark": "serve_refresh",
                    "rows": args.rows,
                    "merges": args.merges,
                    "refresh": results,
                    "ratios_without_to_with_text_hash": {
                        name: round(without[name]["mean"] / max(with_hash[name]["mean"], 1e-9), 2)
                        for name in with_hash
                    },
                }
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
