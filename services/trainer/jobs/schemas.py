"""The job spec (versioned, strict) and the job as the API shows it.

Unknown fields are rejected rather than ignored: a misspelt ``learning_rte`` that silently
trained with the default would be worse than a 422.
"""

from __future__ import annotations

import re
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

from services.trainer.jobs.column_spec import ColumnSpec
from services.trainer.jobs.sequence_spec import (
    SequenceSpec,
    length_left_to_the_data,
    sequence_refusal,
)
from shipyard_common.datasets import validate_dataset_name, validate_name, validate_ref
from shipyard_common.errors import InvalidInput
from shipyard_common.times import UtcDatetime

SPEC_VERSION = 1


class Framework(StrEnum):
    PYTORCH = "pytorch"
    KERAS = "keras"
    TRANSFORMERS = "transformers"


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
    TORCHSCRIPT = "torchscript"
    SAVEDMODEL = "savedmodel"
    # The ONNX export with its weights quantized to int8 (dynamic quantization); kept only when it
    # scores within ``training.quantization_tolerance`` of the fp32 file (engines/quantize.py).
    ONNX_INT8 = "onnx_int8"


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


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
# A commit id (short or full), a tag or ``latest``; the API stores the full commit id it resolves to.
Revision = Annotated[str, AfterValidator(_as_value_error(validate_ref))]
ModelName = Annotated[str, AfterValidator(_as_value_error(partial(validate_name, kind="model")))]
ColumnName = Annotated[str, Field(min_length=1, max_length=256)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Width = Annotated[int, Field(ge=1, le=8192)]
# ``module:function``: a module file in the trainer's plugin directory and a function in it.
# Plain identifiers only, so that no spec can name an import path outside that directory.
FACTORY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*:[A-Za-z_][A-Za-z0-9_]*$"
# Pretrained checkpoints that ship inside an installed package, so that they load offline.
PRETRAINED_CHECKPOINTS = ("all-MiniLM-L6-v2",)


class MLPSpec(Strict):
    """Standardise → (Linear → ReLU → Dropout)* → Linear, on the feature row."""

    type: Literal["mlp"] = "mlp"
    hidden: list[Width] = Field(default_factory=lambda: [64, 32], max_length=32)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class CNNSpec(Strict):
    """The feature row reshaped to ``input_shape`` (channels, height, width), then
    (Conv → BatchNorm → ReLU → MaxPool)* per entry of ``channels``, then a dense head."""

    type: Literal["cnn"]
    input_shape: tuple[Width, Width, Width]
    channels: list[Width] = Field(default_factory=lambda: [32, 64], min_length=1, max_length=8)
    kernel_size: int = Field(default=3, ge=1, le=15)
    hidden: int = Field(default=128, ge=1, le=8192)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


_SEQUENCE_LENGTH = ("Fixed-width rows: the number of equal steps. With data.sequence: the longest sequence "
                    "read (longer ones are truncated); the longest training sequence when null or left out.")


class RecurrentSpec(Strict):
    """The feature row read as ``sequence_length`` steps of equal width (with data.sequence: each
    sequence, up to ``sequence_length`` steps); the last real step's state classifies."""

    type: Literal["lstm", "gru"]
    sequence_length: int | None = Field(ge=1, le=100_000, description=_SEQUENCE_LENGTH)
    hidden_size: int = Field(default=64, ge=1, le=8192)
    num_layers: int = Field(default=1, ge=1, le=16)
    bidirectional: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class TransformerEncoderSpec(Strict):
    """The feature row read as ``sequence_length`` tokens of equal width, projected to ``d_model``,
    with learned positions, through ``num_layers`` encoder layers, mean-pooled (over real steps only)."""

    type: Literal["transformer_encoder"]
    sequence_length: int | None = Field(ge=1, le=100_000, description=_SEQUENCE_LENGTH)
    d_model: int = Field(default=64, ge=2, le=8192)
    nhead: int = Field(default=4, ge=1, le=128)
    num_layers: int = Field(default=2, ge=1, le=48)
    dim_feedforward: int = Field(default=128, ge=1, le=65_536)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerEncoderSpec:
        if self.d_model % self.nhead:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of nhead ({self.nhead})")
        return self


class PluginSpec(Strict):
    """A model of the team's own: ``factory`` is ``module:function`` in the trainer's plugin
    directory, called as ``function(n_features=…, n_outputs=…, **options)``; it returns an
    ``nn.Module`` that maps standardised feature rows to outputs."""

    type: Literal["plugin"]
    factory: str = Field(max_length=200)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _factory_is_module_colon_function(cls, value: str) -> str:
        if not re.fullmatch(FACTORY_PATTERN, value):
            raise ValueError(
                f"factory must be 'module:function', a module file in the plugin directory and a "
                f"function in it (plain names, no dots or slashes); got {value!r}"
            )
        return value


class PretrainedTextSpec(Strict):
    """Fine-tune a pretrained text encoder with a classification head (framework ``transformers``)."""

    type: Literal["pretrained_text"]
    checkpoint: Literal["all-MiniLM-L6-v2"] = "all-MiniLM-L6-v2"
    max_length: int = Field(default=128, ge=8, le=512)
    freeze_encoder: bool = False
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


ModelSpec = Annotated[
    MLPSpec | CNNSpec | RecurrentSpec | TransformerEncoderSpec | PluginSpec | PretrainedTextSpec,
    Field(discriminator="type"),
]
# Which built-in architectures each framework can build, and which exports it can write.
FRAMEWORK_MODELS: dict[Framework, frozenset[str]] = {
    Framework.PYTORCH: frozenset({"mlp", "cnn", "lstm", "gru", "transformer_encoder", "plugin"}),
    Framework.KERAS: frozenset({"mlp", "cnn", "lstm", "gru"}),
    Framework.TRANSFORMERS: frozenset({"pretrained_text"}),
}
FRAMEWORK_EXPORTS: dict[Framework, frozenset[ExportFormat]] = {
    Framework.PYTORCH: frozenset({ExportFormat.ONNX, ExportFormat.ONNX_INT8, ExportFormat.TORCHSCRIPT}),
    Framework.KERAS: frozenset({ExportFormat.ONNX, ExportFormat.ONNX_INT8, ExportFormat.SAVEDMODEL}),
    Framework.TRANSFORMERS: frozenset({ExportFormat.ONNX, ExportFormat.ONNX_INT8, ExportFormat.TORCHSCRIPT}),
}


SPLIT_PARTS = ("train", "validation", "test")


class SplitSpec(Strict):
    """Train / validation / test: shares of the rows, drawn with ``seed`` (stratified for classification),
    or ``column``: a column whose value names each row's part (``train``, ``validation`` or ``test``).
    Early stopping and ``restore_best`` choose on the validation rows; the test rows are used once, after
    training, for the ``test_*`` metrics the job reports and a gate may judge (docs/training.md)."""

    train: float | None = Field(default=None, gt=0.0, lt=1.0)
    validation: float | None = Field(default=None, gt=0.0, lt=1.0)
    test: float | None = Field(default=None, gt=0.0, lt=1.0)
    column: ColumnName | None = Field(
        default=None, description="A column naming each row's part: train, validation or test."
    )
    test_rev: Revision | None = Field(
        default=None, description="Another revision of the dataset whose rows are the test rows; the "
        "shares (or the column) then split this revision into train and validation only.",
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="The split's own seed, not training's.")

    @model_validator(mode="after")
    def _shares_or_a_column(self) -> SplitSpec:
        shares: tuple[float | None, ...] = (self.train, self.validation, self.test)
        if self.column is not None:
            if any(share is not None for share in shares):
                raise ValueError("give the split either as shares (train, validation, test) or as a column")
            return self
        if self.test_rev is not None:
            if self.test is not None or self.train is None or self.validation is None:
                raise ValueError("with test_rev, the test rows are that revision's: give train and "
                                 "validation shares only")
            shares = (self.train, self.validation)
        elif any(share is None for share in shares):
            raise ValueError(
                "the split needs train, validation and test shares (or a column naming each row's part)"
            )
        total = sum(share for share in shares if share is not None)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"the split's shares must add up to 1, not {total:g}")
        return self


