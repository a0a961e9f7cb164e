"""``deltavec run`` against a real Spark standalone cluster equals local mode."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from deltavec.embed.models import resolve_model
from deltavec.runtime.session import spark_home
from deltavec.sink.batch import ONE_TASK_ROWS
from tests.conftest import REPO, read_target, write_config, write_rows
from tests.standalone import LOOPBACK, StandaloneCluster, cluster_env

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1200)]

# What a small cluster needs that local mode sets by itself: few shuffle and
# Delta snapshot partitions (the defaults of 200 and 50 turn a 40-row batch
# into thousands of tasks), and executors that fit a 1 GB worker.
CLUSTER_SPARK_CONF = textwrap.dedent(
    f"""
    [spark.conf]
    "spark.executor.memory" = "512m"
    "spark.driver.host" = "{LOOPBACK}"
    "spark.driver.bindAddress" = "{LOOPBACK}"
    "spark.sql.shuffle.partitions" = "2"
    "spark.default.parallelism" = "2"
    "spark.databricks.delta.snapshotPartitions" = "2"
    "spark.ui.enabled" = "false"
    """
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneCluster]:
    root = tmp_path_factory.mktemp("standalone")
    cluster = StandaloneCluster(root=root, env=cluster_env(str(spark_home()), os.environ))
    try:
        # Two workers of one core each: the machine has two, and two executors
        # prove the model loads once per executor, not once per job.
        cluster.start(workers=2, cores=1, memory="1g")
        yield cluster
    finally:
        cluster.stop()


def test_cluster_run_equals_local_run_and_loads_the_model_on_each_executor(
    spark: Any,
    tmp_path: Path,
    cluster: StandaloneCluster,
    sts_pairs: list[tuple[float, str, str]],
) -> None:
    # More rows than one task takes (sink.batch.ONE_TASK_ROWS), so the batch is
    # dealt to both executors' slots and each must load the model.
    total = 2 * ONE_TASK_ROWS
    source = tmp_path / "source"
    rows = [{"id": i, "title": s1, "abstract": s2} for i, (_, s1, s2) in enumerate(sts_pairs)]
    write_rows(spark, source, rows[: total // 2])
    write_rows(spark, source, rows[total // 2 : total])

    local_dir, cluster_dir = tmp_path / "local", tmp_path / "cluster"
    local_dir.mkdir()
    cluster_dir.mkdir()
    Job(load_config(write_config(local_dir, source={"path": str(source)})), spark).run(once=True)

    config = write_config(cluster_dir, CLUSTER_SPARK_CONF, source={"path": str(source)})
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltavec.cli",
            "run",
            "--once",
            "--master",
            cluster.url,
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        # Executors start the interpreter the driver names, as on any cluster.
        env={**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": LOOPBACK},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["embedded"] == total

    # Same keys, same vectors, same provenance as local mode.
    local = {r["id"]: r for r in read_target(spark, local_dir / "target")}
    remote = {r["id"]: r for r in read_target(spark, cluster_dir / "target")}
    assert sorted(remote) == sorted(local) == list(range(total))
    for key, row in remote.items():
        np.testing.assert_allclose(row["embedding"], local[key]["embedding"], rtol=0, atol=1e-5)
        assert (row["model"], row["text_hash"]) == (local[key]["model"], local[key]["text_hash"])

    # The model was loaded by a Python worker of each executor, from the
    # package the driver shipped, at the model path each worker resolved itself.
    app = [a for a in _applications(cluster) if a["name"] == "deltavec"]
    assert len(app) == 1 and app[0]["state"] == "FINISHED"
    loads = [
        [line for line in log.splitlines() if "loaded model" in line]
        for log in cluster.executor_logs()
    ]
    assert sum(1 for lines in loads if lines) == 2, loads
    for line in (line for lines in loads for line in lines):
        match = re.search(r"loaded model (\S+) on (\S+) .*package (\S+)\)", line)
        assert match, line
        model, device, package = match.groups()
        assert model == resolve_model("default")
        assert device == "cpu"
        assert ".zip" in package, f"executors imported {package}, not the shipped package"


def test_spark_submit_with_the_launcher_runs_on_spark_submits_master(
    spark: Any,
    tmp_path: Path,
    cluster: StandaloneCluster,
    sts_pairs: list[tuple[float, str, str]],
) -> None:
    """The documented spark-submit path: JARs by --packages, the master spark-submit's."""
    from deltavec.runtime.session import delta_packages

    source = tmp_path / "source"
    rows = [{"id": i, "title": s1, "abstract": s2} for i, (_, s1, s2) in enumerate(sts_pairs)]
    write_rows(spark, source, rows[:20])
    # The file names local mode; spark-submit's --master must win.
    config = write_config(
        tmp_path,
        CLUSTER_SPARK_CONF,
        source={"path": str(source)},
        spark={"master": "local[2]", "app_name": "deltavec-submit"},
    )
    submit = subprocess.run(
        [
            str(spark_home() / "bin" / "spark-submit"),
            *("--master", cluster.url),
            *("--packages", ",".join(delta_packages())),
            *("--conf", f"spark.pyspark.python={sys.executable}"),
            str(REPO / "docker" / "driver.py"),
            *("run", "--once", "--config", str(config)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "SPARK_LOCAL_IP": LOOPBACK},
    )
    assert submit.returncode == 0, submit.stderr[-4000:]
    assert json.loads(submit.stdout.strip().splitlines()[-1])["embedded"] == 20
    assert sorted(r["id"] for r in read_target(spark, tmp_path / "target")) == list(range(20))
    assert [a["state"] for a in _applications(cluster) if a["name"] == "deltavec-submit"] == [
        "FINISHED"
    ]


def _applications(cluster: StandaloneCluster) -> list[dict[str, Any]]:
    state = cluster.state()
    apps: list[dict[str, Any]] = [*state["activeapps"], *state["completedapps"]]  # type: ignore[misc]
    return apps
