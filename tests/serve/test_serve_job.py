"""The server against the real job: searches keep answering while the job writes.

One target is built by ``Job(...).run(once=True)``; the server follows it while
a client searches without pause and the job embeds a second batch of rows.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from deltavec.commands.job import Job
from deltavec.config import load_config
from tests.conftest import write_config, write_rows
from tests.serve.targets import serving, wait_until

pytestmark = pytest.mark.slow

REFRESH_SECONDS = 1.0


def papers(first: int, n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "title": f"Paper {i} on topic T{i}X",
            "abstract": f"Findings number {i} about subject {i % 7}",
        }
        for i in range(first, first + n)
    ]


def test_searches_during_the_jobs_writes_never_fail_and_see_new_rows_within_a_refresh(
    spark: Any, tmp_path: Path
) -> None:
    write_rows(spark, tmp_path / "source", papers(0, 40))
    config = load_config(write_config(tmp_path))
    assert Job(config, spark).run(once=True).embedded == 40
    statuses: list[int] = []
    stop = threading.Event()

    with serving(tmp_path / "target", refresh_seconds=REFRESH_SECONDS) as (server, client):

        def keep_searching() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as own:
                while not stop.is_set():
                    for mode in ("vector", "hybrid", "keyword"):
                        ask = {"query": "Findings about subject 3", "k": 5, "mode": mode}
                        statuses.append(own.post("/search", json=ask).status_code)
                    # Leave the CPUs to the job: a steady trickle, not a load test.
                    time.sleep(0.05)

        searcher = threading.Thread(target=keep_searching)
        searcher.start()
        try:
            write_rows(spark, tmp_path / "source", papers(100, 30))
            assert Job(config, spark).run(once=True).embedded == 30
            written = time.monotonic()
            ask = {"query": "Paper 117 on topic T117X [SEP] Findings number 117 about subject 5"}

            def found(mode: str) -> bool:
                hits = client.post("/search", json={**ask, "k": 1, "mode": mode}).json()["hits"]
                return bool(hits) and hits[0]["key"] == {"id": 117}

            wait_until(lambda: found("vector") and found("keyword"), seconds=30)
            seen_after = time.monotonic() - written
        finally:
            stop.set()
            searcher.join()
        health = client.get("/healthz").json()

    assert health["rows"] == 70
    # A refresh starts at most REFRESH_SECONDS after the commit; what it reads
    # (a few files and 30 source rows) takes well under a second more.
    assert seen_after < REFRESH_SECONDS + 2, seen_after
    assert len(statuses) > 10 and set(statuses) == {200}