class DataSpec(Strict):
    dataset: DatasetName
    rev: Revision
    task: Task
    target: ColumnName
    features: list[ColumnName] | None = Field(
        default=None, min_length=1, description="Input columns in order; all but the target when null."
    )
    validation_split: float = Field(
        default=0.2, gt=0.0, lt=1.0,
        description="Without `split`: the share of rows held out for validation (no test rows).",
    )
    split: SplitSpec | None = Field(
        default=None, description="Train / validation / test; replaces validation_split when given.",
    )
    sequence: SequenceSpec | None = Field(
        default=None, description="Variable-length sequences: a list column, or long format (id, step).",
    )
    columns: dict[ColumnName, ColumnSpec] | None = Field(
        default=None, description="Per feature column: its type, encoding and imputation; undeclared "
        "columns are inferred, and what was inferred is recorded (the version's columns.json).",
    )

    @model_validator(mode="after")
    def _features_are_distinct_from_target(self) -> DataSpec:
        split_column = self.split.column if self.split is not None else None
        if split_column is not None and split_column in (self.target, *(self.features or ())):
            raise ValueError(f"the split column {split_column!r} cannot also be the target or a feature")
        if self.features is not None:
            if self.target in self.features:
                raise ValueError(f"the target {self.target!r} cannot also be a feature")
            if len(set(self.features)) != len(self.features):
                raise ValueError("features must not repeat a column")
        if self.columns:
            declared = set(self.columns)
            not_features = {self.target, split_column} | (declared - set(self.features or declared))
            outside = sorted(set(self.columns) & not_features)
            if outside:
                raise ValueError(f"data.columns declares {outside[:10]}, which are not feature columns "
                                 f"(the target, the split column, or not in features)")
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
    precision: Precision = Precision.FP32
    # DataLoader worker processes; 0 loads batches in the training process itself.
    num_workers: int = Field(default=0, ge=0, le=64)
    pin_memory: bool = False
    compile: bool = Field(default=False, description="Wrap the model in torch.compile (PyTorch only).")
    quantization_tolerance: float = Field(
        default=0.01, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Export onnx_int8 only: how much worse than the fp32 ONNX file the int8 file may "
        "score on the evaluation rows and still be kept (classification: accuracy points, absolute; "
        "regression: RMSE, relative to fp32's).",
    )

    @field_validator("momentum")
    @classmethod
    def _momentum_is_for_sgd(cls, value: float | None, info: ValidationInfo) -> float | None:
        optimizer = info.data.get("optimizer")
        if value is not None and optimizer is not None and optimizer != OptimizerName.SGD:
            raise ValueError(f"momentum applies to the 'sgd' optimizer only, not {optimizer.value!r}")
        return value


