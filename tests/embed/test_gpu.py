"""GPU scheduling: the discovery script, the Spark GPU settings, the task's own GPU.

Without a GPU, the tests check the contract between the pieces: what the
discovery script reports is what Spark hands a task, and ``task_device`` turns
it into the torch device of that GPU. Tests marked ``gpu`` run the same on a real
device (``make test-gpu``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deltavec.embed.udf import cuda_ordinal
from deltavec.errors import ModelError
from tests.conftest import REPO, read_target, write_config, write_rows

DISCOVERY = REPO / "conf" / "gpu-discovery.sh"
GPU_CONF = REPO / "conf" / "spark-gpu.conf"


def discover(env: dict[str, str]) -> list[str]:
    result = subprocess.run([str(DISCOVERY)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["name"] == "gpu"
    addresses: list[str] = report["addresses"]
    return addresses


def _env_without_cuda(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return {**env, **extra}


@pytest.fixture
def two_gpu_node(tmp_path: Path) -> dict[str, str]:
    """PATH with an ``nvidia-smi`` that lists two GPUs, as on a two-GPU node."""
    (tmp_path / "nvidia-smi").write_text('#!/bin/sh\nprintf "0\\n1\\n"\n')
    (tmp_path / "nvidia-smi").chmod(0o755)
    return _env_without_cuda(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_discovery_reports_each_gpu_nvidia_smi_lists(two_gpu_node: dict[str, str]) -> None:
    addresses = discover(two_gpu_node)
    assert addresses == ["0", "1"]
    # Two tasks on this executor, one GPU each: each worker gets its own device.
    assert [f"cuda:{cuda_ordinal(a, None)}" for a in addresses] == ["cuda:0", "cuda:1"]


def test_discovery_follows_cuda_visible_devices(two_gpu_node: dict[str, str]) -> None:
    # A scheduler gave this executor GPUs 2 and 3 of the node: Spark hands out
    # "2" and "3", and torch knows them as cuda:0 and cuda:1.
    addresses = discover({**two_gpu_node, "CUDA_VISIBLE_DEVICES": "2,3"})
    assert addresses == ["2", "3"]
    assert [cuda_ordinal(a, "2,3") for a in addresses] == [0, 1]
    assert discover({**two_gpu_node, "CUDA_VISIBLE_DEVICES": ""}) == []


def test_discovery_on_a_machine_without_gpus_reports_none(tmp_path: Path) -> None:
    # A PATH with bash and no nvidia-smi. Spark then refuses an executor that asks
    # for a GPU, which is the failure a GPU config on a CPU node should get.
    (tmp_path / "bash").symlink_to(shutil.which("bash") or "/bin/bash")
    assert discover(_env_without_cuda(PATH=str(tmp_path))) == []


def test_a_gpu_hidden_from_the_worker_is_named_in_the_error() -> None:
    with pytest.raises(ModelError, match=r"assigned GPU 1 .* CUDA_VISIBLE_DEVICES=0 hides it"):
        cuda_ordinal("1", "0")
    with pytest.raises(ModelError, match=r"'GPU-5f1c'.* not a device number"):
        cuda_ordinal("GPU-5f1c", None)


def spark_gpu_conf() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in GPU_CONF.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split(None, 1)
            assert key not in settings, f"{key} is set twice"
            settings[key] = value.strip()
    return settings


def test_spark_gpu_conf_fills_every_task_slot_and_every_gpu_share() -> None:
    conf = spark_gpu_conf()
    gpus = Fraction(conf["spark.executor.resource.gpu.amount"])
    per_task = Fraction(conf["spark.task.resource.gpu.amount"])
    assert 0 < per_task < 1, "tasks should share a GPU when the model is small"
    # Spark accepts a fractional amount only if it divides one GPU evenly.
    assert (1 / per_task).denominator == 1
    cpu_slots = int(conf["spark.executor.cores"]) // int(conf["spark.task.cpus"])
    assert cpu_slots == gpus / per_task
    # The discovery script named is the one shipped in conf/, where the image installs it.
    script = Path(conf["spark.executor.resource.gpu.discoveryScript"])
    assert script.parent == Path("/opt/deltavec/conf") and (REPO / "conf" / script.name).exists()
    assert "COPY conf /opt/deltavec/conf" in (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert int(conf["spark.sql.execution.arrow.maxRecordsPerBatch"]) >= 2048


# -- on a real GPU ----------------------------------------------------------------------


@pytest.mark.gpu
def test_discovery_finds_the_gpus_torch_sees() -> None:
    import torch

    assert torch.cuda.is_available()
    assert len(discover(dict(os.environ))) == torch.cuda.device_count()


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from deltavec.runtime.session import spark_home
    from tests.standalone import StandaloneCluster, cluster_env

    env = cluster_env(str(spark_home()), os.environ)
    # The worker offers one GPU, found by the shipped discovery script.
    env["SPARK_WORKER_OPTS"] = (
        f"-Dspark.worker.resource.gpu.amount=1 "
        f"-Dspark.worker.resource.gpu.discoveryScript={DISCOVERY}"
    )
    cluster = StandaloneCluster(root=tmp_path_factory.mktemp("gpu-standalone"), env=env)
    try:
        cluster.start(workers=1, cores=2, memory="4g")
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.gpu
@pytest.mark.cluster
@pytest.mark.timeout(1200)
def test_tasks_sharing_a_gpu_embed_like_the_cpu(
    spark: Any, tmp_path: Path, gpu_cluster: Any, sts_pairs: list[tuple[float, str, str]]
) -> None:
    from tests.standalone import LOOPBACK

    source = tmp_path / "source"
    rows = [{"id": i, "title": s1, "abstract": s2} for i, (_, s1, s2) in enumerate(sts_pairs)]
    write_rows(spark, source, rows[:64])
    conf = spark_gpu_conf()
    # spark-gpu.conf as shipped, with the script's path on this machine and two
    # slots sharing the worker's one GPU.
    conf.update(
        {
            "spark.executor.resource.gpu.discoveryScript": str(DISCOVERY),
            "spark.task.resource.gpu.amount": "0.5",
            "spark.executor.cores": "2",
            "spark.executor.memory": "1g",
            "spark.executor.memoryOverhead": "1g",
            "spark.driver.host": LOOPBACK,
            "spark.driver.bindAddress": LOOPBACK,
            "spark.sql.shuffle.partitions": "2",
            "spark.databricks.delta.snapshotPartitions": "2",
            "spark.ui.enabled": "false",
        }
    )
    body = "[spark.conf]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in conf.items())
    config = write_config(tmp_path, body, source={"path": str(source)}, model={"device": "auto"})
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltavec.cli",
            "run",
            "--once",
            "--master",
            gpu_cluster.url,
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": LOOPBACK},
    )
    assert run.returncode == 0, run.stderr[-4000:]

    devices = [
        line.split(" on ")[1].split()[0]
        for log in gpu_cluster.executor_logs()
        for line in log.splitlines()
        if "loaded model" in line
    ]
    assert devices and set(devices) == {"cuda:0"}, devices
    from deltavec.embed.encoder import Encoder, EncoderSpec
    from deltavec.embed.models import resolve_model

    cpu = Encoder(EncoderSpec(model=resolve_model("default"), device="cpu"))
    by_id = {r["id"]: np.asarray(r["embedding"]) for r in read_target(spark, tmp_path / "target")}
    reference, _ = cpu.encode([f"{r['title']} [SEP] {r['abstract']}" for r in rows[:64]])
    cosine = [float(by_id[i] @ reference[i]) for i in range(64)]
    assert min(cosine) >= 0.999  # bf16/fp16 on the GPU, fp32 on the CPU
