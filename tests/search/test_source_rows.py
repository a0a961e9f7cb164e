"""Hit rows read from the source: by an IN predicate for a few keys, by a scan for many."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from deltavec.search.source_table import rows_for


def test_rows_for_more_keys_than_a_predicate_holds_returns_every_row(tmp_path: Path) -> None:
    ids = list(range(3000))
    write_deltalake(
        str(tmp_path / "source"),
        pa.table({"id": pa.array(ids, pa.int64()), "title": [f"title {i}" for i in ids]}),
    )
    source = DeltaTable(str(tmp_path / "source"))
    wanted = pa.table({"id": pa.array(ids[::2], pa.int64())})  # 1,500 keys: the scan path

    found = rows_for(source, wanted, ["title"])

    assert len(found) == 1500
    assert found[(42,)] == {"id": 42, "title": "title 42"}
    assert (43,) not in found