class ParentVersion(Strict):
    """A registered version whose trained weights start this job (fine-tuning); recorded as lineage."""

    model_name: ModelName
    version: Annotated[str, Field(pattern=r"^[1-9][0-9]{0,8}$")]


class ResourcesSpec(Strict):
    queue: Queue = Queue.CPU
    # More than one runs the job under torchrun with DistributedDataParallel, one process per GPU
    # (on a CPU worker, one gloo process each: the same code path, tested without a GPU).
    gpus: int = Field(default=0, ge=0, le=64)


class EvaluationSpec(Strict):
    """Cross-validation: ``kfold`` folds of the training rows (stratified by class for classification
    when ``stratified``), each trained on the others and scored on itself, before the registered model
    is trained on all training rows; the job reports each fold and their mean and standard deviation."""

    kfold: int = Field(ge=2, le=20, description="How many folds the training rows are cut into.")
    stratified: bool = Field(default=True, description="Keep each class's share in every fold.")


class JobCreate(Strict):
    """A training job, as submitted. ``spec_version`` lets later issues change the shape safely."""

    spec_version: Literal[1] = 1
    model_name: ModelName
    framework: Framework = Framework.PYTORCH
    model: ModelSpec = Field(default_factory=MLPSpec)
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    exports: list[ExportFormat] = Field(default_factory=lambda: [ExportFormat.ONNX], min_length=1)
    init_from: ParentVersion | None = None
    evaluation: EvaluationSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _model_type_defaults_to_mlp(cls, values: Any) -> Any:
        # Specs written before the model union named no type: they meant the MLP, and still do.
        model = values.get("model") if isinstance(values, dict) else None
        if isinstance(model, dict) and "type" not in model:
            values = {**values, "model": {**model, "type": "mlp"}}
        return values

    @model_validator(mode="after")
    def _model_and_exports_fit_the_framework(self) -> JobCreate:
        framework = self.framework
        if self.model.type not in FRAMEWORK_MODELS[framework]:
            allowed = ", ".join(sorted(FRAMEWORK_MODELS[framework]))
            raise ValueError(
                f"model.type {self.model.type!r} is not available with framework {framework.value!r}; "
                f"it builds: {allowed}"
            )
        _int8_needs_onnx(framework, self.exports)
        unsupported = [f.value for f in self.exports if f not in FRAMEWORK_EXPORTS[framework]]
        if unsupported:
            allowed = ", ".join(sorted(f.value for f in FRAMEWORK_EXPORTS[framework]))
            raise ValueError(
                f"exports {unsupported} are not available with framework {framework.value!r}; "
                f"it writes: {allowed}"
            )
        if len(set(self.exports)) != len(self.exports):
            raise ValueError("exports must not repeat a format")
        return self

    @model_validator(mode="after")
    def _training_options_fit_the_framework(self) -> JobCreate:
        if self.evaluation is not None and (self.framework == Framework.KERAS or self.resources.gpus > 1):
            raise ValueError("evaluation.kfold (cross-validation) needs framework pytorch or transformers "
                             "on one device (resources.gpus <= 1)")
        if self.framework == Framework.KERAS:
            if self.training.compile:
                raise ValueError(
                    "training.compile is torch.compile: frameworks pytorch and transformers only"
                )
            if self.resources.gpus > 1:
                raise ValueError("resources.gpus > 1 (DistributedDataParallel) needs framework pytorch "
                                 "or transformers")
            if self.training.grad_accum_steps > 1:
                raise ValueError("training.grad_accum_steps is not available with framework 'keras'")
            if self.training.num_workers or self.training.pin_memory:
                raise ValueError("training.num_workers and pin_memory are DataLoader options: "
                                 "frameworks pytorch and transformers only")
        if self.init_from is not None and self.framework == Framework.KERAS:
            raise ValueError(
                "init_from (fine-tuning a registered version) needs framework pytorch or transformers"
            )
        if self.model.type == "pretrained_text" and self.data.task != Task.CLASSIFICATION:
            raise ValueError("model 'pretrained_text' is a classifier: data.task must be 'classification'")
        return self

    @model_validator(mode="after")
    def _declared_columns_fit_the_job(self) -> JobCreate:
        if self.data.columns:
            refused = table_refusal(self)
            if refused:
                raise ValueError(f"data.columns: {refused}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _sequences_may_leave_their_length_out(cls, values: Any) -> Any:
        return length_left_to_the_data(values)

    @model_validator(mode="after")
    def _sequences_fit_the_model(self) -> JobCreate:
        refused = sequence_refusal(self)
        if refused:
            raise ValueError(refused)
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


def table_refusal(spec: JobCreate) -> str | None:
    """Why this job cannot train on a table with categorical columns or missing values (its ONNX file
    takes raw columns: strings and nulls), or None. The API refuses it when data.columns is declared;
    the engine when the dataset's columns call for it."""
    if spec.framework != Framework.PYTORCH:
        return (f"categorical columns and missing values need framework 'pytorch', not "
                f"{spec.framework.value!r}; encode and fill them first for another framework")
    other = [f.value for f in spec.exports if f not in (ExportFormat.ONNX, ExportFormat.ONNX_INT8)]
    if other:
        return (f"a model taking categorical columns and missing values cannot be exported to {other}: "
                "its column encoding (each string looked up among the training categories, nulls filled) "
                "is part of the exported model, so that clients send raw rows, and a TorchScript model "
                "takes tensors of numbers, never strings; export 'onnx' (and 'onnx_int8' for int8 "
                "weights) instead")
    return None


def _int8_needs_onnx(framework: Framework, exports: list[ExportFormat]) -> None:
    """``onnx_int8`` quantizes the fp32 ONNX export, and falls back to it when dropped: both needed."""
    if ExportFormat.ONNX_INT8 not in exports:
        return
    if ExportFormat.ONNX not in FRAMEWORK_EXPORTS[framework]:
        raise ValueError(
            f"exports ['onnx_int8'] quantizes the ONNX export, which framework {framework.value!r} "
            "cannot write"
        )
    if ExportFormat.ONNX not in exports:
        raise ValueError(
            "exports ['onnx_int8'] quantizes the 'onnx' export and falls back to it when the int8 "
            "file scores worse than training.quantization_tolerance allows: list 'onnx' too"
        )


class Progress(BaseModel):
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    eta_seconds: float | None = None
    # Set when a worker took the job over and continued from a checkpoint: the first epoch it ran.
    resumed_from_epoch: int | None = None


# The key of the job's progress JSON that holds JobPublic.detail.
DETAIL_KEY = "detail"


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
    # Kept in the row's progress JSON (DETAIL_KEY); cleared once the job goes on.
    detail: str | None = Field(
        default=None, description="What a running job waits for, while it waits "
        "(e.g. 'waiting for MLflow at http://…: retry 2 of 5 in 10 s (connection refused)').",
    )
    created_at: UtcDatetime
    updated_at: UtcDatetime
    spec: JobCreate
