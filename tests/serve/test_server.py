"""``deltavec serve`` end to end: a real server on a loopback port, a real HTTP client.

Tables are written with delta-rs and hold the default model's real vectors, so
each test starts a server in about a second; tests/serve/test_serve_job.py runs
the server against the real job.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from deltalake import DeltaTable

from deltavec.errors import ConfigError
from deltavec.search import open_search
from deltavec.serve import ServeOptions, start
from tests.scrape import Scrape
from tests.serve.targets import render, serving, wait_until, write_source, write_target

# The identifier appears in one row only. For the vector model it looks like the
# decoys' (same word pieces), so vector search ranks the decoys first; for BM25
# it is one rare token, which only that row holds.
RARE_ROW = {
    "id": 4,
    "title": "Coolant line gasket",
    "body": "A spare gasket for the older compressor, reordered last spring as ZQ7731 "
    "after the leak",
    "year": 2024,
}
DECOYS = [
    {"id": i, "title": f"Part {code}", "body": "gasket", "year": 2018 + i}
    for i, code in enumerate(["ZQ7713", "ZQ7371", "ZQ1773", "QZ7731"])
]


@pytest.fixture(scope="module")
def identity(model_path: str) -> str:
    from deltavec.embed.models import model_identity

    return model_identity("default", model_path)


@pytest.fixture
def tables(
    tmp_path: Path, encoder: Any, identity: str, sts_pairs: list[tuple[float, str, str]]
) -> tuple[Path, Path, list[dict[str, Any]]]:
    """A source of 200 rows (decoys, the rare row, STS sentences) and its target."""
    sentences = list(dict.fromkeys(s2 for _, _, s2 in sts_pairs))[:195]
    rows = [*DECOYS, RARE_ROW]
    rows += [
        {"id": 100 + i, "title": s.split(" ")[0], "body": s, "year": 2010 + i % 15}
        for i, s in enumerate(sentences)
    ]
    source, target = tmp_path / "source", tmp_path / "target"
    write_source(source, rows)
    write_target(target, rows, encoder, identity, source=source)
    return source, target, rows


def ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [hit["key"]["id"] for hit in response.json()["hits"]]


# A target this small is served exactly by default; "approximate" forces the
# FAISS path (with so few rows every cluster is probed: the same answers).
@pytest.mark.parametrize("index", ["auto", "approximate"])
def test_search_modes_filters_and_columns(
    tables: tuple[Path, Path, list[dict[str, Any]]], index: str
) -> None:
    _, target, rows = tables
    search = open_search(str(target))
    keys, vectors = search.index.rows()
    all_ids = keys.column("id").to_numpy()
    by_id = {r["id"]: r for r in rows}
    query = render(rows[50])  # the row's own text: it scores ~1 with itself

    with serving(target, index=index) as (_, client):
        if index == "approximate":  # built after the server is ready, then swapped in
            wait_until(lambda: client.get("/healthz").json()["index"] == "approximate", seconds=30)
        served_by = client.get("/healthz").json()["index"]
        plain = client.post("/search", json={"query": query, "k": 5})
        filtered = client.post(
            "/search",
            json={"query": query, "k": 5, "where": "year >= 2020", "columns": ["title", "year"]},
        )
        keyword = client.post("/search", json={"query": query, "k": 5, "mode": "keyword"})
        hybrid = client.post("/search", json={"query": query, "k": 5, "mode": "hybrid"})

    assert served_by == ("exact" if index == "auto" else "approximate")
    expected = all_ids[np.argsort(-(vectors @ search.embed(query)), kind="stable")[:5]].tolist()
    assert ids(plain) == expected
    body = plain.json()
    assert (body["version"], body["mode"], body["model"]) == (
        1,
        "vector",
        search.index.model_identity,
    )
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # the row's own text
    allowed = np.array([by_id[int(i)]["year"] >= 2020 for i in all_ids])
    scores = vectors[allowed] @ search.embed(query)
    assert ids(filtered) == all_ids[allowed][np.argsort(-scores, kind="stable")[:5]].tolist()
    for hit in filtered.json()["hits"]:
        row = by_id[hit["key"]["id"]]
        assert hit["source"] == {"title": row["title"], "year": row["year"]}
    assert ids(keyword)[0] == ids(hybrid)[0] == rows[50]["id"]
    assert all("vector_rank" in h and "keyword_rank" in h for h in hybrid.json()["hits"])


@pytest.mark.parametrize("index", ["auto", "approximate"])
def test_a_rare_identifier_is_found_by_hybrid_not_vector_and_deletes_leave_both_rankings(
    tables: tuple[Path, Path, list[dict[str, Any]]], index: str
) -> None:
    source, target, _ = tables
    with serving(target, refresh_seconds=0.2, index=index) as (_, client):
        if index == "approximate":
            wait_until(lambda: client.get("/healthz").json()["index"] == "approximate", seconds=30)
        ask = {"query": "ZQ7731", "k": 10}
        vector = ids(client.post("/search", json=ask))
        keyword = ids(client.post("/search", json={**ask, "mode": "keyword"}))
        hybrid = ids(client.post("/search", json={**ask, "mode": "hybrid"}))
        assert vector[0] != 4 and 4 in vector  # ranked, but below look-alikes
        assert keyword == [4]  # the one row holding the token
        assert hybrid[0] == 4
        # A filter applies to the keyword ranking too, the second time as the first.
        for _ in range(2):
            kept = {**ask, "mode": "keyword", "where": "year >= 2020"}
            assert ids(client.post("/search", json=kept)) == [4]
            assert ids(client.post("/search", json={**kept, "where": "year < 2020"})) == []
            assert ids(client.post("/search", json={**kept, "mode": "hybrid"}))[0] == 4

        # The job deletes the row's vector when the source row goes.
        DeltaTable(str(source)).delete("id = 4")
        DeltaTable(str(target)).delete("id = 4")
        wait_until(lambda: client.get("/healthz").json()["version"] == 2, seconds=10)
        assert 4 not in ids(client.post("/search", json=ask))
        assert ids(client.post("/search", json={**ask, "mode": "keyword"})) == []
        assert 4 not in ids(client.post("/search", json={**ask, "mode": "hybrid"}))


def test_embeddings_equal_open_search_embed(
    tables: tuple[Path, Path, list[dict[str, Any]]],
) -> None:
    _, target, _ = tables
    texts = ["a gasket for the compressor", "ZQ7731", "The cat sat on the mat."]
    search = open_search(str(target))
    expected = np.stack([search.embed(t) for t in texts])

    with serving(target) as (_, client):
        openai = client.post("/v1/embeddings", json={"input": texts, "model": "anything"})
        packed = client.post(
            "/v1/embeddings", json={"input": texts[1], "encoding_format": "base64"}
        )
        ours = client.post("/embed", json={"texts": texts})

    assert openai.status_code == 200, openai.text
    body = openai.json()
    assert (body["object"], body["model"], len(body["data"])) == ("list", "anything", 3)
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    # Usage counts what the model read: the query prompt, the text, special tokens.
    read = sum(
        map(len, search.encoder.tokenizer([search.query_prompt + t for t in texts])["input_ids"])
    )
    assert read > 3 * 2  # at least [CLS] and [SEP] around each text
    assert body["usage"] == {"prompt_tokens": read, "total_tokens": read}
    # The server embeds concurrent texts in one batch (one torch thread): the same
    # vectors up to float32 rounding of the reordered sums.
    same = {"rtol": 0, "atol": 1e-6}
    np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), expected, **same)
    decoded = np.frombuffer(base64.b64decode(packed.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, expected[1], **same)
    np.testing.assert_allclose(np.array(ours.json()["vectors"]), expected, **same)
    assert ours.json()["dim"] == expected.shape[1]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/search", {"query": "   "}, 422, "query: the query is empty"),
        ("/search", {"query": "x", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ("/search", {"query": "x", "k": 101}, 422, "k: must be at most 100 (got 101)"),
        ("/search", {"query": "x", "mode": "fuzzy"}, 422, "mode: Input should be 'vector'"),
        ("/search", {"query": "x", "top_k": 3}, 422, "top_k: Extra inputs are not permitted"),
        ("/search", {"query": "x", "where": "year >>= 3"}, 400, "filter 'year >>= 3' fails"),
        ("/search", {"query": "x", "where": "yeer > 1"}, 400, "yeer"),
        ("/search", {"query": "x", "where": "__import__('os').getcwd()"}, 400, "fails on source"),
        ("/search", {"query": "x", "columns": ["nope"]}, 400, "unknown column(s) nope; the source"),
        ("/search", {"query": "x" * 5000}, 422, "query: String should have at most 4000"),
        ("/embed", {"texts": ["a"] * 257}, 413, "at most 256 texts per request (got 257)"),
        ("/embed", {"texts": []}, 422, "texts: List should have at least 1 item"),
        ("/v1/embeddings", {"input": [1, 2]}, 422, "input"),
        ("/search", "not json", 422, "the request body is not valid JSON"),
        ("/search", {"query": "y" * 2_000_000}, 413, "the request body is over 1048576 bytes"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_one_line_reason(
    served: httpx.Client, path: str, body: Any, status: int, message: str
) -> None:
    if isinstance(body, str):
        response = served.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = served.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, encoder: Any, identity: str) -> Any:
    """One server for the bad-request cases (they change nothing)."""
    root = tmp_path_factory.mktemp("served")
    rows = [{"id": 1, "title": "t", "body": "b", "year": 2020}]
    write_source(root / "source", rows)
    write_target(root / "target", rows, encoder, identity, source=root / "source")
    with serving(root / "target") as (_, client):
        yield client


def test_healthz_and_metrics(
    tables: tuple[Path, Path, list[dict[str, Any]]], encoder: Any, identity: str
) -> None:
    source, target, _ = tables
    with serving(target, refresh_seconds=0.2) as (_, client):
        health = client.get("/healthz").json()
        assert health == {
            "status": "ok",
            "version": 1,
            "rows": 200,
            "model": identity,
            "keyword_index": True,
            "index": "exact",  # auto: fewer rows than an approximate index pays off for
            "query_runtime": "onnx",  # auto: its export gave torch's vectors
        }
        for _ in range(3):
            client.post("/search", json={"query": "gasket"})
        client.post("/search", json={"query": ""})
        new = [{"id": 900, "title": "New", "body": "a brand new row", "year": 2025}]
        write_source(source, new)
        write_target(target, new, encoder, identity, source=source)
        wait_until(lambda: client.get("/healthz").json()["rows"] == 201, seconds=10)
        metrics = scraped(client.get("/metrics").text)
    value = metrics.value

    assert value("deltavec_serve_requests_total", endpoint="/search", status="200") == 3
    assert value("deltavec_serve_requests_total", endpoint="/search", status="422") == 1
    assert value("deltavec_serve_request_seconds_count", endpoint="/search", status="200") == 3
    assert value("deltavec_serve_index_rows") == 201
    assert value("deltavec_serve_keyword_documents") == 201
    assert value("deltavec_serve_table_version") == 2
    assert value("deltavec_serve_refreshes_total", outcome="applied") >= 1
    assert value("deltavec_serve_refresh_seconds_count") >= 1
    assert 0 <= value("deltavec_serve_seconds_behind") < 5


def scraped(text: str) -> Scrape:
    import time

    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return Scrape(samples, set(), time.time())


def test_a_token_is_required_off_loopback_and_checked_when_set(
    tables: tuple[Path, Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, target, _ = tables
    monkeypatch.delenv("DELTAVEC_SERVE_TOKEN", raising=False)
    with pytest.raises(
        ConfigError, match=r"serving on 0\.0\.0\.0 needs a bearer token: set DELTAVEC"
    ):
        start(ServeOptions(table=str(target), host="0.0.0.0", port=0))

    monkeypatch.setenv("DELTAVEC_SERVE_TOKEN", "s3cret-token")
    with serving(target) as (_, client):
        assert client.post("/search", json={"query": "x"}).status_code == 401
        assert client.get("/metrics").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.post("/search", json={"query": "x"}, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret-token"}
        assert client.post("/search", json={"query": "x"}, headers=right).status_code == 200
        assert client.get("/docs").status_code == 200  # the API description stays open


def test_a_model_change_is_picked_up_without_mixing_models(
    tables: tuple[Path, Path, list[dict[str, Any]]], tmp_path: Path, model_path: str
) -> None:
    from deltavec.embed.encoder import EncoderSpec
    from deltavec.embed.models import model_identity
    from deltavec.embed.udf import get_encoder
    from tests.other_model import truncated_model

    source, target, rows = tables
    other = str(truncated_model(model_path, tmp_path / "other"))
    other_identity = model_identity(other, other)
    other_encoder = get_encoder(EncoderSpec(model=other, device="cpu"))
    query = render(rows[60])
    with serving(target, refresh_seconds=0.2) as (_, client):
        before = client.post("/embed", json={"texts": [query]}).json()
        # What a reembed leaves: the path holds a new table of the other model's vectors.
        shutil.rmtree(target)
        write_target(target, rows, other_encoder, other_identity, source=source, model_name=other)
        DeltaTable(str(target)).alter.set_table_properties(
            {"deltavec.reembedded": "yes"}, raise_if_not_exists=False
        )
        answers = []

        def switched() -> bool:
            response = client.post("/search", json={"query": query, "k": 1})
            answers.append(response)
            return response.json()["model"] == other_identity

        wait_until(switched, seconds=30)
        after = client.post("/embed", json={"texts": [query]}).json()

    assert all(a.status_code == 200 for a in answers)
    # Every answer, before and after the switch, found the row by its own text:
    # a query vector of one model against the other's rows would not score ~1.
    assert all(a.json()["hits"][0]["key"]["id"] == rows[60]["id"] for a in answers)
    assert all(a.json()["hits"][0]["score"] > 0.999 for a in answers)
    assert before["model"] != after["model"] == other_identity
    expected, _ = other_encoder.encode([query])
    np.testing.assert_allclose(np.array(after["vectors"][0]), expected[0], atol=1e-6)


def test_with_what_it_loaded_frozen_the_server_still_frees_old_snapshots_and_models(
    tables: tuple[Path, Path, list[dict[str, Any]]],
    tmp_path: Path,
    model_path: str,
    encoder: Any,
    identity: str,
) -> None:
    """``deltavec serve`` freezes what it has loaded out of full garbage collections
    (``deltavec.serve.collector``); what a refresh or a model change replaces must
    still be freed, or a server running for months would grow with every one."""
    import gc
    import weakref

    from deltavec.embed.encoder import EncoderSpec
    from deltavec.embed.models import model_identity
    from deltavec.embed.udf import get_encoder
    from tests.other_model import truncated_model

    source, target, rows = tables
    other = str(truncated_model(model_path, tmp_path / "other"))
    other_encoder = get_encoder(EncoderSpec(model=other, device="cpu"))
    options = ServeOptions(table=str(target), port=0, refresh_seconds=0.2)
    server = start(options, freeze_loaded=True)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            wait_until(lambda: client.get("/healthz").status_code == 200, seconds=120)
            served = server.service.served
            assert served is not None
            # What a full collection still walks is a small part of what is loaded.
            assert len(gc.get_objects()) < gc.get_freeze_count() / 10
            first_snapshot = weakref.ref(served.current)
            first_model = weakref.ref(served.current.search)

            row = {"id": 902, "title": "Later", "body": "a row after the freeze", "year": 1}
            write_source(source, [row])
            write_target(target, [row], encoder, identity, source=source)
            wait_until(lambda: client.get("/healthz").json()["rows"] == len(rows) + 1, seconds=30)
            gc.collect()
            assert first_snapshot() is None

            # Queries start the model's own threads, which must end with it.
            assert client.post("/search", json={"query": render(rows[60])}).status_code == 200
            # A reembed's new table, in two commits to pass the version served.
            shutil.rmtree(target)
            for part in (rows[:100], rows[100:]):
                write_target(
                    target, part, other_encoder, model_identity(other, other), source=source,
                    model_name=other,
                )  # fmt: skip
            DeltaTable(str(target)).alter.set_table_properties(
                {"deltavec.reembedded": "yes"}, raise_if_not_exists=False
            )
            # The server's own collections free the old model, then it freezes again.
            wait_until(lambda: first_model() is None, seconds=30)
            wait_until(lambda: len(gc.get_objects()) < gc.get_freeze_count() / 10, seconds=30)
            assert client.post("/search", json={"query": render(rows[60])}).status_code == 200
    finally:
        server.stop()
        gc.unfreeze()


def test_healthz_is_503_until_the_target_exists_then_serves_it(
    tmp_path: Path, encoder: Any, identity: str
) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    server = start(ServeOptions(table=str(target), port=0, refresh_seconds=0.2))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            waiting = client.get("/healthz")
            assert waiting.status_code == 503
            assert "is not a Delta table" in waiting.json()["error"]
            assert client.post("/search", json={"query": "x"}).status_code == 503
            rows = [{"id": 7, "title": "Late", "body": "a target made after the server", "year": 1}]
            write_source(source, rows)
            write_target(target, rows, encoder, identity, source=source)
            wait_until(lambda: client.get("/healthz").status_code == 200, seconds=30)
            assert ids(client.post("/search", json={"query": render(rows[0])})) == [7]
    finally:
        server.stop()


def test_a_failing_refresh_keeps_serving_and_the_next_one_catches_up(
    tables: tuple[Path, Path, list[dict[str, Any]]],
    encoder: Any,
    identity: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import deltavec.serve.snapshot as snapshot_module

    source, target, _ = tables
    failures = {"left": 3}
    read_rows = snapshot_module.rows_for

    def flaky_rows_for(*args: Any, **kwargs: Any) -> Any:  # injected fault: not a DeltavecError
        if failures["left"]:
            failures["left"] -= 1
            raise OSError("connection reset by the object store")
        return read_rows(*args, **kwargs)

    with serving(target, refresh_seconds=0.2) as (_, client):
        monkeypatch.setattr(snapshot_module, "rows_for", flaky_rows_for)
        row = {"id": 901, "title": "Later", "body": "written while the store was flaky", "year": 1}
        write_source(source, [row])
        write_target(target, [row], encoder, identity, source=source)
        wait_until(lambda: client.get("/healthz").json()["rows"] == 201, seconds=30)
        found = client.post("/search", json={"query": "written while the store was flaky"})
        metrics = scraped(client.get("/metrics").text)

    assert failures["left"] == 0 and ids(found)[0] == 901
    assert metrics.value("deltavec_serve_refreshes_total", outcome="failed") == 3
