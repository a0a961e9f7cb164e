"""The server's approximate index: one ``IvfView`` per index version, never changed.

Vectors are clustered like real embeddings (uniform random ones have no
neighbours to find). Each test checks what a search client sees: the rows of
the version it asked, recall against exact search, and filters that only ever
return their own rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from deltavec.search import VectorIndex
from deltavec.search.approximate import IvfIndex, IvfView
from deltavec.search.index import Hit
from deltavec.search.state import vectors_at
from tests.search.test_index import merge, unit_vectors, write_target

DIM = 32
ROWS = 6_000


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit_vectors(40, seed=1, dim=DIM)
    noisy = centres[rng.integers(0, 40, n)] + 0.3 * unit_vectors(n, seed=seed + 1, dim=DIM)
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def target(tmp_path: Path) -> tuple[Path, np.ndarray]:
    vectors = clustered(ROWS, seed=2)
    path = tmp_path / "target"
    for part in np.array_split(np.arange(ROWS), 3):  # three files
        write_target(path, part, vectors[part])
    return path, vectors


def ids_of(hits: list[Hit]) -> list[int]:
    return [h.key["id"] for h in hits]


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    shares = [len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(shares))


def test_a_refresh_makes_a_new_index_and_leaves_the_old_versions_alone(
    target: tuple[Path, np.ndarray],
) -> None:
    path, vectors = target
    index = VectorIndex(str(path))
    before = IvfView.build(index.view())

    moved = clustered(3, seed=7)
    merge(path, np.array([7, 8, ROWS + 1]), moved)  # two updates, one insert
    DeltaTable(str(path)).delete("id = 5")
    index.refresh()
    after = before.follow(index.view())

    # The old version still answers with its own rows: 5 and 7's old vector...
    assert ids_of(before.search_many(vectors[[5, 7]], 1)[0]) == [5]
    assert ids_of(before.search_many(vectors[[7]], 1)[0]) == [7]
    assert ROWS + 1 not in ids_of(before.search_many(moved[[2]], 10)[0])
    # ...and the new one with the new rows only.
    assert [ids_of(h)[0] for h in after.search_many(moved, 1)] == [7, 8, ROWS + 1]
    assert 5 not in ids_of(after.search_many(vectors[[5]], 50)[0])
    assert after.ivf.index.ntotal == len(index) == ROWS
    assert after.version == index.version > before.version

    queries = clustered(100, seed=9)
    found = [ids_of(h) for h in after.search_many(queries, 10)]
    truth = [ids_of(h) for h in index.view().search_many(queries, 10)]
    assert recall(found, truth) >= 0.9


def test_after_compaction_the_next_index_holds_the_rows_under_their_new_slots(
    target: tuple[Path, np.ndarray],
) -> None:
    path, vectors = target
    index = VectorIndex(str(path))
    first = IvfView.build(index.view())
    DeltaTable(str(path)).delete(f"id < {ROWS // 2}")  # half the rows: compacted
    index.refresh()
    view = index.view()
    assert view.state.dead == 0  # compacted: the rows left are under new slots
    after = first.follow(view)

    assert after.ivf.index.ntotal == ROWS // 2
    kept = np.arange(ROWS // 2, ROWS, 97)
    assert [ids_of(h)[0] for h in after.search_many(vectors[kept], 1)] == kept.tolist()


def test_filters_return_only_their_rows_and_fall_back_to_exact_when_clusters_hold_too_few(
    target: tuple[Path, np.ndarray],
) -> None:
    path, vectors = target
    index = VectorIndex(str(path))
    view = index.view()
    ann = IvfView.build(view)
    queries = vectors[:3]
    ids = np.arange(ROWS)

    def exact(allowed: np.ndarray) -> list[list[int]]:
        rows = view.slots_of(_keys(ids[allowed]))
        return [ids_of(h) for h in view.search_many(queries, 10, rows=[rows] * len(queries))]

    def approximate(allowed: np.ndarray) -> list[list[int]]:
        rows = view.slots_of(_keys(ids[allowed]))
        return [ids_of(h) for h in ann.search_many(queries, 10, rows=[rows] * len(queries))]

    # Few rows: ranked exactly over them.
    narrow = ids % 200 == 3
    assert approximate(narrow) == exact(narrow)
    # Many rows: approximately, never a row outside the filter.
    wide = ids % 2 == 0
    found = approximate(wide)
    assert all(wide[hits].all() for hits in found)
    assert recall(found, exact(wide)) >= 0.9
    # Many rows, none in the clusters the queries probe: too few found, so exact.
    quantizer = ann.ivf.index.quantizer
    _, probed = quantizer.search(queries, ann.ivf.nprobe)
    _, home = quantizer.search(vectors, 1)
    far = ~np.isin(home[:, 0], probed)
    assert far.sum() > 2 * ann.ivf.scanned(ROWS)  # wide enough to be searched approximately
    assert approximate(far) == exact(far)
    # Filtered and plain queries in one batch each get their own answer.
    rows = view.slots_of(_keys(ids[narrow]))
    mixed = ann.search_many(queries[:2], 10, rows=[rows, None])
    assert ids_of(mixed[0]) == exact(narrow)[0]
    assert ids_of(mixed[1])[0] == 1  # the row whose vector it is


def test_slots_of_another_version_are_refused(target: tuple[Path, np.ndarray]) -> None:
    path, vectors = target
    index = VectorIndex(str(path))
    old = index.view()
    ann = IvfView.build(old)
    merge(path, np.array([1]), clustered(1, seed=3))
    index.refresh()
    newer_rows = index.view().slots_of(_keys(np.array([1, 2])))
    with pytest.raises(ValueError, match="another version"):
        ann.search_many(vectors[:1], 10, rows=[newer_rows])


def test_rows_that_come_back_unchanged_keep_their_clusters_and_only_changed_rows_are_placed(
    target: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = target
    index = VectorIndex(str(path))
    first = IvfView.build(index.view())
    placed = count_placed(monkeypatch)

    # Two updates and an insert: the MERGE rewrites the 2,000-row file of 7 and 8.
    merge(path, np.array([7, 8, ROWS + 1]), clustered(3, seed=7))
    index.refresh()
    second = first.follow(index.view())
    assert placed == [3]  # the rewritten file's other 1,998 rows kept their clusters
    assert clusters_of(second.ivf) == clusters_faiss_gives(second)

    DeltaTable(str(path)).delete(f"id < {ROWS // 2}")  # half the rows: compacted
    index.refresh()
    assert index.view().state.dead == 0  # the rows left were copied under new slots
    third = second.follow(index.view())
    assert placed == [3]  # all of them back in their clusters, none placed again
    assert clusters_of(third.ivf) == clusters_faiss_gives(third)
    assert third.ivf.index.ntotal == len(index)


def count_placed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the rows an index compares with every cluster centre, one entry per call."""
    placed: list[int] = []
    assign = IvfIndex.assign

    def counted(self: IvfIndex, x: np.ndarray) -> np.ndarray:
        placed.append(len(x))
        return assign(self, x)

    monkeypatch.setattr(IvfIndex, "assign", counted)
    return placed


def clusters_of(ivf: IvfIndex) -> dict[int, int]:
    """Slot -> the cluster whose inverted list holds it."""
    import faiss

    lists = ivf.index.invlists
    out: dict[int, int] = {}
    for number in range(ivf.index.nlist):
        size = lists.list_size(number)
        if size:
            ids = faiss.rev_swig_ptr(lists.get_ids(number), size)
            out.update(dict.fromkeys(ids.tolist(), number))
    return out


def clusters_faiss_gives(view: IvfView) -> dict[int, int]:
    """Where FAISS's own ``add_with_ids`` puts the view's live rows, with the same centres."""
    import faiss

    fresh = faiss.clone_index(view.ivf.index)
    fresh.reset()
    slots = np.flatnonzero(view.view.state.live)
    fresh.add_with_ids(vectors_at(view.view.state, slots), slots)
    return clusters_of(IvfIndex(fresh, view.ivf.nprobe))


def _keys(ids: np.ndarray) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64())})
