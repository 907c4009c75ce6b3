"""Data drift with Evidently: the statistics and every drifted/not-drifted decision are Evidently's.

Evidently's ``DataDriftPreset`` yields one ``DriftedColumnsCount`` metric and one ``ValueDrift``
metric per column. With tests included, each ``ValueDrift`` carries a test that fails exactly
when Evidently detects drift in that column (p-value below the threshold for K-S, distance
above it for Wasserstein …), and ``DriftedColumnsCount`` carries a test that fails when the
share of drifted columns reaches ``drift_share``. We read those verdicts instead of comparing
scores with thresholds ourselves, so that the direction of each method's threshold stays
Evidently's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from shipyard_common.errors import UpstreamError

VALUE_DRIFT = "evidently:metric_v2:ValueDrift"
DRIFTED_COLUMNS_COUNT = "evidently:metric_v2:DriftedColumnsCount"
FAILED = "FAIL"


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    score: float | None
    method: str
    threshold: float | None
    drifted: bool


@dataclass(frozen=True)
class DriftResult:
    dataset_drift: bool
    drift_share: float
    drifted_count: int
    features: list[FeatureDrift]


def compute_drift(
    *, reference: pd.DataFrame, current: pd.DataFrame, features: list[str], drift_share: float
) -> DriftResult:
    """Run Evidently's data drift preset on ``features`` of both frames."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    # Model inputs are floats by contract; left to infer, Evidently may call a column with few
    # distinct values categorical in one frame and numerical in the other.
    definition = DataDefinition(numerical_columns=list(features))
    report = Report([DataDriftPreset(columns=list(features), drift_share=drift_share)], include_tests=True)
    snapshot = report.run(
        current_data=Dataset.from_pandas(current[features].astype(float), data_definition=definition),
        reference_data=Dataset.from_pandas(reference[features].astype(float), data_definition=definition),
    )
    return parse_snapshot(snapshot.dict(), features=features)


def parse_snapshot(snapshot: dict[str, Any], *, features: list[str]) -> DriftResult:
    """Turn ``Snapshot.dict()`` of a ``DataDriftPreset`` report into a :class:`DriftResult`."""
    verdicts: dict[str, bool] = {}
    for test in snapshot.get("tests", []):
        metric_id = (test.get("metric_config") or {}).get("metric_id")
        if metric_id:
            verdicts[metric_id] = _status(test.get("status")) == FAILED

    by_column: dict[str, FeatureDrift] = {}
    dataset_drift: bool | None = None
    drift_share = 0.0
    drifted_count = 0
    for metric in snapshot.get("metrics", []):
        config = metric.get("config") or {}
        kind = config.get("type")
        if kind == DRIFTED_COLUMNS_COUNT:
            value = metric.get("value") or {}
            drift_share = float(value.get("share", 0.0))
            drifted_count = int(value.get("count", 0))
            dataset_drift = verdicts.get(metric["id"])
        elif kind == VALUE_DRIFT:
            column = str(config["column"])
            if metric["id"] not in verdicts:
                raise UpstreamError(f"Evidently gave no drift verdict for feature {column!r}")
            by_column[column] = FeatureDrift(
                name=column,
                score=_finite(metric.get("value")),
                method=str(config.get("method")),
                threshold=_finite(config.get("threshold")),
                drifted=verdicts[metric["id"]],
            )
    if dataset_drift is None:
        raise UpstreamError("Evidently's report has no dataset drift verdict (DriftedColumnsCount)")
    missing = [name for name in features if name not in by_column]
    if missing:
        raise UpstreamError(f"Evidently's report has no drift score for {missing[:5]}")
    return DriftResult(
        dataset_drift=dataset_drift,
        drift_share=drift_share,
        drifted_count=drifted_count,
        features=[by_column[name] for name in features],
    )


def _status(status: Any) -> str:
    return str(getattr(status, "value", status))


def _finite(value: Any) -> float | None:
    # JSON has no NaN; a score Evidently could not compute is reported as null.
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
