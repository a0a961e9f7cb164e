"""``deltavec status``: where a job stands, read from its checkpoint and tables alone.

It needs no running job: the source's position comes from its Delta log, the
stream's from the checkpoint's last committed offset, the table sizes from the
logs' row statistics, and the last batch's timing from the note the job leaves
in the checkpoint (``_deltavec/last_batch.json``). Nothing is scanned.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from deltavec.checkpointing.checkpoint import Checkpoint
from deltavec.config import DeltavecConfig, TableRef
from deltavec.errors import SourceError
from deltavec.observe.lag import measure_lag
from deltavec.runtime import tables
from deltavec.runtime.delta_log import DeltaLog, row_count
from deltavec.sink.target import DIM_PROPERTY, MODEL_PROPERTY

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def job_status(
    spark: SparkSession, config: DeltavecConfig, *, now: float | None = None
) -> dict[str, Any]:
    """Everything ``deltavec status`` shows, as plain JSON-ready values.

    Raises:
        SourceError: the source table does not exist.
    """
    now = time.time() if now is None else now
    cfg = config
    if not tables.exists(spark, cfg.source):
        raise SourceError(f"source table {cfg.source.name} does not exist")
    checkpoint = Checkpoint(spark, cfg.checkpoint.location)
    lag = measure_lag(DeltaLog(spark, cfg.source), checkpoint, mode=cfg.source.mode, now=now)
    notes = checkpoint.notes()
    target = _table(spark, cfg.target)
    properties = tables.properties(spark, cfg.target) if target["exists"] else {}
    last = checkpoint.last_batch()
    if last.get("finished_at") is not None:
        last["finished_at"] = _iso(float(last["finished_at"]))
    return {
        "source": {
            "table": cfg.source.name,
            "mode": cfg.source.mode,
            "latest_version": lag.latest_version,
            "latest_commit_at": _iso(lag.latest_commit_time),
        },
        "checkpoint": {
            "location": cfg.checkpoint.location,
            "exists": checkpoint.exists(),
            "last_batch_id": lag.last_batch_id,
            "processed_version": lag.processed_version,
            "starts": notes.get("starts"),
        },
        "lag": {
            "versions": lag.versions,
            "seconds": round(lag.seconds, 1) if lag.seconds is not None else None,
            "oldest_pending_version": lag.oldest_pending_version,
        },
        "target": target,
        "quarantine": _table(spark, cfg.target.quarantine),
        "model": {
            "identity": properties.get(MODEL_PROPERTY) or notes.get("model"),
            "dim": int(properties[DIM_PROPERTY]) if DIM_PROPERTY in properties else None,
        },
        "last_batch": last or None,
        "as_of": _iso(now),
    }


def _table(spark: SparkSession, ref: TableRef) -> dict[str, Any]:
    exists = tables.exists(spark, ref)
    return {
        "table": ref.name,
        "exists": exists,
        "rows": row_count(spark, ref) if exists else None,
    }


def format_status(status: dict[str, Any]) -> str:
    """The human form of ``job_status``: one aligned line per question."""
    source, ckpt, lag = status["source"], status["checkpoint"], status["lag"]
    now = _epoch(status["as_of"]) or time.time()
    lines = ["deltavec status"]

    def line(label: str, text: str) -> None:
        lines.append(f"  {label:<17}: {text}")

    line("source", f"{source['table']} ({source['mode']} mode)")
    latest = f"version {source['latest_version']}"
    if source["latest_commit_at"]:
        latest += f", committed {source['latest_commit_at']}"
    line("latest commit", latest)
    if ckpt["processed_version"] is None:
        line("processed", "nothing yet (no batch committed in the checkpoint)")
    else:
        line(
            "processed",
            f"through version {ckpt['processed_version']} (batch {ckpt['last_batch_id']})",
        )
    if lag["oldest_pending_version"] is None:
        line("lag", "caught up")
    else:
        age = _duration(lag["seconds"]) if lag["seconds"] is not None else "unknown"
        line(
            "lag",
            f"{lag['versions']} versions; oldest waiting commit (version "
            f"{lag['oldest_pending_version']}) is {age} old",
        )
    line("target", _rows(status["target"]))
    line("quarantine", _rows(status["quarantine"]))
    model = status["model"]
    if model["identity"]:
        dim = f" (dim {model['dim']})" if model["dim"] else ""
        line("model", f"{model['identity']}{dim}")
    last = status["last_batch"]
    if last:
        seconds = last.get("seconds", {})
        split = ", ".join(
            f"{k} {seconds[k]:.1f}s" for k in ("read", "embed", "merge") if k in seconds
        )
        finished = last.get("finished_at")
        ago = _epoch(finished)
        when = f"finished {finished}" + (f" ({_duration(now - ago)} ago)" if ago else "")
        line(
            "last batch",
            f"#{last.get('batch_id')} {when}, {sum(seconds.values()):.1f}s ({split}), "
            f"{last.get('rows', 0)} rows, {last.get('embedded', 0)} embedded",
        )
    else:
        line("last batch", "none recorded")
    line("checkpoint", ckpt["location"] + ("" if ckpt["exists"] else " (not created yet)"))
    return "\n".join(lines)


def _rows(table: dict[str, Any]) -> str:
    if not table["exists"]:
        return f"{table['table']} (not created yet)"
    count = table["rows"]
    rows = "rows unknown" if count is None else f"{count:,} row{'' if count == 1 else 's'}"
    return f"{table['table']} ({rows})"


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return (
        datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _duration(seconds: float) -> str:
    """43s, 5m 3s, 2h 5m, 3d 4h."""
    s = max(0, round(seconds))
    for unit, size, sub, sub_size in (
        ("d", 86400, "h", 3600),
        ("h", 3600, "m", 60),
        ("m", 60, "s", 1),
    ):
        if s >= size:
            return f"{s // size}{unit} {(s % size) // sub_size}{sub}"
    return f"{s}s"
