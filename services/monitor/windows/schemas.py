from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from shipyard_common.times import UtcDatetime


class FeatureDriftPublic(BaseModel):
    name: str
    score: float | None
    method: str
    threshold: float | None
    drifted: bool
    kind: str = Field(default="numerical", description="numerical or categorical, as Evidently treated it")


class PredictionDriftPublic(BaseModel):
    drifted: bool
    score: float | None
    method: str | None
    threshold: float | None
    reference: str = Field(description="What the predictions were compared with (the training target).")


class ReferencePublic(BaseModel):
    dataset: str
    rev: str
    rows: int | None


class WindowPublic(BaseModel):
    """One closed window: its bounds, status, drift, data quality and, once labels arrive, live metrics."""

    id: int
    model: str
    version: str
    kind: str = Field(description="rows (closed at a count of rows) or time (its period ended)")
    status: str = Field(description="ok, empty, too_few_rows, all_missing, schema_change or error")
    message: str | None
    started_at: UtcDatetime
    ended_at: UtcDatetime
    first_prediction_id: int | None
    last_prediction_id: int | None
    requests: int
    rows: int
    dataset: str | None
    dataset_rev: str | None
    dataset_drift: bool | None
    drift_share: float | None
    drifted_count: int | None
    prediction_drift: bool | None
    prediction_drift_score: float | None
    features: list[FeatureDriftPublic]
    quality: dict[str, Any]
    report_url: str | None = Field(description="Evidently's HTML report of the window, while it is kept.")
    computed_at: UtcDatetime
    labelled: int
    accuracy: float | None
    f1: float | None
    mae: float | None
    rmse: float | None
    performance_at: UtcDatetime | None


class WindowPage(BaseModel):
    """Windows, newest first; ``next_before``: pass it as ``before`` for the next page (null: no more)."""

    model: str
    window: dict[str, float] = Field(description="How its windows are cut: {rows: N} or {seconds: S}.")
    items: list[WindowPublic]
    next_before: int | None


class DriftPublic(BaseModel):
    """The drift of a model's newest ``ok`` window (of one version, if asked)."""

    model: str
    version: str
    window_id: int
    kind: str
    started_at: UtcDatetime
    ended_at: UtcDatetime
    reference: ReferencePublic
    current_rows: int
    dataset_drift: bool
    drift_share: float
    drifted_count: int | None
    features: list[FeatureDriftPublic]
    prediction: PredictionDriftPublic | None
    quality: dict[str, Any]
    report_url: str | None
    computed_at: UtcDatetime
    age_s: float = Field(description="Seconds since this drift was computed.")
    stale: bool = Field(
        default=False, description="Whether the monitor cannot bring it up to date now (see stale_reason).",
    )
    stale_reason: str | None = Field(
        default=None, description="Why it is stale: MLflow, the reference data or the database away.",
    )


class DriftSummary(BaseModel):
    """A model at a glance, as stored: its newest drift verdict, newest window and live metrics.

    ``version`` … ``computed_at`` and ``window_id``: the newest ``ok`` window (null before the
    first); ``status``: the newest window's, whatever it is (``latest_window_id``); the live
    metrics: the newest window with labels (``performance_window_id``).
    """

    model: str
    version: str | None
    dataset_drift: bool | None
    drift_share: float | None
    current_rows: int | None
    computed_at: UtcDatetime | None = Field(description="When this verdict was computed (UTC).")
    window_id: int | None
    status: str
    latest_window_id: int
    labelled: int | None = None
    accuracy: float | None = None
    f1: float | None = None
    mae: float | None = None
    rmse: float | None = None
    performance_window_id: int | None = None
    age_s: float | None = Field(default=None, description="Seconds since the drift verdict was computed.")
    stale: bool = Field(default=False, description="Whether the monitor cannot bring it up to date now.")
    stale_reason: str | None = Field(default=None, description="Why it is stale (see DriftPublic).")


class ReportPublic(BaseModel):
    window_id: int
    version: str
    started_at: UtcDatetime
    ended_at: UtcDatetime
    rows: int
    dataset_drift: bool | None
    drift_share: float | None
    url: str


class ReportPage(BaseModel):
    model: str
    items: list[ReportPublic]
    next_before: int | None
