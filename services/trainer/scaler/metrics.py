"""The scaler's ``/metrics``: what it saw and decided at its last tick, and how often it decided what.

- ``shipyard_scaler_queued_jobs{queue}``, ``shipyard_scaler_running_jobs{queue}``: the job table's counts;
- ``shipyard_scaler_current_replicas{queue}``: the Deployment's replicas before the decision;
- ``shipyard_scaler_desired_replicas{queue}``: the replicas it decided on;
- ``shipyard_scaler_decisions_total{queue,action}``: decisions by action (up, down, hold);
- ``shipyard_scaler_errors_total{queue,source}``: ticks that decided nothing because the database or the
  Kubernetes API failed (the replicas are then left as they are).
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from services.trainer.scaler.decision import Action, Decision

log = logging.getLogger("shipyard.trainer.scaler")

ERROR_SOURCES = ("database", "kubernetes")


class ScalerMetrics:
    """The series above on a registry of their own (one scaler a process, several in a test)."""

    def __init__(self, queue: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = {"queue": queue}
        self.queued = Gauge("shipyard_scaler_queued_jobs", "Jobs waiting on the queue at the last tick",
                            list(labels), registry=self.registry).labels(**labels)
        self.running = Gauge("shipyard_scaler_running_jobs", "Jobs of the queue running at the last tick",
                             list(labels), registry=self.registry).labels(**labels)
        self.current = Gauge("shipyard_scaler_current_replicas", "The worker Deployment's replicas before "
                             "the last decision", list(labels), registry=self.registry).labels(**labels)
        self.desired = Gauge("shipyard_scaler_desired_replicas", "Replicas the last decision set",
                             list(labels), registry=self.registry).labels(**labels)
        decisions = Counter("shipyard_scaler_decisions", "Scaling decisions by action",
                            ["queue", "action"], registry=self.registry)
        errors = Counter("shipyard_scaler_errors", "Ticks that decided nothing: a source failed",
                         ["queue", "source"], registry=self.registry)
        # Every series from the start, at 0, so that increase() sees the first one.
        self.decisions = {action: decisions.labels(queue=queue, action=action.value) for action in Action}
        self.errors = {source: errors.labels(queue=queue, source=source) for source in ERROR_SOURCES}

    def observe(self, *, queued: int, running: int, current: int, decision: Decision) -> None:
        self.queued.set(queued)
        self.running.set(running)
        self.current.set(current)
        self.desired.set(decision.replicas)
        self.decisions[decision.action].inc()

    def failed(self, source: str) -> None:
        self.errors[source].inc()


def serve_metrics(metrics: ScalerMetrics, *, host: str, port: int) -> WSGIServer | None:
    """Serve ``/metrics`` from a thread of this process; None with port 0."""
    if port == 0:
        return None
    server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    log.info("scaler metrics on http://%s:%d/metrics", host, port)
    return server
