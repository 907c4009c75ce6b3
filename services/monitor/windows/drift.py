"""Data and prediction drift with Evidently: the statistics and every drifted/not-drifted verdict are its own.

One report per window: ``DriftedColumnsCount`` and one ``ValueDrift`` per feature (what Evidently's
``DataDriftPreset`` computes, without the preset's summary widgets, which compute every column's
drift twice more), plus one ``ValueDrift`` of the predictions against the training target. With
tests included, each ``ValueDrift`` carries a test that fails exactly when Evidently detects drift
in that column, and ``DriftedColumnsCount`` one that fails when the share of drifted features
reaches ``drift_share``; we read those verdicts instead of comparing scores with thresholds, so the
direction of each method's threshold stays Evidently's business.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from shipyard_common.errors import UpstreamError

VALUE_DRIFT = "evidently:metric_v2:ValueDrift"
DRIFTED_COLUMNS_COUNT = "evidently:metric_v2:DriftedColumnsCount"
FAILED = "FAIL"


@dataclass(frozen=True)
class DriftOptions:
    """Evidently's choices unless set: the methods and thresholds per kind of column."""

    drift_share: float
    num_method: str | None = None
    cat_method: str | None = None
    num_threshold: float | None = None
    cat_threshold: float | None = None

    def method(self, kind: str) -> str | None:
        return self.num_method if kind == "numerical" else self.cat_method

    def threshold(self, kind: str) -> float | None:
        return self.num_threshold if kind == "numerical" else self.cat_threshold


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    score: float | None
    method: str
    threshold: float | None
    drifted: bool
    kind: str


@dataclass(frozen=True)
class DriftResult:
    dataset_drift: bool
    drift_share: float
    drifted_count: int
    features: list[FeatureDrift]
    prediction: FeatureDrift | None
    # Evidently's snapshot, widgets included: the window's HTML report is rendered from it.
    snapshot: str


@dataclass(frozen=True)
class Columns:
    """The columns of one run and their kinds; ``prediction``: the predictions' column, if any."""

    kinds: dict[str, str]
    features: list[str]
    prediction: str | None = None


def compute_drift(
    *, reference: pd.DataFrame, current: pd.DataFrame, columns: Columns, options: DriftOptions
) -> DriftResult:
    """Run Evidently on ``columns`` of both frames (the same columns, of the same kinds)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift

    names = [*columns.features, *([columns.prediction] if columns.prediction else [])]
    definition = DataDefinition(
        numerical_columns=[n for n in names if columns.kinds[n] == "numerical"],
        categorical_columns=[n for n in names if columns.kinds[n] != "numerical"],
    )
    metrics: list[Any] = [DriftedColumnsCount(
        columns=list(columns.features), drift_share=options.drift_share,
        num_method=options.num_method, cat_method=options.cat_method,
        num_threshold=options.num_threshold, cat_threshold=options.cat_threshold,
    )]
    kinds = columns.kinds
    metrics += [ValueDrift(column=n, method=options.method(kinds[n]), threshold=options.threshold(kinds[n]))
                for n in names]
    report = Report(metrics, include_tests=True)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # scipy warns on a category one side lacks (chi-square); Evidently's verdict stands.
        warnings.simplefilter("ignore")
        snapshot = report.run(
            current_data=Dataset.from_pandas(current[names], data_definition=definition),
            reference_data=Dataset.from_pandas(reference[names], data_definition=definition),
        )
    return parse_snapshot(snapshot.dict(), columns=columns, snapshot=snapshot.dumps())


def parse_snapshot(found: dict[str, Any], *, columns: Columns, snapshot: str) -> DriftResult:
    """Turn ``Snapshot.dict()`` of the window's report into a :class:`DriftResult`."""
    verdicts: dict[str, bool] = {}
    for test in found.get("tests", []):
        metric_id = (test.get("metric_config") or {}).get("metric_id")
        if metric_id:
            verdicts[metric_id] = _status(test.get("status")) == FAILED
    by_column: dict[str, FeatureDrift] = {}
    counted: tuple[bool, float, int] | None = None
    for metric in found.get("metrics", []):
        config = metric.get("config") or {}
        if config.get("type") == DRIFTED_COLUMNS_COUNT:
            value = metric.get("value") or {}
            drifted = verdicts.get(metric["id"])
            if drifted is not None:
                counted = (drifted, float(value.get("share", 0.0)), int(value.get("count", 0)))
        elif config.get("type") == VALUE_DRIFT:
            by_column[str(config["column"])] = _feature(metric, config, verdicts, columns)
    if counted is None:
        raise UpstreamError("Evidently's report has no dataset drift verdict (DriftedColumnsCount)")
    missing = [name for name in columns.features if name not in by_column]
    if missing:
        raise UpstreamError(f"Evidently's report has no drift score for {missing[:5]}")
    return DriftResult(
        dataset_drift=counted[0], drift_share=counted[1], drifted_count=counted[2],
        features=[by_column[name] for name in columns.features],
        prediction=by_column.get(columns.prediction) if columns.prediction else None, snapshot=snapshot,
    )


def _feature(metric: dict[str, Any], config: dict[str, Any], verdicts: dict[str, bool],
             columns: Columns) -> FeatureDrift:
    column = str(config["column"])
    if metric["id"] not in verdicts:
        raise UpstreamError(f"Evidently gave no drift verdict for column {column!r}")
    return FeatureDrift(name=column, score=_finite(metric.get("value")), method=str(config.get("method")),
                        threshold=_finite(config.get("threshold")), drifted=verdicts[metric["id"]],
                        kind=columns.kinds.get(column, "numerical"))


def _status(status: Any) -> str:
    return str(getattr(status, "value", status))


def _finite(value: Any) -> float | None:
    # JSON has no NaN; a score Evidently could not compute is reported as null.
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
