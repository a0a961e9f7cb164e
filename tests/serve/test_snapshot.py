"""A filter's rows are computed once per source version, and ready before a refresh swaps."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deltalake import DeltaTable

import deltavec.serve.snapshot as snapshot_module
from deltavec.embed.onnx_queries import OnnxUnavailable
from deltavec.errors import SearchError
from deltavec.search.semantic import open_search
from deltavec.serve.snapshot import ServedTarget
from tests.embed.onnx_faults import drift_onnx_sessions
from tests.serve.targets import (
    render,
    sha256_hex,
    source_table,
    target_table,
    write_source,
    write_target,
)

WHERE = "year >= 2020"


@pytest.fixture(scope="module")
def identity(model_path: str) -> str:
    from deltavec.embed.models import model_identity

    return model_identity("default", model_path)


def _tables(
    tmp_path: Path, rows: list[dict[str, Any]], encoder: Any, identity: str
) -> tuple[Path, Path]:
    """A source of ``rows`` and a target holding their vectors."""
    source, target = tmp_path / "source", tmp_path / "target"
    write_source(source, rows)
    write_target(target, rows, encoder, identity, source=source)
    return source, target


@pytest.fixture
def served(tmp_path: Path, encoder: Any, identity: str) -> ServedTarget:
    rows = [
        {"id": i, "title": f"Item {i}", "body": f"text number {i}", "year": 2010 + i}
        for i in range(16)
    ]
    _, target = _tables(tmp_path, rows, encoder, identity)
    return ServedTarget(lambda: open_search(str(target)))


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the source scans a filter costs (each ``matching_keys`` call)."""
    calls: list[str] = []
    scan = snapshot_module.matching_keys

    def counted(source: Any, names: list[str], where: str) -> Any:
        calls.append(where)
        time.sleep(0.05)  # a scan takes a while: concurrent callers overlap it
        return scan(source, names, where)

    monkeypatch.setattr(snapshot_module, "matching_keys", counted)
    return calls


def keys_of(snapshot: Any, slots: Any) -> list[int]:
    return sorted(snapshot.view.state.keys().take(slots.slots).column("id").to_pylist())


def test_concurrent_queries_with_one_new_filter_scan_the_source_once(
    served: ServedTarget, scans: list[str]
) -> None:
    snapshot = served.current
    start = threading.Barrier(8)

    def ask(_: int) -> Any:
        start.wait()
        return snapshot.slots_where(WHERE)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))

    assert scans == [WHERE]
    assert all(a is answers[0] for a in answers)
    assert keys_of(snapshot, answers[0]) == list(range(10, 16))


def test_a_bad_filter_fails_every_caller_and_is_not_remembered(
    served: ServedTarget, scans: list[str]
) -> None:
    snapshot = served.current
    with ThreadPoolExecutor(4) as pool:
        failures = [pool.submit(snapshot.slots_where, "colour = 'red'") for _ in range(4)]
        for failure in failures:
            with pytest.raises(SearchError, match="colour"):
                failure.result(timeout=30)
    with pytest.raises(SearchError, match="colour"):
        snapshot.slots_where("colour = 'red'")
    assert len(scans) >= 2  # asked again after the failure, not answered from a cache


def test_after_a_refresh_an_answered_filter_is_ready_with_the_new_rows(
    served: ServedTarget, scans: list[str], tmp_path: Path, encoder: Any, identity: str
) -> None:
    before = served.current
    keys_of(before, before.slots_where(WHERE))
    before.keyword_keys(before.slots_where(WHERE))
    new_rows = [
        {"id": 100, "title": "New", "body": "a recent row", "year": 2025},
        {"id": 101, "title": "Old", "body": "an old row", "year": 2001},
    ]
    write_source(tmp_path / "source", new_rows)
    write_target(tmp_path / "target", new_rows, encoder, identity, source=tmp_path / "source")

    outcome = served.refresh()
    after = served.current
    scans.clear()
    rows = after.slots_where(WHERE)
    keyword_keys = after.keyword_keys(rows)

    assert outcome.changed and after is not before
    assert scans == []  # prepared by the refresh, before the swap
    assert keys_of(after, rows) == [*range(10, 16), 100]
    assert sorted(keyword_keys) == sorted(f"[{i}]" for i in [*range(10, 16), 100])


