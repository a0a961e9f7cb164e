"""A real Spark standalone cluster on 127.0.0.1: one master, N workers, torn down whole.

pyspark's pip package ships ``bin/spark-class`` but not ``sbin/start-master.sh``
or ``start-worker.sh``, so the daemons are started with ``spark-class`` directly,
each in its own process group: stopping a worker's group also ends the executors
and Python workers it launched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class StandaloneCluster:
    """Handles on the daemons; ``url`` is what ``--master`` takes."""

    root: Path
    env: dict[str, str]
    master_port: int = field(default_factory=free_port)
    ui_port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    work_dirs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"spark://{LOOPBACK}:{self.master_port}"

    def start(self, *, workers: int, cores: int, memory: str, timeout: float = 180) -> None:
        self._daemon(
            "master",
            "org.apache.spark.deploy.master.Master",
            ["--host", LOOPBACK, "--port", str(self.master_port)],
            ["--webui-port", str(self.ui_port)],
        )
        for i in range(workers):
            work = self.root / f"worker-{i}"
            work.mkdir(parents=True)
            self.work_dirs.append(work)
            self._daemon(
                f"worker-{i}",
                "org.apache.spark.deploy.worker.Worker",
                ["--host", LOOPBACK, "--cores", str(cores), "--memory", memory],
                ["--work-dir", str(work), "--webui-port", str(free_port()), self.url],
            )
        self._wait_for_workers(workers, timeout)

    def _daemon(self, name: str, main_class: str, *args: list[str]) -> None:
        spark_class = Path(self.env["SPARK_HOME"]) / "bin" / "spark-class"
        log = (self.root / f"{name}.log").open("wb")
        command = [str(spark_class), main_class, *[a for group in args for a in group]]
        self.processes.append(
            subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def state(self) -> dict[str, object]:
        """The master's own view of the cluster (its web UI's JSON)."""
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.ui_port}/json/", timeout=5) as r:
            state: dict[str, object] = json.load(r)
        return state

    def _wait_for_workers(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a cluster daemon exited early; see {self.root}/*.log")
            try:
                if self.state().get("aliveworkers") == count:
                    return
            except OSError:
                pass  # the master's UI is not up yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} workers did not register in {timeout:.0f}s")
            time.sleep(1)

    def stop(self) -> None:
        """SIGTERM each daemon's process group (workers first), SIGKILL what is left."""
        for process in reversed(self.processes):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in reversed(self.processes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            # Executors and Python workers share the daemon's group; end any left.
            _signal_group(process, signal.SIGKILL)
            process.wait()

    def executor_logs(self) -> list[str]:
        """The stderr of every executor the workers ran (Python workers write there too)."""
        return [
            path.read_text(encoding="utf-8", errors="replace")
            for work in self.work_dirs
            for path in sorted(work.glob("app-*/*/stderr"))
        ]


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def cluster_env(spark_home: str, base: Mapping[str, str]) -> dict[str, str]:
    """The daemons' environment: loopback only, small daemons, no test PYTHONPATH.

    Without the checkout on PYTHONPATH, executors can only run this checkout's
    code if the driver ships it to them, which is what the test checks.
    """
    env = {k: v for k, v in base.items() if k != "PYTHONPATH"}
    env.update(
        {
            "SPARK_HOME": spark_home,
            "SPARK_LOCAL_IP": LOOPBACK,
            # The master and workers only schedule; 256 MB each is plenty.
            "SPARK_DAEMON_MEMORY": "256m",
        }
    )
    return env
