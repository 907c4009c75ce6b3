"""The monitor's gauges after each closed window (names in :mod:`services.monitor.metrics`).

Every window counts in ``shipyard_windows_total{status}`` and sets the window's size and end; the
drift and quality gauges describe the newest window that had them (``ok`` for drift), so that an
empty or failed window does not read as "no drift".
"""

from __future__ import annotations

from datetime import UTC

from services.monitor.metrics import MonitorMetrics
from services.monitor.tables import WindowRecord
from services.monitor.windows.quality import OK


def record_window(metrics: MonitorMetrics, record: WindowRecord) -> None:
    labels = (record.model, record.version)
    metrics.windows.labels(*labels, record.status).inc()
    metrics.window_rows.labels(*labels).set(record.rows)
    metrics.window_end.labels(*labels).set(record.ended_at.replace(tzinfo=UTC).timestamp())
    _set_quality(metrics, record)
    if record.status != OK:
        return
    metrics.drift_share.labels(*labels).set(record.drift_share or 0.0)
    metrics.dataset_drift.labels(*labels).set(1.0 if record.dataset_drift else 0.0)
    scores = {f["name"]: (_nan(f["score"]), bool(f["drifted"])) for f in record.features}
    metrics.set_features(record.model, record.version, scores)
    if record.prediction_drift is not None:
        metrics.prediction_drift.labels(*labels).set(1.0 if record.prediction_drift else 0.0)
        metrics.prediction_drift_score.labels(*labels).set(_nan(record.prediction_drift_score))


def _set_quality(metrics: MonitorMetrics, record: WindowRecord) -> None:
    quality = record.quality or {}
    labels = (record.model, record.version)
    gauges = {
        "schema_mismatch_share": metrics.schema_mismatch_share,
        "missing_share": metrics.missing_share,
        "out_of_range_share": metrics.out_of_range_share,
        "unseen_category_share": metrics.unseen_category_share,
    }
    for key, gauge in gauges.items():
        if key in quality:
            gauge.labels(*labels).set(float(quality[key]))


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
