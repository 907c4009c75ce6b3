"""Retraining policies and triggers over HTTP."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shipyard_common.times import UtcDatetime

MAX_WINDOWS = 1000


class Cause(StrEnum):
    DRIFT = "drift"
    ACCURACY = "accuracy"
    SCHEDULE = "schedule"
    MANUAL = "manual"


class TriggerState(StrEnum):
    PENDING = "pending"
    STARTED = "started"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


# A model has at most one trigger in these states (the table's unique ``active_model``).
ACTIVE_STATES = (TriggerState.PENDING, TriggerState.STARTED, TriggerState.RUNNING)


class RetrainParameters(BaseModel):
    """What a policy (or a manual trigger) may pass on to the ``retrain`` flow; the monitor sets
    ``model_name``, ``parent_version`` (production) and ``reason`` itself. Anything else is refused
    here, not by Prefect when the retraining should start."""

    model_config = ConfigDict(extra="forbid")

    dataset_rev: str | None = Field(default=None, min_length=1, max_length=64,
                                    description="Train on this revision (default: the parent's).")
    csv_path: str | None = Field(default=None, min_length=1, max_length=1024,
                                 description="Ingest this file first and train on it.")
    spec_overrides: dict[str, Any] | None = Field(default=None, description="Merged into the parent's spec.")
    promotion: Literal["request", "staging"] | None = Field(
        default=None, description="request (default): ask for production; staging: needs an admin token."
    )
    timeout_s: float | None = Field(default=None, gt=0, le=7 * 86400, description="How long the job may run.")
    poll_interval_s: float | None = Field(default=None, gt=0, le=60)

    @model_validator(mode="after")
    def _one_dataset(self) -> RetrainParameters:
        if self.dataset_rev is not None and self.csv_path is not None:
            raise ValueError("give the data as at most one of dataset_rev or csv_path")
        return self

    def as_flow_parameters(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class PolicyCreate(BaseModel):
    """When a model retrains by itself. At least one condition: drift, an accuracy floor, a schedule."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    drift_share_above: float | None = Field(
        default=None, ge=0, lt=1,
        description="Retrain when more than this share of features drifts in `consecutive_windows` windows.",
    )
    consecutive_windows: int = Field(default=3, ge=1, le=MAX_WINDOWS)
    accuracy_below: float | None = Field(
        default=None, gt=0, le=1,
        description="Retrain when the newest window with `min_labelled` labels is less accurate than this.",
    )
    min_labelled: int = Field(default=50, ge=1)
    schedule_interval_s: float | None = Field(
        default=None, ge=1,
        description="Retrain this often (seconds since the last retraining or the policy)."
    )
    cooldown_s: float = Field(default=3600.0, ge=0, description="The least time between two retrainings.")
    parameters: RetrainParameters = Field(default_factory=RetrainParameters)

    @model_validator(mode="after")
    def _one_condition(self) -> PolicyCreate:
        conditions = (self.drift_share_above, self.accuracy_below, self.schedule_interval_s)
        if all(condition is None for condition in conditions):
            raise ValueError("a policy needs at least one condition: drift_share_above, accuracy_below "
                             "or schedule_interval_s")
        return self


class PolicyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    model: str
    enabled: bool
    drift_share_above: float | None
    consecutive_windows: int
    accuracy_below: float | None
    min_labelled: int
    schedule_interval_s: float | None
    cooldown_s: float
    parameters: dict[str, Any]
    created_at: UtcDatetime
    updated_at: UtcDatetime
    updated_by: str | None


class TriggerCreate(BaseModel):
    """A retraining a person asks for (cause ``manual``): from the production version, at once."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    reason: str = Field(min_length=1, max_length=2000)
    parameters: RetrainParameters | None = Field(
        default=None, description="The flow's parameters; default: the model's policy's, if any."
    )


class TriggerPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    model: str
    version: str = Field(description="The parent: the production version retrained from.")
    cause: Cause
    reason: str
    state: TriggerState
    flow_run_id: str | None
    flow_run_url: str | None
    parameters: dict[str, Any]
    outcome: dict[str, Any] = Field(
        description="Once completed: job_id, version (the new one), request_id (its promotion request), "
                    "request_state, cached, dataset_rev, metrics."
    )
    message: str | None = Field(description="Why it failed, or what it noted.")
    window_ids: list[int] = Field(description="The windows that fired it (drift, accuracy).")
    created_at: UtcDatetime
    updated_at: UtcDatetime
    finished_at: UtcDatetime | None
    created_by: str | None


class TriggerPage(BaseModel):
    triggers: list[TriggerPublic]
    next_page_token: str | None = Field(description="Pass as page_token for the next (older) page.")
