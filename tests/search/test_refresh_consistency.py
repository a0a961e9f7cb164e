"""A search never mixes two table versions or two models (issue 16, holes 6 and 7).

Real delta-rs tables with synthetic vectors, as in test_index.py: a query that took
its slots from one version answers from that version; FAISS and the state move
together; a table recreated under another model is refused, not silently loaded.
"""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from deltavec.errors import ModelChangedError, TargetError
from deltavec.search import VectorIndex
from tests.search.test_index import merge, table_state, unit_vectors, write_target


def test_slots_from_one_version_answer_from_that_version_after_a_refresh(
    tmp_path: Path,
) -> None:
    path = tmp_path / "target"
    vectors = unit_vectors(300, seed=30)
    write_target(path, np.arange(300), vectors)
    index = VectorIndex(str(path))
    wanted = np.arange(200, 300)
    rows = index.slots_of(pa.table({"id": pa.array(wanted, pa.int64())}))
    # Another thread refreshes between the filter and the search: each MERGE
    # rewrites the one file, a delete drops rows before the wanted ones, and
    # compaction renumbers the slots.
    for round_ in range(4):
        merge(path, np.arange(round_ * 10, round_ * 10 + 10), unit_vectors(10, 40 + round_))
        index.refresh()
    DeltaTable(str(path)).delete("id < 60")
    index.refresh()

    for query in unit_vectors(10, seed=31):
        hits = index.search(query, k=5, rows=rows)
        scores = vectors[wanted] @ query
        assert [h.key["id"] for h in hits] == [int(wanted[i]) for i in np.argsort(-scores)[:5]]


def test_approximate_searches_during_refresh_never_see_slots_of_another_state(
    tmp_path: Path,
) -> None:
    path = tmp_path / "target"
    write_target(path, np.arange(4000), unit_vectors(4000, seed=32))
    index = VectorIndex(str(path))
    index.use_approximate(nlist=16, nprobe=16)
    added = unit_vectors(200, seed=33)
    errors: list[BaseException] = []
    stop = threading.Event()

    def keep_searching() -> None:
        while not stop.is_set():
            for vector in added[::10]:
                try:
                    index.search(vector, k=3)
                except Exception as exc:  # noqa: BLE001 (the failure under test, asserted below)
                    errors.append(exc)
                    return

    # Switch threads every microsecond so a search lands between FAISS's update
    # and the state swap if there is any gap between them.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        searcher = threading.Thread(target=keep_searching)
        searcher.start()
        for round_ in range(20):
            ids = np.arange(10_000 + round_ * 10, 10_000 + round_ * 10 + 10)
            write_target(path, ids, added[round_ * 10 : round_ * 10 + 10])
            index.refresh()
        stop.set()
        searcher.join()
    finally:
        sys.setswitchinterval(interval)

    assert errors == []
    assert [index.search(v, 1)[0].key["id"] for v in added[:3]] == [10_000, 10_001, 10_002]


def test_a_table_recreated_under_another_model_is_refused_and_the_old_one_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "target"
    vectors = unit_vectors(100, seed=34)
    write_target(path, np.arange(100), vectors)
    index = VectorIndex(str(path))
    # What a reembed does: the path now holds another table, of another model's
    # vectors (its first commit after the index's version carries the new metadata).
    shutil.rmtree(path)
    write_target(path, np.arange(300), unit_vectors(300, seed=35), model="other/model@ff")
    DeltaTable(str(path)).alter.set_table_properties(
        {"deltavec.note": "reembedded"}, raise_if_not_exists=False
    )

    with pytest.raises(ModelChangedError, match="switched models") as raised:
        index.refresh()

    assert isinstance(raised.value, TargetError) and "\n" not in str(raised.value)
    assert raised.value.identity == "other/model@ff"
    assert (index.model_identity, len(index)) == ("test/model@0123456789abcdef", 100)
    assert index.search(vectors[7], k=1)[0].key == {"id": 7}
    assert VectorIndex(str(path)).model_identity == "other/model@ff"


def test_a_model_property_changed_in_place_is_refused_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "target"
    write_target(path, np.arange(50), unit_vectors(50, seed=36))
    index = VectorIndex(str(path))
    DeltaTable(str(path)).alter.set_table_properties(
        {"deltavec.model": "other/model@ff"}, raise_if_not_exists=False
    )

    with pytest.raises(ModelChangedError, match="switched models"):
        index.refresh()
    ids, _ = table_state(path)
    assert len(index) == len(ids) == 50
