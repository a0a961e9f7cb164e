"""Source and target tables for the server tests, written with delta-rs (no Spark).

The target holds the default model's real vectors of the source's rendered text
and the table properties the job records (model, keys, source, template), so
``open_search`` opens it exactly as it opens a job's target.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
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


def sha256_hex(text: str) -> str:
    """The job's text hash."""
    return hashlib.sha256(text.encode()).hexdigest()


def write_source(path: Path, rows: list[dict[str, Any]], mode: str = "append") -> None:
    write_deltalake(str(path), source_table(rows), mode=mode)


def source_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
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


def write_target(
    path: Path,
    rows: list[dict[str, Any]],
    encoder: Any,
    identity: str,
    *,
    source: Path,
    model_name: str = "default",
    text_hash: Callable[[str], str] | None = sha256_hex,
) -> np.ndarray:
    """Embed the rows' text and append them; a new target gets the job's properties.

    ``text_hash``: what the ``text_hash`` column holds for a row's text (the
    job's is SHA-256 in hex); None: no such column, as in a target not written
    by the job.
    """
    new = not (path / "_delta_log").exists()
    vectors, _ = encoder.encode([render(r) for r in rows])
    write_deltalake(
        str(path),
        target_table(rows, np.asarray(vectors), identity, text_hash=text_hash),
        mode="append",
    )
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


def target_table(
    rows: list[dict[str, Any]],
    vectors: np.ndarray,
    identity: str,
    *,
    text_hash: Callable[[str], str] | None = sha256_hex,
) -> pa.Table:
    """Target rows for source ``rows`` (``text_hash``: as ``write_target`` takes it)."""
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    table = target_rows(ids, vectors, identity)
    if text_hash is not None:
        digests = [text_hash(render(r)) for r in rows]
        table = table.append_column("text_hash", pa.array(digests))
    return table


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
