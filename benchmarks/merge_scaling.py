"""Does the cost of writing one micro-batch grow with the target? (No model involved.)

For each strategy and target size (10k, 100k, 1M rows by default) a target is
built with synthetic 384-dim vectors, laid out as deltavec lays it out for that
strategy (sorted by key, in files of the strategy's rows per file). Then 1,000-row
micro-batches of mixed changes (50% updates and 20% deletes of random existing
keys, 30% new keys) are written to it, the sizes taking turns batch by batch (so
load drifting on a shared machine weighs on every size alike):

* ``naive``: what deltavec did first: the unchanged-text lookup reads every target
  row, and one MERGE whose condition only equates keys inserts, updates and deletes.
* ``rewrite_files``: ``deltavec.sink.merge`` on a target without deletion vectors
  (``target.deletion_vectors = false``, and every target created before that
  default): key ranges in the lookup and in the MERGE condition, existing keys
  merged, new keys appended, rewritten files keep their key range; files of 2,000
  rows.
* ``deltavec``: the default: a target with deletion vectors, so a MERGE marks
  changed rows deleted instead of rewriting their files; files of 50,000 rows in
  row groups of about 100, and the batch's keys listed so that the lookup and the
  MERGE read only the row groups that can hold them.

Every strategy writes its own tables under its own Delta app id: a table restored
to an earlier version keeps the app ids' committed batch ids, so reusing one would
make Delta skip the writes as already done. After each strategy the live rows are
checked against the count the batches must leave, and the table is opened with
``deltavec search``'s reader (``VectorIndex``), which must see exactly the rows
Spark sees; a strategy that fails either check stops the benchmark.

Timed per batch: the lookup of the batch's keys in the target plus the write, i.e.
the target-side work of ``MergeSink`` for one batch. Prints seconds per batch (the
median of ``--batches``), then, as the last line, JSON with ``ratio_1m_vs_10k`` for
the default strategy and the ratios of the others.

    python benchmarks/merge_scaling.py [--sizes 10000,100000,1000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from deltavec.columns import (
    BATCH_SOURCE_VERSION,
    BATCH_TEXT_HASH,
    DELETE,
    DIM,
    EMBEDDED_AT,
    EMBEDDING,
    MODEL,
    SOURCE_VERSION,
    TEXT_HASH,
    UPSERT,
)
from deltavec.config import TableRef
from deltavec.sink import target
from deltavec.sink.merge import ACTION, EXISTS, TARGET_HASH, Layout, TargetWriter

DIMENSIONS = 384
MODEL_ID = "benchmark/synthetic@0000000000000000"
STRATEGIES = ("naive", "rewrite_files", "deltavec")


def synthetic_vectors(seed_column: Any) -> Any:
    """A deterministic pseudo-random float vector per row, computed inside Spark.

    Integer arithmetic (a multiplicative hash) rather than a hash function per
    element: building a 1M-row target is 384M elements.
    """
    from pyspark.sql import functions as F

    seed = seed_column.cast("long") * F.lit(2654435761)
    return F.transform(
        F.sequence(F.lit(0), F.lit(DIMENSIONS - 1)),
        # coalesce: the target's vectors hold no null elements, and Delta will not
        # cast an array that might into one that cannot.
        lambda i: F.coalesce(
            (F.pmod(seed + i * F.lit(40503), F.lit(20011)) / 10005.5 - 1.0).cast("float"),
            F.lit(0.0).cast("float"),
        ),
    )


def build_target(spark: Any, path: Path, rows: int, layout: Layout) -> None:
    """Write a target of ``rows`` keys as the job creates it for ``layout``, sorted by
    key in files of ``layout.rows_per_file`` rows."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StructField

    shutil.rmtree(path, ignore_errors=True)
    target.ensure_target(
        spark,
        TableRef(path=str(path)),
        key_fields=[StructField("id", LongType())],
        model_identity=MODEL_ID,
        dim=DIMENSIONS,
        deletion_vectors=layout.deletion_vectors,
    )
    frame = spark.range(rows).select(
        F.col("id"),
        synthetic_vectors(F.col("id")).alias(EMBEDDING),
        F.lit(MODEL_ID).alias(MODEL),
        F.lit(DIMENSIONS).alias(DIM),
        F.sha2(F.col("id").cast("string"), 256).alias(TEXT_HASH),
        F.lit(0).cast("long").alias(SOURCE_VERSION),
        F.current_timestamp().alias(EMBEDDED_AT),
    )
    # Few tasks, each writing a sorted run of keys cut into files: the layout the
    # job's appends and rewrites keep.
    partitions = max(1, min(32, rows // 50_000))
    (
        frame.repartitionByRange(partitions, "id")
        .sortWithinPartitions("id")
        .write.format("delta")
        .mode("append")
        .option("maxRecordsPerFile", str(layout.rows_per_file))
        .save(str(path))
    )


def batch_plan(rows: int, size: int, batch: int, seed: int) -> list[tuple[int, str]]:
    """``size`` changes: 50% updates, 20% deletes of random existing keys, 30% new keys."""
    rng = random.Random(seed)
    existing = rng.sample(range(rows), int(size * 0.7))
    updates, deletes = existing[: int(size * 0.5)], existing[int(size * 0.5) :]
    fresh = [rows + batch * size + i for i in range(size - len(existing))]
    return (
        [(k, UPSERT) for k in updates]
        + [(k, DELETE) for k in deletes]
        + [(k, UPSERT) for k in fresh]
    )


def live_after(rows: int, plans: list[list[tuple[int, str]]]) -> int:
    """Live keys once the batches of ``plans`` are applied to keys 0 .. rows-1."""
    live = set(range(rows))
    for plan in plans:
        for key, action in plan:
            if action == UPSERT:
                live.add(key)
            else:
                live.discard(key)
    return len(live)


def make_batch(spark: Any, plan: list[tuple[int, str]], batch: int) -> Any:
    """The batch of ``plan`` as the sink hands it to the target writer."""
    from pyspark.sql import functions as F

    frame = spark.createDataFrame(plan, f"id long, {ACTION} string")
    is_upsert = F.col(ACTION) == UPSERT
    return frame.select(
        "id",
        ACTION,
        F.when(is_upsert, synthetic_vectors(F.col("id") + F.lit(batch + 1))).alias(EMBEDDING),
        F.when(
            is_upsert, F.sha2(F.concat(F.col("id").cast("string"), F.lit(f"#{batch}")), 256)
        ).alias(BATCH_TEXT_HASH),
        F.lit(batch + 1).cast("long").alias(BATCH_SOURCE_VERSION),
    ).persist()


def write_deltavec(
    spark: Any, writer: TargetWriter, batch: Any, *, app_id: str, batch_id: int
) -> None:
    """The sink's target-side work: pruned lookup of the batch's keys, then the write.

    The lookup is persisted, as the sink persists it, so the write's count, MERGE
    and append read the target's rows of the batch once.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    key_filter = writer.key_filter(batch)
    existing = writer.existing(spark, batch, key_filter).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        changes = batch.join(existing, on="id", how="left").withColumn(
            EXISTS, F.col(TARGET_HASH).isNotNull()
        )
        changes = changes.where(F.col(EXISTS) | (F.col(ACTION) == UPSERT)).drop(TARGET_HASH)
        writer.write(spark, changes, app_id=app_id, batch_id=batch_id, key_filter=key_filter)
    finally:
        existing.unpersist()


def write_naive(spark: Any, path: Path, batch: Any) -> None:
    """The first implementation: a full read for the lookup, a key-only MERGE."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    existing = spark.read.format("delta").load(str(path)).select("id", TEXT_HASH)
    batch.join(existing, on="id", how="left_anti").count()
    values = {
        "id": "s.id",
        EMBEDDING: f"s.{EMBEDDING}",
        MODEL: F.lit(MODEL_ID),
        DIM: F.lit(DIMENSIONS),
        TEXT_HASH: f"s.{BATCH_TEXT_HASH}",
        SOURCE_VERSION: f"s.{BATCH_SOURCE_VERSION}",
        EMBEDDED_AT: F.current_timestamp(),
    }
    (
        DeltaTable.forPath(spark, str(path))
        .alias("t")
        .merge(batch.alias("s"), "t.id <=> s.id")
        .whenMatchedDelete(condition=f"s.{ACTION} = '{DELETE}'")
        .whenMatchedUpdate(
            condition=f"s.{ACTION} = '{UPSERT}'",
            set={k: v for k, v in values.items() if k != "id"},
        )
        .whenNotMatchedInsert(condition=f"s.{ACTION} = '{UPSERT}'", values=values)
        .execute()
    )


def table_files(spark: Any, path: Path) -> int:
    return int(spark.sql(f"DESCRIBE DETAIL delta.`{path}`").first()["numFiles"])


def search_reads(path: Path, rows_expected: int) -> bool:
    """Whether the JVM-free search reader opens the table and sees every live row."""
    from deltavec.search import VectorIndex

    try:
        return len(VectorIndex(str(path))) == rows_expected
    except Exception:  # noqa: BLE001 - any failure means "not readable"
        return False


def layout_for(strategy: str, rows_per_file: int | None) -> Layout:
    # The naive strategy ran on the first layout: no deletion vectors, small files.
    return Layout(max_rows_per_file=rows_per_file, deletion_vectors=strategy == "deltavec")


def measure(
    spark: Any,
    workdir: Path,
    sizes: list[int],
    *,
    strategies: list[str],
    batches: int,
    batch_size: int,
    rows_per_file: int | None,
    log: list[dict[str, Any]],
) -> dict[int, dict[str, float]]:
    """Median seconds per batch for every (size, strategy).

    Batches for the different sizes run interleaved (10k, 100k, 1M, 10k, ...), so a
    shared machine's load, which drifts over minutes, weighs on every size alike.

    Raises:
        RuntimeError: a strategy left other rows than its batches must leave, or
            ``deltavec search`` does not read them.
    """
    results: dict[int, dict[str, float]] = {rows: {} for rows in sizes}
    for strategy in strategies:
        layout = layout_for(strategy, rows_per_file)
        writers = {}
        for rows in sizes:
            path = workdir / f"{strategy}_{rows}"
            built = time.perf_counter()
            build_target(spark, path, rows, layout)
            print(
                f"{strategy}: built {rows:,} rows in {table_files(spark, path):,} files "
                f"({time.perf_counter() - built:.0f}s)",
                flush=True,
            )
            writers[rows] = TargetWriter(
                target=TableRef(path=str(path)),
                keys=["id"],
                model_identity=MODEL_ID,
                dim=DIMENSIONS,
                layout=layout,
            )
        seconds: dict[int, list[float]] = {rows: [] for rows in sizes}
        plans: dict[int, list[list[tuple[int, str]]]] = {rows: [] for rows in sizes}
        for b in range(batches):
            for rows in sizes:
                path = workdir / f"{strategy}_{rows}"
                plans[rows].append(batch_plan(rows, batch_size, b, seed=rows + b))
                batch = make_batch(spark, plans[rows][-1], b)
                batch.count()
                started = time.perf_counter()
                if strategy == "naive":
                    write_naive(spark, path, batch)
                else:
                    write_deltavec(
                        spark, writers[rows], batch, app_id=f"benchmark-{strategy}", batch_id=b
                    )
                seconds[rows].append(time.perf_counter() - started)
                batch.unpersist()
        for rows in sizes:
            path = workdir / f"{strategy}_{rows}"
            live = spark.read.format("delta").load(str(path)).count()
            expected = live_after(rows, plans[rows])
            if live != expected:
                raise RuntimeError(
                    f"{strategy} left {live:,} live rows in the {rows:,}-row target, "
                    f"its batches must leave {expected:,}"
                )
            median = statistics.median(seconds[rows])
            results[rows][strategy] = median
            entry = {
                "rows": rows,
                "strategy": strategy,
                "seconds_per_batch": round(median, 2),
                "batches": [round(x, 2) for x in seconds[rows]],
                "rows_per_file": layout.rows_per_file,
                "files_after": table_files(spark, path),
                "live_rows": live,
                "search_readable": search_reads(path, live),
            }
            log.append(entry)
            print(
                f"{rows:>9,} rows  {strategy:<17} {median:6.2f} s/batch  (batches: "
                f"{', '.join(f'{x:.2f}' for x in seconds[rows])}; files after: "
                f"{entry['files_after']:,}; deltavec search reads it: "
                f"{'yes' if entry['search_readable'] else 'no'})",
                flush=True,
            )
            if not entry["search_readable"]:
                raise RuntimeError(f"deltavec search cannot read the {strategy} target")
            shutil.rmtree(path, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument(
        "--rows-per-file",
        type=int,
        default=None,
        help="rows per file for every strategy (default: each strategy's own)",
    )
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--workdir", default=None, help="where the targets are built")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="4g")
    args = parser.parse_args()

    from deltavec.runtime.session import build_session

    spark = build_session(
        master=args.master,
        app_name="deltavec-merge-scaling",
        conf={
            "spark.ui.enabled": "false",
            "spark.driver.memory": args.driver_memory,
            "spark.sql.shuffle.partitions": "4",
        },
    )
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="deltavec-merge-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    strategies = [s for s in STRATEGIES if s in args.strategies.split(",")]
    log: list[dict[str, Any]] = []
    try:
        results = measure(
            spark,
            workdir,
            sizes,
            strategies=strategies,
            batches=args.batches,
            batch_size=args.batch_size,
            rows_per_file=args.rows_per_file,
            log=log,
        )
    finally:
        spark.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    smallest, largest = min(sizes), max(sizes)
    ratios = {
        strategy: round(results[largest][strategy] / results[smallest][strategy], 2)
        for strategy in strategies
    }
    summary = {
        "ratio_1m_vs_10k": ratios.get("deltavec"),
        "ratios": ratios,
        "sizes": [smallest, largest],
        "batch_size": args.batch_size,
        "rows_per_file": args.rows_per_file,
        "runs": log,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
