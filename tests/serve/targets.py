"""Source and target tables for the server tests, written with delta-rs (no Spark).

The target holds the default model's real vectors of the source's rendered text
and the table properties the job records (model, keys, source, template), so
``open_search`` opens it exactly as it opens a job's target.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from deltavec.serve import RunningServer, ServeOptions, start
from tests.search.test_index import target_rows

TEMPLATE = "{title}. {body}"


def render(row: dict[str, Any]) -> str:
    return TEMPLATE.format(**row)


def write_source(path: Path, rows: list[dict[str, Any]], mode: str = "append") -> None:
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("id", pa.int64()),
                ("title", pa.string()),
                ("body", pa.string()),
                ("year", pa.int32()),
            ]
        ),
    )
    write_deltalake(str(path), table, mode=mode)


def write_target(
    path: Path,
    rows: list[dict[str, Any]],
    encoder: Any,
    identity: str,
    *,
    source: Path,
    model_name: str = "default",
) -> np.ndarray:
    """Embed the rows' text and append them; a new target gets the job's properties."""
    new = not (path / "_delta_log").exists()
    vectors, _ = encoder.encode([render(r) for r in rows])
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    write_deltalake(str(path), target_rows(ids, np.asarray(vectors), identity), mode="append")
    if new:
        DeltaTable(str(path)).alter.set_table_properties(
            {
                "deltavec.model": identity,
                "deltavec.model_name": model_name,
                "deltavec.keys": "id",
                "deltavec.dim": str(vectors.shape[1]),
                "deltavec.source": str(source),
                "deltavec.template": TEMPLATE,
            },
            raise_if_not_exists=False,
        )
    return np.asarray(vectors)


@contextmanager
def serving(table: Path, **options: Any) -> Iterator[tuple[RunningServer, httpx.Client]]:
    """A real server on a free loopback port and an HTTP client for it, ready to answer."""
    server = start(ServeOptions(table=str(table), port=0, **options))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            wait_until(lambda: client.get("/healthz").status_code == 200, seconds=120)
            yield server, client
    finally:
        server.stop()


def wait_until(condition: Any, *, seconds: float, every: float = 0.05) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {seconds} s")
        time.sleep(every)
