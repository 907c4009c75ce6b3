"""A sweep as submitted (:class:`SweepCreate`) and as the API shows it (:class:`SweepPublic`).

The base spec is a job spec (:class:`~services.trainer.jobs.schemas.JobCreate`); the space names spec
fields by their dotted path (``training.learning_rate``) and says what values a trial may give them.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.trainer.jobs.schemas import METRIC_GOALS, JobCreate
from shipyard_common.times import UtcDatetime

MAX_TRIALS = 1000
# A spec field path: dotted plain names (``model.hidden``, ``training.scheduler.gamma``).
FIELD_PATH = r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*){0,5}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Strategy(StrEnum):
    GRID = "grid"
    RANDOM = "random"
    TPE = "tpe"


class Direction(StrEnum):
    MAXIMIZE = "maximize"
    MINIMIZE = "minimize"


class PrunerName(StrEnum):
    NONE = "none"
    MEDIAN = "median"
    HYPERBAND = "hyperband"


class SweepState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every trial ended and the best one's model is registered
    FAILED = "failed"  # no trial gave an objective, or the best could not be registered
    CANCELLED = "cancelled"


class TrialState(StrEnum):
    RUNNING = "running"  # its job is queued or running
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    CANCELLED = "cancelled"  # with its sweep


class ChoiceParam(Strict):
    """One of ``values`` (any JSON value the field takes: numbers, strings, lists such as layer widths)."""

    type: Literal["choice"]
    values: list[Any] = Field(min_length=1, max_length=1000)


class IntParam(Strict):
    """An integer in [low, high], every ``step`` (log: sampled on a log scale, step 1 only)."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(default=1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _a_range(self) -> IntParam:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("an int range on a log scale takes no step")
        return self


class FloatParam(Strict):
    """A float in [low, high] (log: on a log scale, so 1e-5..1e-1 is sampled evenly per decade);
    ``step`` makes it discrete, which the grid strategy needs."""

    type: Literal["float"]
    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    step: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    log: bool = False

    @model_validator(mode="after")
    def _a_range(self) -> FloatParam:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("a float range on a log scale takes no step")
        return self


def _check_range(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"low ({low:g}) is above high ({high:g})")
    if log and low <= 0:
        raise ValueError(f"a log scale needs low above 0, not {low:g}")


Param = Annotated[ChoiceParam | IntParam | FloatParam, Field(discriminator="type")]


class ObjectiveSpec(Strict):
    """The job metric a trial is judged by: a per-epoch ``val_*``, a once-measured ``test_*``, or
    cross-validation's ``cv_<metric>_mean`` (the base spec then needs ``evaluation``)."""

    metric: str = Field(max_length=64, examples=["val_accuracy", "cv_accuracy_mean"])
    direction: Direction | None = Field(default=None, description="By default the metric's own "
                                        "(higher is better for accuracy, F1, ROC AUC; lower for losses).")

    @property
    def epoch_metric(self) -> str:
        """The per-epoch metric that stands for the objective while a trial trains (pruning)."""
        return epoch_metric_of(self.metric)

    @property
    def goal(self) -> Direction:
        if self.direction is not None:
            return self.direction
        return Direction.MAXIMIZE if METRIC_GOALS[self.epoch_metric] else Direction.MINIMIZE

    @model_validator(mode="after")
    def _a_metric_a_job_reports(self) -> ObjectiveSpec:
        if epoch_metric_of(self.metric) not in METRIC_GOALS:
            known = ", ".join(sorted(METRIC_GOALS))
            raise ValueError(f"objective.metric {self.metric!r} is not a metric jobs report: give one of "
                             f"{known}, or its test_* or cv_*_mean form")
        return self


def epoch_metric_of(metric: str) -> str:
    """``test_accuracy`` and ``cv_accuracy_mean`` → ``val_accuracy``; a ``val_*`` metric is itself."""
    found = re.fullmatch(r"cv_([a-z0-9_]+)_mean", metric)
    if found is not None:
        return f"val_{found.group(1)}"
    if metric.startswith("test_"):
        return "val_" + metric.removeprefix("test_")
    return metric


class PruningSpec(Strict):
    """Stop a trial whose per-epoch objective lags: ``median`` (below the median of earlier trials at the
    same epoch) or ``hyperband`` (successive halving over epochs)."""

    pruner: PrunerName = PrunerName.MEDIAN
    startup_trials: int = Field(default=1, ge=0, le=MAX_TRIALS,
                                description="median: trials that finish before any is pruned")
    warmup_epochs: int = Field(default=0, ge=0, le=10_000,
                               description="median: epochs a trial runs before it may be pruned")


class SweepCreate(Strict):
    """A sweep: ``trials`` jobs made from ``base`` with values from ``space``, at most ``parallelism`` at a
    time, searched by ``strategy`` for the best ``objective``; the best trial's model is registered."""

    base: JobCreate
    space: dict[Annotated[str, Field(pattern=FIELD_PATH)], Param] = Field(min_length=1, max_length=32)
    strategy: Strategy = Strategy.RANDOM
    objective: ObjectiveSpec
    trials: int = Field(ge=1, le=MAX_TRIALS, description="The trial budget (grid: at most its points).")
    parallelism: int = Field(default=1, ge=1, le=64, description="Trials whose jobs run at once.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="The sampler's seed.")
    pruning: PruningSpec | None = None


class TrialPublic(BaseModel):
    number: int
    state: TrialState
    params: dict[str, Any]
    value: float | None = Field(description="The objective (pruned: its last per-epoch value).")
    job_id: str | None
    mlflow_run_id: str | None
    error: str | None


class BestTrial(BaseModel):
    number: int
    value: float
    params: dict[str, Any]
    job_id: str | None
    mlflow_run_id: str | None


class SweepPublic(BaseModel):
    id: str
    state: SweepState
    model_name: str
    strategy: Strategy
    objective: ObjectiveSpec
    trials_budget: int
    parallelism: int
    trials: list[TrialPublic]
    best: BestTrial | None = Field(description="The best complete trial so far.")
    model_version: str | None = Field(description="The best trial's registered version, once it ended.")
    mlflow_run_id: str | None = Field(description="The sweep's parent run; each trial's run is its child.")
    error: str | None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    spec: SweepCreate
