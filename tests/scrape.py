"""Scrape a Prometheus endpoint over real HTTP and read its samples (test helper)."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
METRIC_NAME = re.compile(r"\bdeltavec_[a-z0-9_]+")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Scrape:
    """One scrape: every sample, and every metric family the endpoint declares."""

    samples: dict[str, list[tuple[dict[str, str], float]]]
    families: set[str]
    at: float

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the sample ``name`` whose labels include ``labels``."""
        for sample_labels, value in self.samples.get(name, []):
            if all(sample_labels.get(k) == v for k, v in labels.items()):
                return value
        return None

    def labels(self, name: str) -> list[dict[str, str]]:
        return [labels for labels, _ in self.samples.get(name, [])]

    def exposes(self, name: str) -> bool:
        """Whether ``name`` is a sample or a declared family (a labelled metric may have none)."""
        return name in self.samples or name in self.families


def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        if family.type == "counter":
            families.add(family.name + "_total")
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return Scrape(samples, families, time.time())


def wait_for(
    port: int, condition: Callable[[Scrape], bool], *, timeout: float = 600, what: str = ""
) -> Scrape:
    """Scrape until ``condition`` holds; fail with the last scrape's deltavec samples."""
    deadline = time.monotonic() + timeout
    last: Scrape | None = None
    while time.monotonic() < deadline:
        try:
            last = scrape(port)
        except OSError:
            last = None
        if last is not None and condition(last):
            return last
        time.sleep(0.5)
    shown = {k: v for k, v in (last.samples if last else {}).items() if k.startswith("deltavec")}
    raise AssertionError(f"timed out waiting for {what or 'the metrics'}; last scrape: {shown}")


def referenced_metrics(text: str) -> set[str]:
    """Every ``deltavec_*`` name a dashboard or rules file mentions."""
    return set(METRIC_NAME.findall(text))
