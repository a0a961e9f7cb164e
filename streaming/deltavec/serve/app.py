"""The HTTP API: FastAPI routes over the served snapshot, with auth, size limits and metrics.

Every route reads ``ServedTarget.current`` once and answers from that snapshot.
Errors a client can fix come back as ``{"error": "<one line>"}`` with a 4xx
status; the request is never evaluated as Python (filters are DataFusion SQL
over the source table, see ``deltavec.search.source_table``).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from deltavec.errors import DeltavecError, SearchError
from deltavec.serve.auth import authorised
from deltavec.serve.fusion import reciprocal_rank_fusion
from deltavec.serve.keywords import key_id
from deltavec.serve.metrics import ServeMetrics
from deltavec.serve.requests import EmbedRequest, OpenAIEmbeddingsRequest, SearchRequest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from fastapi import FastAPI

    from deltavec.serve.snapshot import RefreshOutcome, ServedTarget, Snapshot

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = ("/search", "/embed", "/v1/embeddings", "/healthz", "/metrics")
# Open without a token: probes and the API's own description.
_OPEN = frozenset({"/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect"})
# Each ranking contributes this many candidates (at least) to the fusion, so a
# row ranked 40th by one side and 3rd by the other can still make the top 10.
_FUSION_DEPTH = 50


@dataclass(frozen=True)
class ServeLimits:
    max_k: int = 100
    max_texts: int = 256
    max_body_bytes: int = 1_048_576


class ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Service:
    """What the routes share: the served target (once loaded), metrics, limits."""

    def __init__(
        self,
        load: Callable[[], ServedTarget],
        *,
        limits: ServeLimits,
        token: str | None,
        refresh_seconds: float,
    ) -> None:
        self._load = load
        self.limits = limits
        self.token = token
        self.refresh_seconds = refresh_seconds
        self.served: ServedTarget | None = None
        self.load_error: str | None = None
        self.metrics = ServeMetrics(caught_up_at=self._caught_up_at)
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _caught_up_at(self) -> float:
        return self.served.refreshed_at if self.served is not None else time.time()

    def start(self) -> None:
        thread = threading.Thread(target=self._load_then_refresh, name="deltavec-refresh")
        thread.daemon = True
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _load_then_refresh(self) -> None:
        while self.served is None:
            try:
                self.served = self._load()
            except Exception as exc:  # any failure: reported by /healthz, then retried
                # /healthz reports it (503) and loading is tried again: a target
                # that does not exist yet (the job has not started) appears later.
                known = isinstance(exc, DeltavecError)
                self.load_error = str(exc) if known else f"{type(exc).__name__}: {exc}"
                log.error("cannot serve yet: %s", self.load_error, exc_info=not known)
                if self.stop.wait(self.refresh_seconds):
                    return
        self.load_error = None
        self._publish(None, loaded=True)
        self.served.run(self.refresh_seconds, self.stop, self._publish)

    def _publish(self, outcome: RefreshOutcome | None, *, loaded: bool = False) -> None:
        m = self.metrics
        if self.served is None:
            return
        snapshot = self.served.current
        m.index_rows.set(len(snapshot.view))
        m.keyword_documents.set(snapshot.keywords.documents if snapshot.keywords else 0)
        m.table_version.set(snapshot.version)
        if outcome is None:
            if not loaded:
                m.refreshes.labels("failed").inc()
        else:
            what = "reopened" if outcome.reopened else "applied" if outcome.changed else "unchanged"
            m.refreshes.labels(what).inc()
            if outcome.changed:
                m.refresh_seconds.observe(outcome.seconds)

    def snapshot(self) -> Snapshot:
        if self.served is None:
            raise ClientError(503, self.load_error or "the index is still loading")
        return self.served.current


def create_app(service: Service) -> FastAPI:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.close()

    app = FastAPI(
        title="deltavec search",
        description="Vector, keyword and hybrid search over one deltavec target.",
        lifespan=lifespan,
    )

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": describe(exc.errors())}, status_code=422)

    @app.post("/search")
    def search(body: SearchRequest) -> JSONResponse:
        return JSONResponse(run_search(service.snapshot(), body, service.limits))

    @app.post("/embed")
    def embed(body: EmbedRequest) -> JSONResponse:
        snapshot = service.snapshot()
        vectors = snapshot.embed(_bounded(body.texts, service.limits))
        return JSONResponse(
            {
                "model": snapshot.model,
                "version": snapshot.version,
                "dim": int(vectors.shape[1]),
                "vectors": vectors.tolist(),
            }
        )

    @app.post("/v1/embeddings")
    def embeddings(body: OpenAIEmbeddingsRequest) -> JSONResponse:
        snapshot = service.snapshot()
        texts = _bounded(body.texts, service.limits)
        vectors = snapshot.embed(texts)
        tokens = snapshot.search.count_tokens(texts)
        data = []
        for i, vector in enumerate(vectors):
            value: Any = vector.tolist()
            if body.encoding_format == "base64":
                value = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": value})
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body.model or snapshot.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        snapshot = service.snapshot()
        return JSONResponse(
            {
                "status": "ok",
                "version": snapshot.version,
                "rows": len(snapshot.view),
                "model": snapshot.model,
                "keyword_index": snapshot.keywords is not None,
                "index": "approximate" if snapshot.approximate is not None else "exact",
                "query_runtime": snapshot.search.encoder.runtime,
            }
        )

    @app.get("/metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return _Guard(app, service)  # type: ignore[return-value]


def run_search(snapshot: Snapshot, body: SearchRequest, limits: ServeLimits) -> dict[str, Any]:
    """The hits for one request, all from ``snapshot``."""
    if body.k > limits.max_k:
        raise ClientError(422, f"k: must be at most {limits.max_k} (got {body.k})")
    search, view = snapshot.search, snapshot.view
    names = view.key_names
    if body.mode != "vector" and snapshot.keywords is None:
        raise ClientError(
            400,
            f"{body.mode} search needs the target's source table and template, "
            "which it does not record",
        )
    rows = None
    try:
        if body.where is not None:
            rows = snapshot.slots_where(body.where)
        if body.columns:
            _check_columns(search, body.columns)
    except SearchError as exc:
        raise ClientError(400, str(exc)) from None
    depth = max(body.k, _FUSION_DEPTH) if body.mode == "hybrid" else body.k
    vector: list[str] = []
    scores: dict[str, float] = {}
    keys: dict[str, dict[str, Any]] = {}
    if body.mode != "keyword":
        _, ranked_by_vector = snapshot.batcher.search(body.query, snapshot.ranker, depth, rows)
        for found in ranked_by_vector:
            kid = key_id([found.key[n] for n in names])
            vector.append(kid)
            scores[kid] = found.score
            keys[kid] = found.key
    keyword: list[str] = []
    if body.mode != "vector" and snapshot.keywords is not None:
        only = snapshot.keyword_keys(rows) if rows is not None else None
        for khit in snapshot.keywords.search(body.query, depth, only=only):
            keyword.append(khit.key)
            scores.setdefault(khit.key, khit.score)
    if body.mode == "hybrid":
        ranked = reciprocal_rank_fusion([vector, keyword], body.k)
    else:
        ranked = [(kid, scores[kid]) for kid in (vector or keyword)[: body.k]]
    vector_rank = {kid: i for i, kid in enumerate(vector, 1)}
    keyword_rank = {kid: i for i, kid in enumerate(keyword, 1)}
    hits = []
    for rank, (kid, score) in enumerate(ranked, 1):
        key = keys.get(kid) or dict(zip(names, _decode(kid), strict=True))
        hit: dict[str, Any] = {"rank": rank, "key": key, "score": round(float(score), 6)}
        if body.mode == "hybrid":
            hit["vector_rank"] = vector_rank.get(kid)
            hit["keyword_rank"] = keyword_rank.get(kid)
        hits.append(hit)
    if body.columns and hits:
        _attach(search, hits, names, body.columns)
    return {"version": snapshot.version, "model": snapshot.model, "mode": body.mode, "hits": hits}


def _check_columns(search: Any, columns: list[str]) -> None:
    have = [f.name for f in search.source.schema().fields]
    unknown = [c for c in columns if c not in have]
    if unknown:
        raise SearchError(
            f"unknown column(s) {', '.join(unknown)}; the source has {', '.join(have)}"
        )


def _attach(search: Any, hits: list[dict[str, Any]], names: list[str], columns: list[str]) -> None:
    import pyarrow as pa

    from deltavec.search.source_table import rows_for

    keys = pa.Table.from_pylist([h["key"] for h in hits])
    try:
        found = rows_for(search.source, keys, columns)
    except SearchError as exc:
        raise ClientError(400, str(exc)) from None
    for hit in hits:
        row = found.get(tuple(hit["key"][n] for n in names))
        hit["source"] = None if row is None else {c: _plain(row.get(c)) for c in columns}


def _plain(value: Any) -> Any:
    """A source value as JSON has it (dates and decimals as text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _decode(kid: str) -> list[Any]:
    import json

    values: list[Any] = json.loads(kid)
    return values


def _bounded(texts: list[str], limits: ServeLimits) -> list[str]:
    if len(texts) > limits.max_texts:
        raise ClientError(413, f"at most {limits.max_texts} texts per request (got {len(texts)})")
    if not texts:
        raise ClientError(422, "input: no texts given")
    return texts


def describe(errors: Any) -> str:
    """pydantic's first complaint as ``field: what is wrong``, one line."""
    if not errors:
        return "the request body is not valid"
    error = errors[0]
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
    message = str(error.get("msg", "is not valid")).removeprefix("Value error, ")
    if error.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    return f"{where}: {message}"


class _Guard:
    """ASGI middleware: auth, the body size bound, and the request metrics, for every route.

    Plain ASGI rather than ``BaseHTTPMiddleware``, which costs a task and a
    stream copy per request.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = 500

        async def tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            limit = self.service.limits.max_body_bytes
            if path not in _OPEN and not authorised(
                headers.get("authorization"), self.service.token
            ):
                await _reply(tracked, 401, "a valid bearer token is required", bearer=True)
                return
            if int(headers.get("content-length") or 0) > limit:
                await _reply(tracked, 413, f"the request body is over {limit} bytes")
                return
            body = await _read_body(receive, limit)
            if body is None:
                await _reply(tracked, 413, f"the request body is over {limit} bytes")
                return
            await self.app(scope, _replay(body, receive), tracked)
        finally:
            self.service.metrics.observe(endpoint, status, time.perf_counter() - started)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body (a chunked one is counted as it arrives), or None past ``limit``."""
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Send, status: int, message: str, *, bearer: bool = False) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if bearer:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def vectors_from_base64(value: str) -> np.ndarray:
    """Decode one base64 embedding as the openai client does (little-endian float32)."""
    return np.frombuffer(base64.b64decode(value), dtype="<f4")
