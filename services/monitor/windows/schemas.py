from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class ReferencePublic(BaseModel):
    dataset: str
    rev: str
    rows: int


class FeatureDriftPublic(BaseModel):
    name: str
    score: float | None
    method: str
    threshold: float | None
    drifted: bool


class DriftPublic(BaseModel):
    model: str
    version: str
    reference: ReferencePublic
    current_rows: int
    dataset_drift: bool
    drift_share: float
    features: list[FeatureDriftPublic]


class DriftSummary(BaseModel):
    """The latest verdict the monitor computed for a model (its background refresh or a request)."""

    model: str
    version: str
    dataset_drift: bool
    drift_share: float
    current_rows: int
    computed_at: datetime = Field(description="When this verdict was computed (UTC).")
