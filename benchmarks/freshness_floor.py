"""The floor under `benchmarks/freshness.py`: an exactly-once stream that does nothing else.

Run by ``freshness.py --floor`` as a process of its own, as ``deltavec run`` is. It
is the least any Structured Streaming job from a Delta change feed into a Delta
table pays on this machine: the same session (``build_session``, deltavec's Spark
defaults and Delta), the same trigger, a checkpoint, and a ``foreachBatch`` that
appends the batch's inserted rows to a copy of the target under Delta's
idempotent-write options (``txnAppId`` / ``txnVersion``), which is what a sink
must do to be exactly-once. No model, no look-up of existing keys, no change
detection: each row gets the same vector. Whatever the freshness benchmark
measures above this floor is deltavec's own.

    python benchmarks/freshness_floor.py SOURCE TARGET CHECKPOINT "1 second" FIRST_VERSION
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "streaming"))


def main() -> None:
    source, target, checkpoint, interval, starting_version = sys.argv[1:6]

    from deltalake import DeltaTable
    from pyspark.sql import functions as F

    from deltavec.columns import DIM, EMBEDDED_AT, EMBEDDING, MODEL, SOURCE_VERSION, TEXT_HASH
    from deltavec.runtime.session import build_session

    properties = DeltaTable(target).metadata().configuration
    identity, dim = properties["deltavec.model"], int(properties["deltavec.dim"])
    spark = build_session(
        master="local[*]", app_name="freshness-floor", conf={"spark.ui.enabled": "false"}
    )
    changes = (
        spark.readStream.format("delta")
        .option("readChangeFeed", "true")
        .option("startingVersion", starting_version)
        .load(source)
    )
    vector = F.array_repeat(F.lit(1.0 / dim**0.5).cast("float"), dim)

    def append(batch: Any, batch_id: int) -> None:
        rows = batch.where(F.col("_change_type") == "insert").select(
            "id",
            vector.alias(EMBEDDING),
            F.lit(identity).alias(MODEL),
            F.lit(dim).alias(DIM),
            F.sha2(F.concat_ws(" [SEP] ", "title", "abstract"), 256).alias(TEXT_HASH),
            F.col("_commit_version").alias(SOURCE_VERSION),
            F.current_timestamp().alias(EMBEDDED_AT),
        )
        (
            rows.write.format("delta")
            .mode("append")
            .option("txnAppId", "freshness-floor")
            .option("txnVersion", batch_id)
            .save(target)
        )
        print(f"event=batch batch_id={batch_id}", flush=True)

    query = (
        changes.writeStream.foreachBatch(append)
        .option("checkpointLocation", checkpoint)
        .trigger(processingTime=interval)
        .start()
    )
    query.awaitTermination()


if __name__ == "__main__":
    main()
