"""The search service's Prometheus metrics, in a registry of its own.

Names follow the job's conventions (``deltavec_`` prefix, base units, ``_total``
counters); labels are bounded: the endpoint is the route's path template, not
the URL a client sent, and the status is the HTTP code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# Queries take milliseconds; a cold filter or a big /embed batch takes seconds.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 10, math.inf,
)  # fmt: skip
_REFRESH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120, math.inf)


class ServeMetrics:
    def __init__(self, *, caught_up_at: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter(
            "deltavec_serve_requests_total",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "deltavec_serve_request_seconds",
            "Time from request to response, by endpoint and status code",
            ["endpoint", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.index_rows = Gauge(
            "deltavec_serve_index_rows", "Live target rows the served snapshot holds", registry=r
        )
        self.keyword_documents = Gauge(
            "deltavec_serve_keyword_documents",
            "Documents in the served keyword index",
            registry=r,
        )
        self.table_version = Gauge(
            "deltavec_serve_table_version", "Target table version queries answer from", registry=r
        )
        behind = Gauge(
            "deltavec_serve_seconds_behind",
            "Seconds since the server last held the target's latest version "
            "(0 right after a refresh that found nothing newer; grows while refreshes fail)",
            registry=r,
        )
        behind.set_function(lambda: max(0.0, time.time() - caught_up_at()))
        self.refresh_seconds = Histogram(
            "deltavec_serve_refresh_seconds",
            "Duration of refreshes that changed the snapshot",
            buckets=_REFRESH_BUCKETS,
            registry=r,
        )
        self.refreshes = Counter(
            "deltavec_serve_refreshes_total",
            "Refresh attempts, by outcome (applied, unchanged, reopened, failed)",
            ["outcome"],
            registry=r,
        )

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint, str(status)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
