"""``deltavec demo``: the whole job on a laptop, from an empty folder to a search.

It writes a sample source table of paper titles and abstracts (bundled with the
package, so no network is needed), drains it into the target with the real
streaming job, and prints what happened plus the nearest papers to a query.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import TYPE_CHECKING, Any

from deltavec.config import load_config
from deltavec.runtime import tables

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from deltavec.config import DeltavecConfig

DEFAULT_QUERY = "predicting protein structure with deep learning"


def sample_rows() -> list[dict[str, Any]]:
    """The bundled papers: id, title, abstract, year, field."""
    text = (
        resources.files("deltavec.commands").joinpath("demo_data/papers.jsonl").read_text("utf-8")
    )
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_sample_source(spark: SparkSession, config: DeltavecConfig) -> int:
    """Create the source table with the sample papers unless it already exists."""
    if tables.exists(spark, config.source):
        return 0
    rows = sample_rows()
    frame = spark.createDataFrame(
        rows, "id long, title string, abstract string, year int, field string"
    )
    writer = (
        frame.repartition(4)
        .write.format("delta")
        # Lets the same table feed mode = "changes" too.
        .option("delta.enableChangeDataFeed", "true")
    )
    if config.source.table:
        writer.saveAsTable(config.source.table)
    else:
        writer.save(config.source.path)
    return len(rows)


def run_demo(*, config_path: str, query: str | None = None) -> dict[str, Any]:
    """Write the sample source, run the job until drained, search, print a summary."""
    from deltavec.commands.job import Job
    from deltavec.search import VectorIndex

    config = load_config(config_path)
    job = Job(config)
    written = write_sample_source(job.spark, config)
    summary = job.run(once=True)
    encoder = job.load_model()

    query = query or DEFAULT_QUERY
    titles = {
        row["id"]: row["title"]
        for row in tables.read(job.spark, config.source).select("id", "title").collect()
    }
    target_path = config.target.path or config.target.table or ""
    index = VectorIndex(target_path) if config.target.path else None
    vector = encoder.encode([query], prompt=job.query_prompt)[0][0]
    hits = index.search(vector, k=3) if index else []
    result = {
        "source_rows_written": written,
        "rows_read": summary.rows_read,
        "rows_embedded": summary.embedded,
        "rows_quarantined": summary.quarantined,
        "target": target_path,
        "target_rows": len(index) if index else None,
        "dim": job.dim,
        "model": job.model_identity,
        "query": query,
        "top3": [
            {"id": h.key["id"], "score": round(h.score, 4), "title": titles.get(h.key["id"])}
            for h in hits
        ],
    }
    _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    print()
    print("deltavec demo")
    print(f"  source rows written : {result['source_rows_written']}")
    print(f"  rows read           : {result['rows_read']}")
    print(f"  rows embedded       : {result['rows_embedded']}")
    print(f"  rows quarantined    : {result['rows_quarantined']}")
    shown = (
        os.path.relpath(result["target"])
        if result["target"].startswith(os.getcwd())
        else result["target"]
    )
    print(f"  target table        : {shown} ({result['target_rows']} rows)")
    print(f"  vector dimension    : {result['dim']}")
    print(f"  model               : {result['model']}")
    print(f"  nearest to {result['query']!r}:")
    for rank, hit in enumerate(result["top3"], 1):
        print(f"    {rank}. [{hit['score']:.3f}] #{hit['id']} {hit['title']}")
