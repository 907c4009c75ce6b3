"""The monitor's Prometheus metrics: one place, so that dashboards and alert rules have one contract.

Gauges describe the newest closed window of each served (model, version); counters count what the
monitor did. ``infra/prometheus/`` and ``infra/grafana/`` query these names; change one here and
there together (the Prometheus test runs every expression against a live stack).
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge

MV = ["model", "version"]


class MonitorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        # Drift and data quality of the newest closed window.
        self.drift_share = gauge("shipyard_drift_share", "Share of features Evidently finds drifted", MV)
        self.dataset_drift = gauge(
            "shipyard_dataset_drift", "1 when Evidently finds dataset drift, else 0", MV
        )
        self.feature_drift_score = gauge(
            "shipyard_feature_drift_score",
            "Evidently drift score of one feature (p-value for K-S, distance for Wasserstein …)",
            [*MV, "feature"],
        )
        self.feature_drifted = gauge(
            "shipyard_feature_drifted", "1 when Evidently finds this feature drifted, else 0",
            [*MV, "feature"],
        )
        self.prediction_drift_score = gauge(
            "shipyard_prediction_drift_score", "Evidently drift score of the model's predictions", MV
        )
        self.missing_share = gauge("shipyard_window_missing_share", "Share of missing input values", MV)
        self.out_of_range_share = gauge(
            "shipyard_window_out_of_range_share",
            "Share of input values outside the training data's range", MV,
        )
        self.unseen_category_share = gauge(
            "shipyard_window_unseen_category_share",
            "Share of categorical input values the training data never had", MV,
        )
        self.schema_mismatch_share = gauge(
            "shipyard_window_schema_mismatch_share",
            "Share of logged rows whose width is not the version's number of features", MV,
        )
        self.prediction_drift = gauge(
            "shipyard_prediction_drift", "1 when Evidently finds the predictions drifted, else 0", MV
        )
        self.window_rows = gauge("shipyard_window_rows", "Rows in the newest closed window", MV)
        self.window_end = gauge(
            "shipyard_window_end_timestamp_seconds", "When the newest closed window ended (Unix time)", MV
        )
        self.windows = counter(
            "shipyard_windows", "Windows closed and computed, by status (ok, empty, schema_change …)",
            [*MV, "status"],
        )
        self.window_errors = counter(
            "shipyard_window_errors", "Window computations that failed unexpectedly", ["model"]
        )
        # How far behind the newest logged prediction the windows are (rows not yet in a window).
        self.pending_rows = gauge(
            "shipyard_window_pending_rows", "Logged prediction rows not yet in a closed window", MV
        )
        # Live metrics from ground truth, per version, over its newest window with labels.
        self.live_accuracy = gauge("shipyard_live_accuracy", "Accuracy on labelled rows", MV)
        self.live_f1 = gauge("shipyard_live_f1", "Macro F1 on labelled rows", MV)
        self.live_mae = gauge("shipyard_live_mae", "Mean absolute error, labelled rows", MV)
        self.live_rmse = gauge("shipyard_live_rmse", "RMSE on labelled rows", MV)
        self.live_labelled = gauge("shipyard_live_labelled_rows", "Rows with labels", MV)
        self.feedback = counter(
            "shipyard_feedback_labels", "Ground-truth labels received, by whether they matched a prediction",
            ["model", "matched"],
        )
        # Retraining.
        self.triggers = counter(
            "shipyard_retraining_triggers", "Retrainings started by the monitor, by cause", ["model", "cause"]
        )
        self.trigger_outcomes = counter(
            "shipyard_retraining_outcomes", "Retrainings that ended, by outcome (completed, failed)",
            ["model", "outcome"],
        )
        self.retraining_running = gauge(
            "shipyard_retraining_running", "1 while a retraining of this model runs, else 0", ["model"]
        )
        self._lock = threading.Lock()
        self._features: dict[tuple[str, str], set[str]] = {}

    def set_features(self, model: str, version: str, scores: dict[str, tuple[float, bool]]) -> None:
        """Per-feature series of one version; series of features it no longer has are removed."""
        with self._lock:
            key = (model, version)
            for stale in self._features.get(key, set()) - set(scores):
                self.feature_drift_score.remove(model, version, stale)
                self.feature_drifted.remove(model, version, stale)
            self._features[key] = set(scores)
            for feature, (score, drifted) in scores.items():
                self.feature_drift_score.labels(model, version, feature).set(score)
                self.feature_drifted.labels(model, version, feature).set(1.0 if drifted else 0.0)

    def forget_windows(self, model: str, version: str) -> None:
        """Remove every window series of a version that is no longer served (labels stay bounded)."""
        labels = {"model": model, "version": version}
        with self._lock:
            self._features.pop((model, version), None)
            per_feature = (self.feature_drift_score, self.feature_drifted)
            for metric in (*per_feature, self.windows, *self._window_gauges()):
                metric.remove_by_labels(labels)

    def _window_gauges(self) -> tuple[Gauge, ...]:
        return (
            self.drift_share, self.dataset_drift, self.prediction_drift_score, self.prediction_drift,
            self.missing_share, self.out_of_range_share, self.unseen_category_share,
            self.schema_mismatch_share, self.window_rows, self.window_end, self.pending_rows,
        )