def test_the_approximate_index_is_built_after_the_first_snapshot_and_follows_refreshes(
    tmp_path: Path, encoder: Any, identity: str
) -> None:
    rows = [
        {"id": i, "title": f"Item {i}", "body": f"text number {i}", "year": 2010 + i}
        for i in range(16)
    ]
    source, target = tmp_path / "source", tmp_path / "target"
    write_source(source, rows)
    vectors = write_target(target, rows, encoder, identity, source=source)
    served = ServedTarget(lambda: open_search(str(target)), index="approximate")

    first = served.current
    assert first.approximate is None and first.ranker is first.view  # ready, ranked exactly
    assert served.complete()
    completed = served.current
    assert completed.view is first.view and completed.approximate is not None
    assert completed.approximate.version == completed.version
    assert first.approximate is None  # the published snapshot was not changed
    assert not served.complete()  # nothing left to add

    def top(snapshot: Any, query: Any) -> int:
        return int(snapshot.ranker.search_many(query.reshape(1, -1), 1)[0][0].key["id"])

    assert [top(completed, v) for v in vectors] == list(range(16))
    write_target(target, [{**rows[3], "id": 300}], encoder, identity, source=source)
    served.refresh()
    after = served.current
    assert after.approximate is not None and after.approximate.version == after.version
    assert after.approximate.ivf.index.ntotal == 17
    assert completed.approximate.ivf.index.ntotal == 16  # the older version kept its rows


def test_a_failed_approximate_build_keeps_the_server_following_the_table_exactly(
    tmp_path: Path, encoder: Any, identity: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltavec.search.approximate import IvfView

    rows = [{"id": i, "title": f"Item {i}", "body": f"text {i}", "year": 2020} for i in range(8)]
    source, target = _tables(tmp_path, rows, encoder, identity)
    served = ServedTarget(lambda: open_search(str(target)), index="approximate")
    build = IvfView.build

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("no room for a second copy of the vectors")

    monkeypatch.setattr(IvfView, "build", fail)
    assert not served.complete()
    new = {"id": 50, "title": "Fresh", "body": "a new row", "year": 2024}
    vectors = write_target(target, [new], encoder, identity, source=source)
    outcome = served.refresh()

    current = served.current
    assert outcome.changed and current.approximate is None  # followed, ranked exactly
    hits = current.ranker.search_many(vectors, 1)
    assert hits[0][0].key == {"id": 50}
    monkeypatch.setattr(IvfView, "build", build)
    served.refresh()  # nothing new: the build is tried again
    assert served.current.approximate is not None


def test_query_vectors_come_from_onnx_only_when_its_export_gives_torchs(
    tmp_path: Path, encoder: Any, identity: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"id": i, "title": f"Item {i}", "body": f"text {i}", "year": 2020} for i in range(4)]
    _, target = _tables(tmp_path, rows, encoder, identity)

    def served(**options: Any) -> ServedTarget:
        return ServedTarget(lambda: open_search(str(target)), **options)

    fast, plain = served(), served(query_runtime="torch")
    assert fast.current.search.encoder.runtime == "onnx"  # auto
    assert plain.current.search.encoder.runtime == "torch"
    texts = ["Item 3", "a query about text"]
    np.testing.assert_allclose(
        fast.current.embed(texts), plain.current.embed(texts), rtol=0, atol=1e-6
    )
    # A graph whose vectors are off: auto keeps torch; "onnx" does not start.
    drift_onnx_sessions(monkeypatch)
    assert served().current.search.encoder.runtime == "torch"
    with pytest.raises(OnnxUnavailable, match="differ from torch's"):
        served(query_runtime="onnx")


