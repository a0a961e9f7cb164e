"""The metrics endpoint without Spark: what a batch report and a conflict retry become.

The whole pipeline's metrics, scraped during a real run, are in test_metrics.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from deltavec.config import load_config
from deltavec.errors import ConfigError
from deltavec.observe.metrics import JobMetrics, MetricsServer
from deltavec.sink import transactions
from deltavec.sink.batch import BatchReport
from tests.conftest import write_config
from tests.scrape import REPO, free_port, referenced_metrics, scrape


@pytest.fixture
def served() -> Iterator[tuple[JobMetrics, int]]:
    metrics = JobMetrics()
    port = free_port()
    server = MetricsServer(metrics, host="127.0.0.1", port=port)
    server.start()
    try:
        yield metrics, port
    finally:
        server.stop()


def test_a_batch_report_becomes_counters_gauges_and_histograms(
    served: tuple[JobMetrics, int],
) -> None:
    metrics, port = served
    report = BatchReport(
        batch_id=4,
        rows=120,
        upserts=110,
        deletes=5,
        unchanged=30,
        embedded=77,
        quarantined={"empty_text": 2, "encode_error": 1},
        duplicates=3,
        seconds={"read": 1.0, "embed": 2.0, "merge": 1.0},
        tokens=5000,
        padded_tokens=5500,
    )
    metrics.observe_batch(report)
    metrics.observe_batch(BatchReport(batch_id=5, rows=10, quarantined={"empty_text": 4}))
    got = scrape(port)

    assert got.value("deltavec_rows_read_total") == 130
    assert got.value("deltavec_rows_embedded_total") == 77
    assert got.value("deltavec_rows_unchanged_total") == 30
    assert got.value("deltavec_rows_deleted_total") == 5
    assert got.value("deltavec_rows_duplicate_total") == 3
    assert got.value("deltavec_rows_quarantined_total", reason="empty_text") == 6
    assert got.value("deltavec_rows_quarantined_total", reason="encode_error") == 1
    assert got.value("deltavec_batches_total") == 2
    assert got.value("deltavec_tokens_total") == 5000
    assert got.value("deltavec_padded_tokens_total") == 5500
    # Gauges describe the last batch that set them: batch 5 embedded nothing,
    # so the padding ratio is still batch 4's.
    assert got.value("deltavec_last_batch_padding_ratio") == pytest.approx(1.1)
    assert got.value("deltavec_last_batch_id") == 5
    assert got.value("deltavec_batch_stage_duration_seconds_count", stage="embed") == 2
    assert got.value("deltavec_batch_stage_duration_seconds_sum", stage="embed") == 2.0
    # No GPU reported: the GPU gauge is declared but has no sample.
    assert got.exposes("deltavec_gpu_memory_used_bytes")
    assert got.labels("deltavec_gpu_memory_used_bytes") == []


def test_rates_of_the_last_batch(served: tuple[JobMetrics, int]) -> None:
    metrics, port = served
    metrics.observe_batch(
        BatchReport(
            batch_id=0,
            rows=400,
            embedded=400,
            seconds={"read": 1.0, "embed": 2.0, "merge": 1.0},
            tokens=8000,
            padded_tokens=8000,
            gpu_memory={"cuda:0": 3 << 30},
            device="cuda",
            dtype="bfloat16",
        )
    )
    got = scrape(port)
    assert got.value("deltavec_last_batch_rows_per_second") == 100  # 400 rows in 4 s
    assert got.value("deltavec_last_batch_tokens_per_second") == 4000  # 8000 tokens in 2 s
    assert got.value("deltavec_gpu_memory_used_bytes", device="cuda:0") == 3 << 30
    assert got.labels("deltavec_model_info") == [{"device": "cuda", "dtype": "bfloat16"}]


def test_delta_conflict_retries_are_counted_by_conflict(served: tuple[JobMetrics, int]) -> None:
    from delta.exceptions import ConcurrentAppendException

    metrics, port = served
    unregister = transactions.on_retry(metrics.count_retry)
    calls = 0

    def commit() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:  # the injected fault: two conflicts, then success
            raise ConcurrentAppendException("Files were added to the root of the table")
        return "committed"

    try:
        assert (
            transactions.retry_conflicts(commit, what="test MERGE", sleep=lambda _: None)
            == "committed"
        )
    finally:
        unregister()
    calls = 0
    transactions.retry_conflicts(commit, what="after unregistering", sleep=lambda _: None)

    got = scrape(port)
    conflict = "ConcurrentAppendException"
    assert got.value("deltavec_delta_conflict_retries_total", conflict=conflict) == 2


def test_stopped_endpoint_refuses_connections() -> None:
    port = free_port()
    server = MetricsServer(JobMetrics(), host="127.0.0.1", port=port)
    server.start()
    assert scrape(port).exposes("process_start_time_seconds")
    server.stop()
    with pytest.raises(OSError):
        scrape(port)


def test_a_busy_port_stops_the_job_with_one_line_before_spark_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, metrics={"port": port})
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "deltavec.cli", "run", "--once", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"deltavec: error: metrics endpoint 127.0.0.1:{port} cannot be opened" in result.stderr
    assert "metrics.port" in result.stderr
    assert not (tmp_path / "target").exists()  # no table touched
    assert time.monotonic() - started < 30  # refused before a JVM started


def test_metrics_refresh_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.refresh_seconds"):
        load_config(write_config(tmp_path, metrics={"port": 0, "refresh_seconds": 0}))


def test_alert_rules_are_well_formed() -> None:
    rules = yaml.safe_load((REPO / "conf" / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in alerts}
    assert {"DeltavecStreamStalled", "DeltavecSourceLagHigh", "DeltavecQuarantineSpike"} <= names
    for rule in alerts:
        assert rule["expr"].strip()
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
    expressions = " ".join(rule["expr"] for rule in alerts)
    assert "deltavec_source_lag_seconds" in referenced_metrics(expressions)
