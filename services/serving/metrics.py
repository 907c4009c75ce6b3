from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shipyard_common.metrics import LATENCY_BUCKETS


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.predictions = Counter(
            "shipyard_predictions", "Prediction requests answered", ["model", "version"], registry=registry
        )
        self.prediction_rows = Counter(
            "shipyard_prediction_rows", "Rows predicted", ["model", "version"], registry=registry
        )
        self.prediction_errors = Counter(
            "shipyard_prediction_errors",
            "Prediction requests refused or failed",
            ["model", "reason"],
            registry=registry,
        )
        self.prediction_latency = Histogram(
            "shipyard_prediction_duration_seconds",
            "Time to validate, run and answer one prediction request",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.load_failures = Counter(
            "shipyard_model_load_failures", "Model versions that failed to load", ["model"], registry=registry
        )
        self.loaded_version = Gauge(
            "shipyard_model_loaded_version", "Registry version each model is served at", ["model"],
            registry=registry,
        )
        self.prediction_log_pending = Gauge(
            "shipyard_prediction_log_pending", "Answered requests not yet written to the database",
            registry=registry,
        )
