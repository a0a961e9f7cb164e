"""How an index holds a table: blocks of whole files, each compacted on its own.

A MERGE rewrites whole files, so rows die a file at a time. With the table
held in blocks of whole files, a refresh copies only the block that held a
rewritten file, and the approximate index places only the rows of blocks it
has not seen: the cost of a refresh follows what the commit wrote, not the
table. Real delta-rs tables with synthetic vectors, as in test_index.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from deltavec.search import VectorIndex
from deltavec.search.approximate import IvfView
from deltavec.search.state import Block, IndexState, first_slots
from tests.search.test_approximate_versions import (
    clustered,
    clusters_faiss_gives,
    clusters_of,
    count_placed,
    ids_of,
    recall,
)
from tests.search.test_index import brute_force, merge, table_state, write_target

FILES, FILE_ROWS = 5, 10_000


@pytest.fixture
def five_big_files(tmp_path: Path) -> tuple[Path, np.ndarray]:
    vectors = clustered(FILES * FILE_ROWS, seed=40)
    path = tmp_path / "target"
    for part in np.array_split(np.arange(FILES * FILE_ROWS), FILES):
        write_target(path, part, vectors[part])
    return path, vectors


def block_holding(state: IndexState, key: int) -> Block:
    for block in state.blocks:
        if key in block.keys.column("id").to_pylist():
            return block
    raise AssertionError(f"no block holds {key}")


def test_a_merge_copies_only_the_block_that_held_the_rewritten_file(
    five_big_files: tuple[Path, np.ndarray],
) -> None:
    path, _ = five_big_files
    index = VectorIndex(str(path))
    before = index.view().state
    files_of = [set(b.files.tolist()) for b in before.blocks]
    assert len(before.blocks) > 1  # 50,000 rows are not held as one block
    assert all(a.isdisjoint(b) for i, a in enumerate(files_of) for b in files_of[i + 1 :])
    rewritten = block_holding(before, 5)

    merge(path, np.array([5, FILES * FILE_ROWS]), clustered(2, seed=41))
    index.refresh()
    after = index.view().state

    kept = [b for b in before.blocks if any(b is a for a in after.blocks)]
    assert len(kept) == len(before.blocks) - 1 and all(b is not rewritten for b in kept)
    assert after.dead == 0  # the block that lost a file was written again without it
    ids, now = table_state(path)
    for query in clustered(5, seed=42):
        assert ids_of(index.search(query, k=5)) == brute_force(ids, now, query, 5)

    # OPTIMIZE rewrites every file: no block is kept, and the answers stay right.
    DeltaTable(str(path)).optimize.compact()
    index.refresh()
    optimized = index.view().state
    assert not any(b is a for b in after.blocks for a in optimized.blocks)
    assert len(index) == optimized.slots == FILES * FILE_ROWS + 1
    for query in clustered(5, seed=43):
        assert ids_of(index.search(query, k=5)) == brute_force(ids, now, query, 5)


def test_rows_of_kept_and_compacted_blocks_keep_their_clusters_when_slots_move(
    five_big_files: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = five_big_files
    index = VectorIndex(str(path))
    first = IvfView.build(index.view())
    placed = count_placed(monkeypatch)

    # The first block loses a file and is compacted: the later blocks' slots move.
    moved = clustered(3, seed=44)
    rewritten = first.view.state.blocks[0]
    key = int(rewritten.keys.column("id")[0].as_py())
    keys = [key, key + 1, FILES * FILE_ROWS]  # two updates (one file), one insert
    merge(path, np.array(keys), moved)
    index.refresh()
    view = index.view()
    assert not any(b is rewritten for b in view.state.blocks)
    before, after = first_slots(first.view.state), first_slots(view.state)
    assert any(after.get(block) not in (None, slot) for block, slot in before.items())
    second = first.follow(view)

    assert placed == [3]  # only the new vectors were compared with the centres
    assert clusters_of(second.ivf) == clusters_faiss_gives(second)
    assert second.ivf.index.ntotal == len(index)
    assert [ids_of(h)[0] for h in second.search_many(moved, 1)] == keys
    queries = clustered(100, seed=45)
    found = [ids_of(h) for h in second.search_many(queries, 10)]
    truth = [ids_of(h) for h in view.search_many(queries, 10)]
    assert recall(found, truth) >= 0.9
