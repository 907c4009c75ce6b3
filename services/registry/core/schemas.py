"""What the registry answers and accepts: one schema family per idea (``…Create`` in, ``…Public`` out)."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, Field, model_validator

from shipyard_common.lineage import ALIASES, CANARY, PRODUCTION
from shipyard_common.times import UtcDatetime

# Built from lineage.ALIASES so that the trainer, registry and serving agree on one list.
AliasName = Literal[ALIASES]  # type: ignore[valid-type]
RequestState = Literal["pending", "approved", "rejected", "cancelled"]
Reason = Field(min_length=1, max_length=2000, description="Why, in a sentence: kept in the audit.")


# Reads: models and versions
class ServingStatus(BaseModel):
    """What the serving service says about a model: who answers, and the canary's share."""

    version: str | None = None
    status: str | None = None
    canary_version: str | None = None
    canary_weight: float | None = None
    error: str | None = None


class DriftVerdict(BaseModel):
    """The monitor's latest verdict on a model's production traffic (its newest closed window)."""

    dataset_drift: bool | None = None
    drift_share: float | None = None
    version: str | None = None
    rows: int | None = None
    computed_at: UtcDatetime | None = None
    window_id: int | None = None
    status: str | None = Field(default=None, description="ok, or why drift was not computed (too_few_rows…).")
    # The window's live metrics from ground truth, if labels for its rows arrived.
    labelled: int | None = None
    accuracy: float | None = None
    f1: float | None = None
    mae: float | None = None
    rmse: float | None = None
    error: str | None = Field(default=None, description="Why there is no verdict (monitor unreachable…).")


class LiveFigures(BaseModel):
    """Live metrics from ground truth: accuracy and macro F1 (classifiers) or MAE and RMSE."""

    labelled: int = 0
    accuracy: float | None = None
    f1: float | None = None
    mae: float | None = None
    rmse: float | None = None
    window_id: int | None = None
    ended_at: UtcDatetime | None = None


class LiveVersion(BaseModel):
    """One version's live metrics: over all its labelled rows, and in its newest window with labels."""

    version: str
    task: str | None = None
    overall: LiveFigures
    latest: LiveFigures


class RetrainingTrigger(BaseModel):
    """One retraining the monitor started: why, its Prefect flow run, and what it produced."""

    id: int
    version: str | None = None
    cause: str
    reason: str = ""
    state: str
    flow_run_id: str | None = None
    flow_run_url: str | None = None
    job_id: str | None = None
    new_version: str | None = None
    request_id: str | None = None
    message: str | None = None
    created_at: UtcDatetime | None = None
    updated_at: UtcDatetime | None = None


class Monitoring(BaseModel):
    """What the monitor says about one model; each part is None with its error when it cannot be read."""

    drift: DriftVerdict | None = None
    live: list[LiveVersion] | None = None
    triggers: list[RetrainingTrigger] | None = None
    drift_error: str | None = None
    live_error: str | None = None
    triggers_error: str | None = None


class ModelPublic(BaseModel):
    name: str
    description: str | None = None
    aliases: dict[str, str] = Field(description="Alias → version it points at.")
    latest_version: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    created_at: UtcDatetime | None = None
    updated_at: UtcDatetime | None = None


class ModelPage(BaseModel):
    models: list[ModelPublic]
    next_page_token: str | None = Field(default=None, description="Pass as page_token for the next page.")


class Lineage(BaseModel):
    dataset: str | None = None
    dataset_rev: str | None = None
    job_id: str | None = None
    git_commit: str | None = None
    parent: str | None = None
    framework: str | None = None
    task: str | None = None
    run_id: str | None = None


class VersionPublic(BaseModel):
    name: str
    version: str
    run_id: str | None = None
    status: str | None = None
    source: str | None = None
    description: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    aliases: list[str] = Field(default_factory=list)
    metrics: dict[str, float] | None = Field(
        default=None,
        description="The metrics of the model that was registered (its shipyard.metric.* tags); for a "
        "version registered without them, the run's latest values. Null if neither is readable.",
    )
    metrics_source: Literal["version", "run"] | None = None
    lineage: Lineage = Field(default_factory=Lineage)
    signature: dict[str, Any] | None = None
    exports: list[str] = Field(default_factory=list)
    archived: bool = False
    created_at: UtcDatetime | None = None


class VersionPage(BaseModel):
    versions: list[VersionPublic]
    next_page_token: str | None = None


class VersionDetail(VersionPublic):
    """One version with everything a reviewer reads before approving it."""

    params: dict[str, str] = Field(default_factory=dict)
    experiment_id: str | None = Field(default=None, description="The MLflow experiment of the run.")
    model_card: str | None = Field(default=None, description="The version's MODEL_CARD.md, as Markdown.")
    reports: list[str] = Field(default_factory=list, description="Report files of the run (reports/…).")
    serving: ServingStatus | None = None
    drift: DriftVerdict | None = None


