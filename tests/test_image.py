"""The production image without a Docker engine: lint it, and run its install steps here.

No Docker engine runs on the build machines, so the Dockerfile is checked three
ways: hadolint (with ShellCheck on its RUN lines), the contract a cluster relies
on (non-root user, entry point, health check, offline JARs), and the install
script it calls, run for real against a temporary virtual environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from deltavec.config import MetricsConfig, ServeConfig
from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is missing: run `make setup` (it is a dev dependency)"
    return str(path)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            current = []
            stages[args.split()[-1]] = current
        current.append((keyword, args))
    return stages


# -- lint ------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--config", ".hadolint.yaml", "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = sorted([*REPO.glob("docker/*.sh"), *REPO.glob("conf/*.sh")])
    assert {p.name for p in scripts} >= {"install.sh", "spark-entrypoint.sh", "gpu-discovery.sh"}
    result = subprocess.run(
        [_tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for script in scripts:  # Spark and the Dockerfile run them directly
        assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


# -- what a cluster relies on -------------------------------------------------------------


def test_runtime_stage_is_the_contract_clusters_rely_on() -> None:
    stages = _stages()
    assert list(stages) == ["uv", "base", "build", "runtime"]
    runtime = dict(stages["runtime"])
    assert stages["runtime"][0] == ("FROM", "base AS runtime")
    # The CUDA base image and the JRE are in the stage the runtime starts from.
    assert "CUDA_IMAGE=nvidia/cuda:" in " ".join(
        a for k, a in dockerfile_instructions() if k == "ARG"
    )
    assert "openjdk-17-jre-headless" in dict(stages["base"])["RUN"]
    assert json.loads(runtime["ENTRYPOINT"]) == ["deltavec"]
    user = runtime["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "the image must run as a numeric non-root user"
    assert runtime["EXPOSE"] == str(MetricsConfig().port)
    health = runtime["HEALTHCHECK"]
    assert "/metrics" in health and "DELTAVEC_METRICS__PORT" in health
    env = runtime["ENV"]
    # The metrics endpoint must listen beyond the container's loopback.
    assert "DELTAVEC_METRICS__HOST=0.0.0.0" in env
    assert "PYSPARK_PYTHON=/opt/deltavec/venv/bin/python" in env
    # The Delta JARs go into the SPARK_HOME the runtime sets, so nothing is fetched.
    spark_home = re.search(r"SPARK_HOME=(\S+)", env)
    assert spark_home and f"{spark_home.group(1)}/jars" in dict(stages["build"])["RUN"]


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "data", "checkpoints", "spark-warehouse"} <= ignored
    copied = {
        args.split()[0]
        for keyword, args in dockerfile_instructions()
        if keyword == "COPY" and not args.startswith("--from")
    }
    for path in copied:  # what the Dockerfile copies must not be ignored
        assert path.split("/")[0] not in ignored, path


def test_k8s_pod_template_runs_the_images_spark_entrypoint() -> None:
    template = yaml.safe_load((REPO / "conf/k8s/pod-template.yaml").read_text(encoding="utf-8"))
    command = template["spec"]["containers"][0]["command"]
    runtime_copies = [args for keyword, args in _stages()["runtime"] if keyword == "COPY"]
    assert f"docker/spark-entrypoint.sh {command[0]}" in runtime_copies
    assert template["spec"]["securityContext"]["runAsUser"] == int(
        dict(_stages()["runtime"])["USER"].split(":")[0]
    )


def test_spark_entrypoint_starts_an_executor_jvm_and_passes_anything_else_to_deltavec(
    tmp_path: Path,
) -> None:
    script = str(REPO / "docker/spark-entrypoint.sh")
    # Anything but "driver"/"executor" is the deltavec CLI.
    passthrough = subprocess.run(
        [script, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "SPARK_HOME": "/x"},
    )
    assert passthrough.returncode == 0, passthrough.stderr
    assert "usage: deltavec" in passthrough.stdout

    # "executor": the JVM command Spark on Kubernetes expects, recorded by a stand-in java.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "java").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    (fake_bin / "java").chmod(0o755)
    pod_env = {
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "ARGS_FILE": str(tmp_path / "args"),
        "SPARK_HOME": "/opt/spark",
        "SPARK_JAVA_OPT_0": "-Dspark.driver.port=7078",
        "SPARK_JAVA_OPT_1": "-Dspark.app.name=deltavec app",
        "SPARK_EXECUTOR_MEMORY": "4g",
        "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@driver:7078",
        "SPARK_EXECUTOR_ID": "3",
        "SPARK_EXECUTOR_CORES": "4",
        "SPARK_APPLICATION_ID": "spark-123",
        "SPARK_EXECUTOR_POD_IP": "10.0.0.7",
        "SPARK_RESOURCE_PROFILE_ID": "0",
        "SPARK_EXECUTOR_POD_NAME": "deltavec-exec-3",
    }
    subprocess.run([script, "executor"], env=pod_env, check=True)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:4] == [
        "-Dspark.driver.port=7078",
        "-Dspark.app.name=deltavec app",
        "-Xms4g",
        "-Xmx4g",
    ]
    assert args[4:6] == ["-cp", "/opt/spark/conf:/opt/spark/jars/*"]
    assert args[6] == "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend"
    flags = dict(zip(args[7::2], args[8::2], strict=True))
    assert flags["--executor-id"] == "3" and flags["--podName"] == "deltavec-exec-3"
    assert flags["--hostname"] == "10.0.0.7" and flags["--cores"] == "4"


# -- docker-compose ---------------------------------------------------------------------

# Written for issue 6 (metrics dashboard and alerts); until that lands on this
# branch they may be absent, and every other mount must exist.
DASHBOARD_FILES = {"conf/grafana/deltavec.json", "conf/prometheus/alerts.yml"}


def _compose() -> dict[str, object]:
    compose: dict[str, object] = yaml.safe_load(
        (REPO / "docker-compose.yml").read_text(encoding="utf-8")
    )
    return compose


def test_compose_file_matches_the_compose_schema() -> None:
    result = subprocess.run(
        [
            _tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(REPO / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_wires_job_prometheus_and_grafana_together() -> None:
    services: dict[str, dict[str, object]] = _compose()["services"]  # type: ignore[assignment]
    assert {"job", "prometheus", "grafana"} <= set(services)
    mounts: dict[str, str] = {}
    for service in services.values():
        for volume in service.get("volumes", []):  # type: ignore[attr-defined]
            source, target = str(volume).split(":")[:2]
            if source.startswith("./"):
                mounts[target] = source.removeprefix("./")
    for target, source in mounts.items():
        assert (REPO / source).exists(), f"{source} (mounted at {target}) does not exist"
    assert set(mounts.values()) >= DASHBOARD_FILES

    # Prometheus scrapes the job service on the port the job serves metrics on,
    # and the search service on the port its command serves, with its token.
    prometheus = yaml.safe_load(
        (REPO / mounts["/etc/prometheus/prometheus.yml"]).read_text(encoding="utf-8")
    )
    scrapes = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    targets = {
        name: [t for s in job["static_configs"] for t in s["targets"]]
        for name, job in scrapes.items()
    }
    command: list[str] = services["search"]["command"]  # type: ignore[assignment]
    port = command[command.index("--port") + 1]
    assert targets == {
        "deltavec": [f"job:{MetricsConfig().port}"],
        "deltavec-search": [f"search:{port}"],
    }
    token_file = scrapes["deltavec-search"]["authorization"]["credentials_file"]
    assert token_file in " ".join(services["prometheus"]["entrypoint"])  # type: ignore[arg-type]
    token = "DELTAVEC_SERVE_TOKEN"
    assert services["prometheus"]["environment"][token] == services["search"]["environment"][token]  # type: ignore[index]
    assert all(rule in mounts for rule in prometheus["rule_files"])
    # Grafana's dashboard provider reads the folder the dashboard is mounted into,
    # and its datasource is the prometheus service.
    provider_dir = next(t for t in mounts if t.startswith("/etc/grafana/provisioning/dashboards"))
    providers = yaml.safe_load(
        (REPO / mounts[provider_dir] / "deltavec.yml").read_text(encoding="utf-8")
    )
    dashboard_dir = providers["providers"][0]["options"]["path"]
    assert mounts[f"{dashboard_dir}/deltavec.json"] == "conf/grafana/deltavec.json"
    datasource_dir = next(
        t for t in mounts if t.startswith("/etc/grafana/provisioning/datasources")
    )
    datasources = yaml.safe_load(
        (REPO / mounts[datasource_dir] / "prometheus.yml").read_text(encoding="utf-8")
    )
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


# -- the install script, for real ----------------------------------------------------------


def _build_context(dest: Path) -> Path:
    """The files the build stage COPYs, laid out as the Dockerfile lays them in /src."""
    for keyword, args in _stages()["build"]:
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, target = args.split()
        for source in sources:
            into = dest / target.removeprefix("./") if target not in ("./", ".") else dest
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                final = into / source if target.endswith("/") else into
                final.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / source, final)
    return dest


@pytest.mark.slow
def test_install_script_builds_a_working_offline_installation(tmp_path: Path) -> None:
    src = _build_context(tmp_path / "src")
    # A fresh venv that sees this one's site-packages, so torch is not installed
    # again; pip installs deltavec into the new venv only.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    venv_site = next((venv / "lib").glob("python3*/site-packages"))
    (venv_site / "_shared.pth").write_text(site.getsitepackages()[0] + "\n")
    python = str(venv / "bin" / "python")
    spark_home = tmp_path / "spark"
    offline = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",
    }
    install = str(src / "docker" / "install.sh")

    # A SPARK_HOME with Spark's own JARs, as pip installs it (the image adds the
    # Delta JARs to the installed one; here a copy of its layout takes them).
    pyspark_home = Path(site.getsitepackages()[0]) / "pyspark"
    (spark_home / "jars").mkdir(parents=True)
    for jar in (pyspark_home / "jars").iterdir():
        (spark_home / "jars" / jar.name).symlink_to(jar)
    for folder in ("bin", "python"):
        (spark_home / folder).symlink_to(pyspark_home / folder)

    subprocess.run([install, "package", python, str(src)], env=offline, check=True)
    jars = subprocess.run(
        [install, "jars", python, str(spark_home / "jars")],
        env=offline,
        capture_output=True,
        text=True,
    )
    assert jars.returncode == 0, jars.stderr[-3000:]
    assert "added delta-spark_2.13-" in jars.stderr
    assert "kept antlr4-runtime-" in jars.stderr  # Spark's own copy is not doubled
    image_env = {**offline, "SPARK_HOME": str(spark_home)}
    check = subprocess.run(
        [install, "check", python], env=image_env, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert f"deltavec ok: {venv_site}/deltavec/__init__.py" in check.stdout

    # With the JARs on Spark's classpath, Delta works and Ivy resolves nothing.
    table = tmp_path / "table"
    delta = subprocess.run(
        [python, "-c", _WRITE_AND_READ_DELTA, str(table)],
        env={**image_env, "PYSPARK_PYTHON": python},
        cwd=tmp_path,  # import the installed package, not this checkout
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert delta.returncode == 0, delta.stderr[-3000:]
    assert delta.stdout.strip().splitlines()[-1] == "rows=3"
    assert "resolving dependencies" not in delta.stderr
    assert (table / "_delta_log" / "00000000000000000000.json").exists()


_WRITE_AND_READ_DELTA = textwrap.dedent(
    """
    import sys
    from deltavec.runtime.session import build_session
    # A one-off check of a throw-away installation: no class archive to keep.
    spark = build_session(master="local[1]", app_name="image-check",
                          conf={"spark.ui.enabled": "false"}, class_archive=False)
    assert "spark.jars.packages" not in dict(spark.sparkContext.getConf().getAll())
    spark.range(3).write.format("delta").save(sys.argv[1])
    print(f"rows={spark.read.format('delta').load(sys.argv[1]).count()}")
    spark.stop()
    """
)


def test_compose_search_service_serves_the_demo_target_behind_a_token() -> None:
    search: dict[str, Any] = _compose()["services"]["search"]  # type: ignore[index]
    assert search["command"][0] == "serve"
    port = ServeConfig().port
    # Off loopback inside its container, so the server insists on a token.
    assert search["command"][1:] == ["--host", "0.0.0.0", "--port", str(port)]
    assert ServeConfig().token_env in search["environment"]
    assert search["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(search["healthcheck"]["test"])
    assert search["depends_on"]["seed"]["condition"] == "service_completed_successfully"
