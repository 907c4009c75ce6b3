from __future__ import annotations

from pydantic import BaseModel


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