class MetricDelta(BaseModel):
    a: float | None
    b: float | None
    delta: float | None = Field(description="b − a; null when either is missing.")


class ParamChange(BaseModel):
    a: str | None
    b: str | None


class ComparePublic(BaseModel):
    model: str
    a: VersionPublic
    b: VersionPublic
    metrics: dict[str, MetricDelta]
    params: dict[str, ParamChange] = Field(description="Only the params whose values differ.")
    same_dataset_revision: bool
    signature_changed: bool
    signature_changes: list[str] = Field(default_factory=list)


# Promotion
class PromoteCreate(BaseModel):
    alias: AliasName = PRODUCTION
    reason: str | None = Field(default=None, max_length=2000)
    weight: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Canary only: the share of requests the canary answers, in (0, 1]. Left out: the "
        "model's current canary weight, else 0.1.",
    )

    @model_validator(mode="after")
    def _weight_only_for_canary(self) -> Self:
        if self.weight is not None and self.alias != CANARY:
            raise ValueError(f"weight applies to the '{CANARY}' alias only, not to {self.alias!r}")
        return self


class PromotionRequestCreate(PromoteCreate):
    version: str = Field(pattern=r"^[0-9]{1,9}$", description="The version to point the alias at.")
    reason: str = Reason  # type: ignore[assignment]


class DecisionCreate(BaseModel):
    reason: str = Reason


class PromotePublic(BaseModel):
    model: str
    version: str
    alias: str
    previous_version: str | None
    weight: float | None = Field(default=None, description="The canary weight now in force (canary only).")
    audit_id: int | None = None


class AliasRemovedPublic(BaseModel):
    model: str
    alias: str
    previous_version: str


class RuleVerdict(BaseModel):
    rule: str
    passed: bool
    applicable: bool = True
    detail: str


class GateVerdict(BaseModel):
    passed: bool
    rules: list[RuleVerdict] = Field(default_factory=list)
    summary: str


class PromotionRequestPublic(BaseModel):
    id: int
    model: str
    version: str
    alias: str
    weight: float | None
    reason: str
    requested_by: str
    requested_at: UtcDatetime
    state: RequestState
    decided_by: str | None
    decided_at: UtcDatetime | None
    decision_reason: str | None
    gate: GateVerdict | None = Field(default=None, description="The gate's verdict now (pending requests).")


class RollbackCreate(BaseModel):
    reason: str = Reason


class ArchivePublic(BaseModel):
    model: str
    version: str
    archived: bool


# Gates
class GateSet(BaseModel):
    rules: list[str] = Field(
        max_length=50,
        description="Rules like 'val_accuracy >= 0.9' or 'val_accuracy >= production - 0.01' (the "
        "second compares with the production version when both used the same dataset revision).",
    )
    aliases: list[AliasName] = Field(default_factory=lambda: [PRODUCTION], min_length=1)


class GatePublic(BaseModel):
    model: str
    rules: list[str]
    aliases: list[str]
    updated_by: str | None = None
    updated_at: UtcDatetime | None = None


# History and audit
class AuditPublic(BaseModel):
    id: int
    model: str
    version: str
    alias: str
    previous_version: str | None
    action: str = Field(default="promote", description="promote, rollback, remove, archive or restore; "
                        "moved_outside or removed_outside: an alias changed in MLflow without the registry, "
                        "as its reconcile found it.")
    weight: float | None = Field(default=None, description="The canary weight set by this move.")
    actor: str
    reason: str | None
    request_id: int | None = None
    direct: bool = Field(default=False, description="An admin's move without an approved request.")
    at: UtcDatetime


class UnauditedAlias(BaseModel):
    """An alias that names a version no registry move set: it was changed in MLflow directly."""

    model: str
    alias: str
    version: str | None = Field(description="What MLflow's alias names, as the reconcile found it "
                                "(null: it was deleted there).")
    recorded_version: str | None = Field(description="What the registry's last move of it left it naming.")
    audit_id: int = Field(description="The audit row the reconcile wrote (action moved_outside or "
                          "removed_outside).")
    detected_at: UtcDatetime


class UnauditedPublic(BaseModel):
    unaudited: list[UnauditedAlias] = Field(description="Aliases naming what no registry move set, until "
                                            "the registry moves them again.")


class ReconcilePublic(UnauditedPublic):
    checked_models: int = Field(description="Models whose aliases this run compared with the audit.")
    recorded: list[AuditPublic] = Field(description="The audit rows this run wrote: the changes it found.")


class HistoryPublic(BaseModel):
    model: str
    moves: list[AuditPublic] = Field(description="Alias moves, newest first.")
    at: UtcDatetime | None = Field(default=None, description="The moment asked about (?at=).")
    production_at: str | None = Field(default=None, description="The production version at that moment.")
