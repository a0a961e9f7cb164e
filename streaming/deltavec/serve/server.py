"""Run the search service: uvicorn on a socket this module binds, in this process.

``serve`` is what ``deltavec serve`` runs (until interrupted); ``start`` runs the
same server on a background thread and returns its address, for embedding the
service in another Python process (and for the tests).
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deltavec.errors import ConfigError
from deltavec.serve import collector
from deltavec.serve.app import ServeLimits, Service, create_app
from deltavec.serve.auth import DEFAULT_TOKEN_ENV, server_token
from deltavec.serve.snapshot import ServedTarget

if TYPE_CHECKING:
    from deltavec.search.semantic import SemanticSearch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """Where and how to serve; the target-opening options go to ``open_search``."""

    table: str
    host: str = "127.0.0.1"
    port: int = 8080
    refresh_seconds: float = 5.0
    index: str = "auto"  # exact, approximate or auto (see ServedTarget)
    nprobe: int | None = None
    query_runtime: str = "auto"  # onnx, torch or auto (see ServedTarget)
    token_env: str = DEFAULT_TOKEN_ENV
    limits: ServeLimits = field(default_factory=ServeLimits)
    open_options: tuple[tuple[str, Any], ...] = ()


class RunningServer:
    """A server on a background thread; ``stop()`` shuts it down and joins it."""

    def __init__(self, server: Any, thread: threading.Thread, url: str, service: Service) -> None:
        self._server = server
        self._thread = thread
        self.url = url
        self.service = service

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)


def start(
    options: ServeOptions,
    *,
    open_target: Callable[[], SemanticSearch] | None = None,
    freeze_loaded: bool = False,
) -> RunningServer:
    """Start serving on a background thread; returns once the socket listens.

    Args:
        options: where and what to serve.
        open_target: opens the target (default: ``open_search`` with ``options``).
        freeze_loaded: freeze what is loaded out of the process's garbage
            collections, as ``serve`` does (``deltavec.serve.collector``); a
            process-wide setting, so off unless the server owns the process.

    Raises:
        ConfigError: the address cannot be bound, or a non-loopback host has no token.
    """
    server, sock, service = _prepare(options, open_target, freeze_loaded=freeze_loaded)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    host, port = sock.getsockname()[:2]
    return RunningServer(server, thread, f"http://{_url_host(host)}:{port}", service)


def serve(options: ServeOptions) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully and return."""
    server, sock, _ = _prepare(options, None, freeze_loaded=True)
    _one_ranking_thread()
    host, port = sock.getsockname()[:2]
    url = f"http://{_url_host(host)}:{port}"
    log.info("serving %s on %s (API description at %s/docs)", options.table, url, url)
    # uvicorn finishes in-flight requests, then re-raises the signal it caught;
    # as Ctrl-C that is a KeyboardInterrupt, and SIGTERM (docker stop) is made one.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        log.info("stopped serving %s", options.table)
    finally:
        signal.signal(signal.SIGTERM, previous)
        # Unfrozen, what was loaded is freed at exit as usual: nanobind-bound
        # modules (triton's, which torch loads) report what is left as leaks.
        gc.unfreeze()


def _one_ranking_thread() -> None:
    """Rank with one BLAS thread: the process's queries already use both stages' threads.

    OpenBLAS's own threads spin-wait between products; beside the embedding
    stage and the HTTP loop on two cores they doubled the server's CPU time per
    vector query (16.8 against 8.5 ms) and answered fewer queries. The limit is
    process-wide, so only ``serve`` (a process of its own) sets it, not ``start``.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    from deltavec.search.approximate import installed

    if installed():
        # FAISS's OpenMP threads spin-wait the same way; the ranking stage
        # searches a whole batch of queries on its one thread.
        import faiss

        faiss.omp_set_num_threads(1)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _prepare(
    options: ServeOptions,
    open_target: Callable[[], SemanticSearch] | None,
    *,
    freeze_loaded: bool,
) -> tuple[Any, socket.socket, Service]:
    import uvicorn

    token = server_token(options.host, options.token_env)
    if open_target is None:
        open_target = _opener(options)
    opener = open_target
    service = Service(
        lambda: ServedTarget(
            opener,
            index=options.index,
            nprobe=options.nprobe,
            query_runtime=options.query_runtime,
            freezer=collector.LoadedObjectFreezer() if freeze_loaded else None,
        ),
        limits=options.limits,
        token=token,
        refresh_seconds=options.refresh_seconds,
    )
    sock = _bind(options.host, options.port)
    config = uvicorn.Config(
        create_app(service),
        log_level="warning",
        access_log=False,
        # The server bounds bodies itself; this bounds what uvicorn buffers before.
        h11_max_incomplete_event_size=64 * 1024,
        timeout_graceful_shutdown=5,
        # uvloop: side by side under 16 clients, asyncio's own loop answered 360
        # keyword queries/s, uvloop 1,130-1,250 on the same two cores (and vector
        # queries 131 against 175/s). h11 rather than httptools: httptools added
        # little and has no bound on a request's head.
        loop="uvloop",
        http="h11",
    )
    return uvicorn.Server(config), sock, service


def _opener(options: ServeOptions) -> Callable[[], SemanticSearch]:
    from deltavec.search.semantic import open_search

    kwargs = dict(options.open_options)
    return lambda: open_search(options.table, **kwargs)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
