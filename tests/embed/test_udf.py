"""The Spark side of the encoder: what the model sees inside a real Python worker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from tests.conftest import write_config

pytestmark = pytest.mark.slow


def test_each_task_runs_the_model_on_one_core(spark: Any, tmp_path: Path) -> None:
    # Spark runs one task per core; if torch also started a thread per core in
    # every task, the cores would be oversubscribed and every operator would wait
    # on descheduled threads.
    spec = Job(load_config(write_config(tmp_path)), spark).encoder_spec(for_workers=True)

    def probe(batches: Iterator[Any]) -> Iterator[Any]:
        import os

        import pyarrow as pa
        import torch

        from deltavec.embed.models import resolve_model
        from deltavec.embed.udf import get_encoder

        encoder = get_encoder(replace(spec, model=resolve_model("default"), device="cpu"))
        vectors, stats = encoder.encode([f"sentence {i} " * (i % 40 + 1) for i in range(300)])
        rows = sum(batch.num_rows for batch in batches)
        yield pa.RecordBatch.from_pylist(
            [
                {
                    "rows": rows,
                    "omp": os.environ.get("OMP_NUM_THREADS"),
                    "torch_threads": torch.get_num_threads(),
                    "lanes": encoder.lanes,
                    "passes": stats.forward_passes,
                    "vectors": len(vectors),
                }
            ]
        )

    schema = "rows long, omp string, torch_threads long, lanes long, passes long, vectors long"
    tasks = spark.range(40).repartition(2).mapInArrow(probe, schema).collect()

    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    assert len(tasks) == 2 and sum(t["rows"] for t in tasks) == 40
    for task in tasks:
        assert task["omp"] == str(task_cpus)  # Spark's own setting (SPARK-42613)
        assert task["lanes"] == task_cpus and task["torch_threads"] == 1
        assert task["passes"] > 1 and task["vectors"] == 300
