"""``deltavec serve`` as a user runs it: a separate process, real HTTP, Ctrl-C to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.scrape import free_port
from tests.serve.targets import wait_until, write_source, write_target


@pytest.fixture(scope="module")
def identity(model_path: str) -> str:
    from deltavec.embed.models import model_identity

    return model_identity("default", model_path)


def _deltavec(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltavec.cli", *args]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_answers_over_http_and_stops_cleanly_on_a_signal(
    stop: signal.Signals, tmp_path: Path, encoder: Any, identity: str
) -> None:
    rows = [{"id": 1, "title": "Ferrous", "body": "iron oxide pigments", "year": 2021}]
    write_source(tmp_path / "source", rows)
    write_target(tmp_path / "target", rows, encoder, identity, source=tmp_path / "source")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DELTAVEC_SERVE_TOKEN"}

    refused = subprocess.run(
        _deltavec("serve", "--table", str(tmp_path / "target"), "--host", "0.0.0.0"),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "deltavec: error: serving on 0.0.0.0 needs a bearer token: set DELTAVEC_SERVE_TOKEN "
        "(clients then send 'Authorization: Bearer <token>'), or bind to 127.0.0.1"
    )

    table = str(tmp_path / "target")
    server = subprocess.Popen(
        _deltavec("serve", "--table", table, "--port", str(port), "--index", "approximate"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, seconds=180, every=0.2)
        # Ready while exact; the approximate index follows in the background.
        wait_until(lambda: httpx.get(f"{url}/healthz").json()["index"] == "approximate", seconds=60)
        found = httpx.post(f"{url}/search", json={"query": "iron oxide", "mode": "hybrid"})
        assert [h["key"] for h in found.json()["hits"]] == [{"id": 1}]
    finally:
        server.send_signal(stop)
        _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr[-2000:]
    assert f"serving {tmp_path / 'target'} on {url}" in stderr
    assert f"stopped serving {tmp_path / 'target'}" in stderr
    # What the server froze is freed at exit: nothing reports leaked objects.
    assert "leaked" not in stderr, stderr[-2000:]
