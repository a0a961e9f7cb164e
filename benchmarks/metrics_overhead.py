"""What watching the job costs: the worker-side stats column and the driver-side poller.

1. ``encode_stats_column`` (tokens, padding, GPU memory sent back with the vectors)
   against embedding the same 2,048-row Arrow batch: the stats must be noise.
2. One metrics refresh (source lag from the Delta log, target and quarantine row
   counts from the log's statistics) on a source with many small commits, with
   a target of 100k and of 1M rows: the refresh must not grow with the target's
   data, as counting by a scan does.

Run: ``.venv/bin/python benchmarks/metrics_overhead.py [--commits 100] [--rows 1000000]``.
The last line is JSON with the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run from a checkout: measure this copy of the package, not an installed one.
# The checkout's package (streaming/deltavec) and benchmarks, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "streaming"))


def _best(action: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def stats_column_cost(repeat: int) -> dict[str, float]:
    import pyarrow as pa

    from deltavec.columns import TEXT
    from deltavec.embed.encoder import EncoderSpec, encode_isolating_failures
    from deltavec.embed.models import resolve_model
    from deltavec.embed.udf import EmbedBatches, encode_stats_column, get_encoder

    spec = EncoderSpec(model=resolve_model("default"), device="cpu")
    encoder = get_encoder(spec)
    texts = [f"paper {i}: a study of streaming embeddings over Delta tables" for i in range(2048)]
    batch = pa.RecordBatch.from_arrays([pa.array(texts)], names=[TEXT])
    embed = EmbedBatches(model="default", spec=spec, output_names=(TEXT,))
    _, _, stats = encode_isolating_failures(encoder, texts[:8])
    embed_s = _best(lambda: embed._embed(encoder, batch), repeat)
    stats_s = _best(lambda: encode_stats_column(encoder, stats, batch.num_rows), repeat * 20)
    return {"embed_batch_s": embed_s, "stats_column_s": stats_s, "ratio": stats_s / embed_s}


def refresh_cost(commits: int, rows: int, repeat: int) -> dict[str, float]:
    """One metrics refresh against a target of ``rows // 10`` rows, then of ``rows`` rows."""
    from deltavec.checkpointing.checkpoint import Checkpoint
    from deltavec.config import TableRef
    from deltavec.observe.lag import measure_lag
    from deltavec.runtime.delta_log import DeltaLog, row_count
    from deltavec.runtime.session import build_session

    spark = build_session(
        master="local[2]", app_name="metrics-overhead", conf={"spark.ui.enabled": "false"}
    )
    root = Path(tempfile.mkdtemp(prefix="deltavec-bench-"))
    source = TableRef(path=str(root / "source"))
    for i in range(commits):
        batch = spark.range(i * 10, i * 10 + 10).selectExpr("id", "'t' AS text").coalesce(1)
        batch.write.format("delta").mode("append").save(source.path)
    checkpoint = Checkpoint(spark, str(root / "checkpoint"))
    result: dict[str, float] = {}
    for name, size in (("small", rows // 10), ("large", rows)):
        target = TableRef(path=str(root / name))
        data = spark.range(size).selectExpr("id", "uuid() AS text").repartition(20)
        data.write.format("delta").save(target.path)

        def refresh(target: TableRef = target) -> None:
            # A fresh log object each time: no cached commits, the worst case.
            measure_lag(DeltaLog(spark, source), checkpoint, mode="append", now=time.time())
            row_count(spark, target)
            row_count(spark, target)  # stands in for the quarantine table

        refresh()  # warm the JVM's code paths and Delta's snapshot cache
        result[f"refresh_{name}_s"] = _best(refresh, repeat)
        # The filter keeps Delta from answering COUNT(*) from the log: a real scan.
        scanned = spark.read.format("delta").load(target.path).where("text IS NOT NULL")
        result[f"scan_{name}_s"] = _best(scanned.count, repeat)
    spark.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=100)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    stats = stats_column_cost(args.repeat)
    print(
        f"stats column: {stats['stats_column_s'] * 1e6:.0f} us per 2,048-row Arrow batch; "
        f"embedding that batch: {stats['embed_batch_s']:.2f} s"
    )
    cost = refresh_cost(args.commits, args.rows, args.repeat)
    for name, size in (("small", args.rows // 10), ("large", args.rows)):
        print(
            f"target of {size:,} rows: metrics refresh (lag over {args.commits} source "
            f"commits + 2 row counts) {cost[f'refresh_{name}_s']:.2f} s; "
            f"counting the target by a scan {cost[f'scan_{name}_s']:.2f} s"
        )
    print(
        json.dumps(
            {
                "ratio_stats_column_vs_embed": round(stats["ratio"], 6),
                "ratio_refresh_large_vs_small": round(
                    cost["refresh_large_s"] / cost["refresh_small_s"], 3
                ),
                "ratio_scan_large_vs_small": round(cost["scan_large_s"] / cost["scan_small_s"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
