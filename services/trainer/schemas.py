"""The job spec (versioned, strict) and the job as the API shows it.

Unknown fields are rejected rather than ignored: a misspelt ``learning_rte`` that silently
trained with the default would be worse than a 422.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shipyard_common.datasets import validate_dataset_name, validate_name, validate_revision
from shipyard_common.errors import InvalidInput

SPEC_VERSION = 1


class Framework(StrEnum):
    PYTORCH = "pytorch"


class Task(StrEnum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class OptimizerName(StrEnum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"
    RMSPROP = "rmsprop"


class SchedulerName(StrEnum):
    NONE = "none"
    STEP = "step"
    COSINE = "cosine"
    ONECYCLE = "onecycle"
    PLATEAU = "plateau"


# Per-epoch validation metrics early stopping may watch, and whether larger is better.
METRIC_GOALS: dict[str, bool] = {
    "val_loss": False,
    "val_accuracy": True,
    "val_f1_macro": True,
    "val_roc_auc": True,
    "val_mse": False,
    "val_mae": False,
}
StoppingMetric = Literal["val_loss", "val_accuracy", "val_f1_macro", "val_roc_auc", "val_mse", "val_mae"]
CLASSIFICATION_ONLY = frozenset({"val_accuracy", "val_f1_macro", "val_roc_auc"})
REGRESSION_ONLY = frozenset({"val_mse", "val_mae"})


class Queue(StrEnum):
    CPU = "cpu"
    GPU = "gpu"


class ExportFormat(StrEnum):
    ONNX = "onnx"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


def _as_value_error(check: Any) -> Any:
    # The shared validators raise InvalidInput (an HTTP 400 elsewhere); inside a schema the
    # same words must become a field error, which pydantic builds only from ValueError.
    def validate(value: str) -> str:
        try:
            return str(check(value))
        except InvalidInput as exc:
            raise ValueError(exc.message) from None

    return validate


DatasetName = Annotated[str, AfterValidator(_as_value_error(validate_dataset_name))]
Revision = Annotated[str, AfterValidator(_as_value_error(validate_revision))]
ModelName = Annotated[str, AfterValidator(_as_value_error(partial(validate_name, kind="model")))]
ColumnName = Annotated[str, Field(min_length=1, max_length=256)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    type: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1, le=8192)]] = Field(
        default_factory=lambda: [64, 32], max_length=32
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class DataSpec(Strict):
    dataset: DatasetName
    rev: Revision
    task: Task
    target: ColumnName
    features: list[ColumnName] | None = Field(
        default=None, min_length=1, description="Input columns in order; all but the target when null."
    )
    validation_split: float = Field(default=0.2, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _features_are_distinct_from_target(self) -> DataSpec:
        if self.features is not None:
            if self.target in self.features:
                raise ValueError(f"the target {self.target!r} cannot also be a feature")
            if len(set(self.features)) != len(self.features):
                raise ValueError("features must not repeat a column")
        return self


class SchedulerSpec(Strict):
    """How the learning rate moves: ``step`` every ``step_size`` epochs by ``gamma``; ``cosine``
    down to 0 over the run; ``onecycle`` up to ``learning_rate`` and down, per batch; ``plateau``
    by ``gamma`` once val_loss has not improved for ``patience`` epochs."""

    name: SchedulerName = SchedulerName.NONE
    step_size: int = Field(default=10, ge=1, le=10_000)
    gamma: float = Field(default=0.1, gt=0.0, lt=1.0)
    patience: int = Field(default=5, ge=0, le=10_000)


class EarlyStoppingSpec(Strict):
    metric: StoppingMetric = "val_loss"
    patience: int = Field(default=5, ge=1, le=10_000)
    min_delta: float = Field(default=0.0, ge=0.0)
    restore_best: bool = True


class TrainingSpec(Strict):
    epochs: int = Field(default=20, ge=1, le=10_000)
    batch_size: int = Field(default=32, ge=1, le=1_048_576)
    # No upper bound: a rate that diverges is the engine's guard's to report, with the step it broke at.
    learning_rate: float = Field(default=1e-3, gt=0.0, allow_inf_nan=False)
    optimizer: OptimizerName = OptimizerName.ADAM
    momentum: float | None = Field(default=None, ge=0.0, lt=1.0, description="SGD only.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    deterministic: bool = False
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    grad_clip_norm: float | None = Field(default=None, gt=0.0)
    grad_accum_steps: int = Field(default=1, ge=1, le=1024)
    early_stopping: EarlyStoppingSpec | None = None

    @field_validator("momentum")
    @classmethod
    def _momentum_is_for_sgd(cls, value: float | None, info: ValidationInfo) -> float | None:
        optimizer = info.data.get("optimizer")
        if value is not None and optimizer is not None and optimizer != OptimizerName.SGD:
            raise ValueError(f"momentum applies to the 'sgd' optimizer only, not {optimizer.value!r}")
        return value


class ResourcesSpec(Strict):
    queue: Queue = Queue.CPU


class JobCreate(Strict):
    """A training job, as submitted. ``spec_version`` lets later issues change the shape safely."""

    spec_version: Literal[1] = 1
    model_name: ModelName
    framework: Framework = Framework.PYTORCH
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    exports: list[ExportFormat] = Field(default_factory=lambda: [ExportFormat.ONNX], min_length=1)

    @model_validator(mode="after")
    def _onnx_is_exported(self) -> JobCreate:
        # Serving loads only ONNX; a version without it could be promoted but never served.
        if ExportFormat.ONNX not in self.exports:
            raise ValueError("exports must include 'onnx'")
        return self

    @model_validator(mode="after")
    def _early_stopping_metric_fits_the_task(self) -> JobCreate:
        stopping = self.training.early_stopping
        if stopping is None:
            return self
        wrong = REGRESSION_ONLY if self.data.task == Task.CLASSIFICATION else CLASSIFICATION_ONLY
        if stopping.metric in wrong:
            raise ValueError(
                f"training.early_stopping.metric {stopping.metric!r} is not computed for "
                f"{self.data.task.value}"
            )
        return self


class Progress(BaseModel):
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    eta_seconds: float | None = None
    # Set when a worker took the job over and continued from a checkpoint: the first epoch it ran.
    resumed_from_epoch: int | None = None


class JobPublic(BaseModel):
    id: str
    state: JobState
    progress: Progress
    metrics: dict[str, float]
    model_name: str
    model_version: str | None
    mlflow_run_id: str | None
    device: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    spec: JobCreate