def _rows(ids: range) -> list[dict[str, Any]]:
    return [
        {"id": i, "title": f"Part {i}", "body": f"stocked under code{i}q", "year": 2010 + i}
        for i in ids
    ]


def _merge(path: Path, data: Any) -> None:
    """An upsert by id, as the job's MERGE does: it rewrites each file it touches whole."""
    (
        DeltaTable(str(path))
        .merge(data, "t.id = s.id", source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )


def _found(served: ServedTarget, word: str) -> list[str]:
    keywords = served.current.keywords
    assert keywords is not None
    return [hit.key for hit in keywords.search(word, 10)]


@pytest.fixture
def source_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The keys whose source rows the keyword index reads, in order (each ``rows_for`` call)."""
    keys: list[int] = []
    read = snapshot_module.rows_for

    def counted(source: Any, wanted: Any, columns: list[str]) -> Any:
        keys.extend(wanted.column("id").to_pylist())
        return read(source, wanted, columns)

    monkeypatch.setattr(snapshot_module, "rows_for", counted)
    return keys


def _md5_hex(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


@pytest.mark.parametrize(
    "text_hash",
    [sha256_hex, None, _md5_hex],
    ids=["job-text-hashes", "no-text-hashes", "other-digests"],
)
def test_rewritten_files_cost_the_keyword_index_only_the_rows_whose_text_changed(
    tmp_path: Path,
    encoder: Any,
    identity: str,
    source_reads: list[int],
    text_hash: Callable[[str], str] | None,
) -> None:
    # Only the job's digests say which rows have new text; without them (or
    # with digests it does not write) the keyword index reads every rewritten row.
    hashed = text_hash is sha256_hex
    source, target = tmp_path / "source", tmp_path / "target"
    write_source(source, _rows(range(16)))
    write_target(target, _rows(range(16)), encoder, identity, source=source, text_hash=text_hash)
    served = ServedTarget(lambda: open_search(str(target)), index="exact")
    source_reads.clear()

    # One row's text changes; the MERGE rewrites the file holding all 16.
    changed = [{**_rows(range(3, 4))[0], "body": "now listed as code3renamed"}]
    _merge(source, source_table(changed))
    vectors, _ = encoder.encode([render(changed[0])])
    _merge(target, target_table(changed, np.asarray(vectors), identity, text_hash=text_hash))
    outcome = served.refresh()

    assert outcome.changed
    # With the job's text hashes only the changed row is read; without, the whole file.
    assert sorted(source_reads) == ([3] if hashed else list(range(16)))
    assert _found(served, "code3renamed") == ["[3]"]
    assert _found(served, "code3q") == []
    assert _found(served, "code5q") == ["[5]"]

    # OPTIMIZE rewrites every row, changing no text.
    write_source(source, _rows(range(16, 18)))
    write_target(
        target, _rows(range(16, 18)), encoder, identity, source=source, text_hash=text_hash
    )
    served.refresh()
    source_reads.clear()
    DeltaTable(str(target)).optimize.compact()
    outcome = served.refresh()

    assert outcome.changed
    assert sorted(source_reads) == ([] if hashed else list(range(18)))
    assert [_found(served, f"code{i}q") for i in (0, 5, 17)] == [["[0]"], ["[5]"], ["[17]"]]
    assert _found(served, "code3renamed") == ["[3]"]


def test_a_row_missing_from_the_source_gets_its_document_once_the_source_has_it_again(
    tmp_path: Path, encoder: Any, identity: str
) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    write_source(source, _rows(range(16)))
    write_target(target, _rows(range(16)), encoder, identity, source=source)
    # Deleted at the source and written back unchanged before the job ran: the
    # target never changes, but the server started in between.
    DeltaTable(str(source)).delete("id = 7")
    served = ServedTarget(lambda: open_search(str(target)), index="exact")
    assert _found(served, "code7q") == []

    write_source(source, _rows(range(7, 8)))
    served.refresh()

    assert _found(served, "code7q") == ["[7]"]
    assert _found(served, "code8q") == ["[8]"]
