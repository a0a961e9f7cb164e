"""The metrics endpoint, scraped over real HTTP while a real job runs.

One module-scoped run feeds every test here (a Spark job costs tens of seconds):

1. a continuous job reads a first commit (30 rows, one of them blank), then a
   second (20 rows) written while it runs; the endpoint is scraped until it
   shows both, then the job is stopped;
2. a third commit is drained by a ``--once`` run whose batch listener scrapes
   the endpoint in the middle of the batch, while the commit still waits.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from deltavec.sink.batch import BatchReport
from tests.conftest import read_target, write_config, write_rows
from tests.scrape import REPO, Scrape, free_port, referenced_metrics, scrape, wait_for

pytestmark = pytest.mark.slow


@dataclass
class Observed:
    """What the run did, read from the tables, next to what the endpoint said."""

    started: float = 0.0
    texts: list[str] = field(default_factory=list)
    continuous: Scrape | None = None
    target_rows: int = 0
    quarantine: list[Any] = field(default_factory=list)
    closed_after_stop: bool = False
    mid_batch: Scrape | None = None
    third_commit_time: float = 0.0
    model_identity: str = ""


def _papers(pairs: list[tuple[float, str, str]], start: int, stop: int) -> list[dict[str, Any]]:
    return [{"id": i, "title": pairs[i][1], "abstract": pairs[i][2]} for i in range(start, stop)]


@pytest.fixture(scope="module")
def observed(
    spark: Any, tmp_path_factory: pytest.TempPathFactory, sts_pairs: list[tuple[float, str, str]]
) -> Observed:
    tmp = tmp_path_factory.mktemp("metrics")
    port = free_port()
    config = load_config(
        write_config(
            tmp,
            trigger={"interval": "1 second"},
            metrics={"port": port, "refresh_seconds": 1},
        )
    )
    first = _papers(sts_pairs, 0, 30)
    first[7] = {"id": 7, "title": "  ", "abstract": ""}  # nothing to embed: quarantined
    second = _papers(sts_pairs, 30, 50)
    seen = Observed(started=time.time())
    seen.texts = [f"{r['title']} [SEP] {r['abstract']}" for r in first + second if r["id"] != 7]
    write_rows(spark, tmp / "source", first)

    job = Job(config, spark)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            job.run(once=False)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(
            port,
            lambda m: (
                m.value("deltavec_rows_read_total") == 30
                and m.value("deltavec_last_committed_source_version") == 0
            ),
            what="the first commit",
        )
        write_rows(spark, tmp / "source", second)
        seen.continuous = wait_for(
            port,
            lambda m: (
                m.value("deltavec_rows_read_total") == 50
                and m.value("deltavec_source_latest_version") == 1
                and m.value("deltavec_source_lag_versions") == 0
                and m.value("deltavec_target_rows") == 49
                and m.value("deltavec_batch_duration_seconds_count") == 2
            ),
            what="the second commit",
        )
    finally:
        job.request_stop()
        thread.join(timeout=300)
    assert not errors, errors
    seen.model_identity = job.model_identity
    seen.target_rows = len(read_target(spark, tmp / "target"))
    seen.quarantine = read_target(spark, tmp / "target_quarantine")
    try:
        scrape(port)
    except OSError:
        seen.closed_after_stop = True

    # A third commit, drained by a --once run; scraped while its batch is written.
    write_rows(spark, tmp / "source", _papers(sts_pairs, 50, 55))
    history = spark.sql(f"DESCRIBE HISTORY delta.`{tmp / 'source'}`").orderBy("version")
    seen.third_commit_time = history.collect()[-1]["timestamp"].timestamp()

    def scrape_mid_batch(report: BatchReport) -> None:
        seen.mid_batch = wait_for(
            port, lambda m: m.value("deltavec_source_latest_version") == 2, timeout=120
        )

    again = Job(config, spark)
    again.on_batch(scrape_mid_batch)
    again.run(once=True)
    return seen


def test_scraped_counts_equal_what_the_job_wrote(observed: Observed, encoder: Any) -> None:
    m = observed.continuous
    assert m is not None
    assert observed.target_rows == 49 and len(observed.quarantine) == 1

    assert m.value("deltavec_rows_read_total") == 50
    assert m.value("deltavec_rows_embedded_total") == observed.target_rows
    assert m.value("deltavec_target_rows") == observed.target_rows
    assert m.value("deltavec_rows_quarantined_total", reason="empty_text") == 1
    assert m.value("deltavec_quarantine_rows") == len(observed.quarantine)
    assert m.value("deltavec_rows_unchanged_total") == 0
    assert m.value("deltavec_rows_deleted_total") == 0
    assert m.value("deltavec_batches_total") == 2
    for stage in ("read", "embed", "merge"):
        assert m.value("deltavec_batch_stage_duration_seconds_count", stage=stage) == 2
        assert m.value("deltavec_batch_stage_duration_seconds_sum", stage=stage) > 0
    assert m.value("deltavec_batch_duration_seconds_count") == 2
    # The model read exactly the tokens of the 49 texts (the tokenizer, counted here).
    windows = encoder.tokenizer(observed.texts, truncation=True, max_length=encoder.max_tokens)
    tokens = sum(len(ids) for ids in windows["input_ids"])
    assert m.value("deltavec_tokens_total") == tokens
    assert m.value("deltavec_padded_tokens_total") >= tokens
    assert m.value("deltavec_last_batch_padding_ratio") >= 1.0
    assert m.value("deltavec_last_batch_tokens_per_second") > 0
    assert m.value("deltavec_last_batch_rows_per_second") > 0


def test_positions_times_and_model_are_reported(observed: Observed) -> None:
    m = observed.continuous
    assert m is not None
    assert m.value("deltavec_source_latest_version") == 1
    assert m.value("deltavec_last_committed_source_version") == 1
    assert m.value("deltavec_source_lag_versions") == 0
    assert m.value("deltavec_source_lag_seconds") == 0
    assert m.value("deltavec_last_batch_id") == 1
    assert observed.started <= m.value("deltavec_last_batch_timestamp_seconds") <= m.at
    assert observed.started <= m.value("deltavec_last_progress_timestamp_seconds") <= m.at
    assert m.value("deltavec_query_active") == 1
    assert m.value("deltavec_query_restarts_total") == 0
    assert m.value("deltavec_query_failures_total") == 0
    assert m.labels("deltavec_model_info") == [
        {"model": observed.model_identity, "dim": "384", "device": "cpu", "dtype": "float32"}
    ]
    assert m.labels("deltavec_gpu_memory_used_bytes") == []  # no GPU here


def test_lag_is_reported_while_a_commit_waits(observed: Observed) -> None:
    m = observed.mid_batch
    assert m is not None
    # Scraped inside the batch that reads version 2: it is not committed yet.
    assert m.value("deltavec_source_latest_version") == 2
    assert m.value("deltavec_last_committed_source_version") == 1
    assert m.value("deltavec_source_lag_versions") == 1
    lag = m.value("deltavec_source_lag_seconds")
    assert lag is not None and 0 < lag <= m.at - observed.third_commit_time + 1
    # The second start of this checkpoint's query.
    assert m.value("deltavec_query_restarts_total") == 1


def test_the_endpoint_closes_when_the_job_stops(observed: Observed) -> None:
    assert observed.closed_after_stop


def test_dashboard_and_alerts_use_only_metrics_the_job_exports(observed: Observed) -> None:
    m = observed.continuous
    assert m is not None
    dashboard = json.loads((REPO / "conf" / "grafana" / "deltavec.json").read_text())
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(expressions) >= 15
    alerts = (REPO / "conf" / "prometheus" / "alerts.yml").read_text()
    referenced = referenced_metrics(" ".join(expressions)) | referenced_metrics(alerts)
    missing = sorted(name for name in referenced if not m.exposes(name))
    assert not missing, f"referenced but not exported: {missing}"
    # The dashboard covers what an operator asks first.
    for name in (
        "deltavec_rows_read_total",
        "deltavec_source_lag_seconds",
        "deltavec_batch_stage_duration_seconds_sum",
        "deltavec_rows_quarantined_total",
        "deltavec_delta_conflict_retries_total",
    ):
        assert name in referenced_metrics(" ".join(expressions))
