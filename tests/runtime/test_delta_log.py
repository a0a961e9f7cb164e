"""Reading Delta commit files: which commits a stream reads, how many rows they add, when.

The commit texts are in the Delta protocol's format, as Delta 4.0 writes them
(shortened to the fields that matter); the whole path, from a real table, is
exercised by test_status.py and test_metrics.py.
"""

from __future__ import annotations

import json

from deltavec.checkpointing.checkpoint import delta_offset
from deltavec.runtime.delta_log import parse_commit


def _commit(*actions: dict[str, object]) -> str:
    return "\n".join(json.dumps(action) for action in actions) + "\n"


def _add(rows: int | None, *, data_change: bool = True) -> dict[str, object]:
    stats = json.dumps({"numRecords": rows}) if rows is not None else None
    return {"add": {"path": "part-0.parquet", "dataChange": data_change, "stats": stats}}


def _remove(*, data_change: bool = True) -> dict[str, object]:
    return {"remove": {"path": "part-0.parquet", "dataChange": data_change}}


def _info(millis: int, **extra: object) -> dict[str, object]:
    return {"commitInfo": {"timestamp": millis, "operation": "WRITE", **extra}}


def test_an_append_feeds_both_modes_and_counts_its_rows() -> None:
    commit = parse_commit(4, _commit(_info(1_700_000_000_000), _add(15), _add(15)))
    assert commit.version == 4
    assert commit.added_rows == 30
    assert commit.timestamp == 1_700_000_000.0
    assert commit.feeds("append") and commit.feeds("changes")


def test_optimize_and_property_changes_feed_no_stream() -> None:
    optimize = parse_commit(
        5,
        _commit(_info(1), _add(30, data_change=False), _remove(data_change=False)),
    )
    properties = parse_commit(6, _commit(_info(2), {"metaData": {"id": "x"}}))
    for commit in (optimize, properties):
        assert not commit.feeds("append") and not commit.feeds("changes")


def test_updates_and_deletes_feed_only_the_change_feed() -> None:
    delete = parse_commit(7, _commit(_info(1), _remove()))
    update = parse_commit(8, _commit(_info(1), _remove(), _add(10), {"cdc": {"path": "c"}}))
    for commit in (delete, update):
        # Append mode streams with skipChangeCommits: these commits are skipped.
        assert not commit.feeds("append")
        assert commit.feeds("changes")


def test_rows_are_unknown_when_a_file_has_no_statistics() -> None:
    assert parse_commit(9, _commit(_info(1), _add(10), _add(None))).added_rows is None


def test_in_commit_timestamps_win_and_file_time_is_the_fallback() -> None:
    ict = parse_commit(1, _commit(_info(1_000, inCommitTimestamp=2_000), _add(1)))
    assert ict.timestamp == 2.0
    bare = parse_commit(2, _commit(_add(1)), modified=1234.5)
    assert bare.timestamp == 1234.5


def test_processed_version_of_each_kind_of_offset() -> None:
    # Between versions: everything before reservoirVersion is done.
    assert delta_offset({"reservoirVersion": 8, "index": -1}).processed_through == 7
    # maxFilesPerTrigger cut version 8 short: only 7 is done.
    assert delta_offset({"reservoirVersion": 8, "index": 3}).processed_through == 7
    # Inside the initial snapshot, its files may come from any version: none is done.
    starting = {"reservoirVersion": 8, "index": 3, "isStartingVersion": True}
    assert delta_offset(starting).processed_through == -1
