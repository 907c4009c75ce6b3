"""Serving's Prometheus metrics, labelled by model and version.

Label values stay bounded: a model label is a name serving knows (anything else is
``(unknown)``), and a version label is a version serving has loaded (``(none)`` when a request
failed before a version was chosen). The hot path never calls ``.labels(...)``: the children of
one loaded version are made once, cached in :class:`VersionMetrics`, and reused by every request.

The families a request updates (predictions, rows, errors, latency, in flight, batch sizes) are
sharded per thread (:mod:`shipyard_common.sharded`): no lock per update, summed when scraped,
the same exposition as ``prometheus_client``'s. Those off the hot path (loads, the log backlog)
stay plain ``prometheus_client``.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge

from shipyard_common.sharded import (
    ShardedCounter,
    ShardedCounterFamily,
    ShardedGaugeFamily,
    ShardedHistogramFamily,
)

UNKNOWN_MODEL = "(unknown)"
NO_VERSION = "(none)"

# From a fraction of a millisecond (a tiny ONNX model) to seconds (a large batch, TF Serving).
PREDICTION_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)
# Rows, or requests, per runtime call: powers of two up to the largest batch a request may carry.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class VersionMetrics:
    """The metric children of one loaded version, made once, so requests only ``inc``/``observe``."""

    def __init__(self, metrics: ServingMetrics, model: str, version: str) -> None:
        self._metrics = metrics
        self.model = model
        self.version = version
        self.requests = metrics.predictions.labels(model, version)
        self.rows = metrics.prediction_rows.labels(model, version)
        self.latency = metrics.prediction_latency.labels(model, version)
        self.batch_rows = metrics.batch_rows.labels(model, version)
        self.batch_requests = metrics.batch_requests.labels(model, version)
        self.in_flight = metrics.in_flight.labels(model)
        self._errors: dict[str, ShardedCounter] = {}

    def error(self, reason: str) -> ShardedCounter:
        """The error counter child for ``reason`` (an error code: a small, fixed set)."""
        child = self._errors.get(reason)
        if child is None:
            child = self._errors[reason] = self._metrics.prediction_errors.labels(
                self.model, self.version, reason
            )
        return child


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.predictions = ShardedCounterFamily(
            "shipyard_predictions", "Prediction requests answered", ["model", "version"], registry=registry
        )
        self.prediction_rows = ShardedCounterFamily(
            "shipyard_prediction_rows", "Rows predicted", ["model", "version"], registry=registry
        )
        self.prediction_errors = ShardedCounterFamily(
            "shipyard_prediction_errors",
            "Prediction requests refused or failed, by error code",
            ["model", "version", "reason"],
            registry=registry,
        )
        self.prediction_latency = ShardedHistogramFamily(
            "shipyard_prediction_duration_seconds",
            "Time to validate, run (batching wait included) and log one prediction request",
            ["model", "version"],
            buckets=PREDICTION_BUCKETS,
            registry=registry,
        )
        self.in_flight = ShardedGaugeFamily(
            "shipyard_prediction_in_flight", "Prediction requests being validated, run or logged now",
            ["model"], registry=registry,
        )
        self.batch_rows = ShardedHistogramFamily(
            "shipyard_batch_rows", "Rows per runtime call (several requests' rows when batched)",
            ["model", "version"], buckets=BATCH_BUCKETS, registry=registry,
        )
        self.batch_requests = ShardedHistogramFamily(
            "shipyard_batch_requests", "Requests merged into one runtime call",
            ["model", "version"], buckets=BATCH_BUCKETS, registry=registry,
        )
        self.load_failures = Counter(
            "shipyard_model_load_failures", "Model versions that failed to load", ["model"], registry=registry
        )
        self.load_duration = Gauge(
            "shipyard_model_load_duration_seconds",
            "Seconds the version took to download, open and warm up",
            ["model", "version"], registry=registry,
        )
        self.loaded_version = Gauge(
            "shipyard_model_loaded_version", "Registry version each model is served at", ["model"],
            registry=registry,
        )
        self.prediction_log_pending = Gauge(
            "shipyard_prediction_log_pending", "Answered requests not yet written to the database",
            registry=registry,
        )
        self._versions: dict[tuple[str, str], VersionMetrics] = {}
        self._lock = threading.Lock()

    def version(self, model: str, version: str) -> VersionMetrics:
        """The cached children of ``model`` ``version``; only call it for a loaded version."""
        found = self._versions.get((model, version))
        if found is None:
            with self._lock:
                found = self._versions.get((model, version))
                if found is None:
                    found = self._versions[(model, version)] = VersionMetrics(self, model, version)
        return found

    def observe_load(self, model: str, version: str, seconds: float) -> None:
        self.load_duration.labels(model, version).set(seconds)
