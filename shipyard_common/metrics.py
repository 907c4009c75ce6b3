"""Prometheus helpers: one registry per app, so that several apps can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from shipyard_common.sharded import (
    ShardedCounter,
    ShardedCounterFamily,
    ShardedHistogram,
    ShardedHistogramFamily,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class HttpMetrics:
    """Request count and latency by route template, method and status.

    Sharded per thread (:mod:`shipyard_common.sharded`): every request of every service updates
    both, and ``prometheus_client`` takes a lock per update.
    """

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.requests = ShardedCounterFamily(
            "shipyard_http_requests",
            "HTTP requests answered",
            ["service", "method", "route", "status"],
            registry=registry,
        )
        self.latency = ShardedHistogramFamily(
            "shipyard_http_request_duration_seconds",
            "HTTP request latency",
            ["service", "method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.service = service
        # The labelled children, looked up once per (method, route, status): ``labels()`` costs
        # more than the increment itself, on every request of every service.
        self._children: dict[tuple[str, str, int], tuple[ShardedCounter, ShardedHistogram]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(self.service, method, route, str(status)),
                        self.latency.labels(self.service, method, route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
