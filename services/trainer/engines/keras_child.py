"""The Keras training process: ``python -m services.trainer.engines.keras_child <folder> [--onnx]``.

Started by :mod:`services.trainer.engines.keras_job` with ``KERAS_BACKEND`` set (Keras picks its backend
once per process). ``<folder>`` holds ``job.json`` (the spec, the classes, where checkpoints,
exports and TensorBoard files go, what to resume from) and the prepared arrays as ``.npy``.
This process builds the model, runs ``model.fit`` with its callbacks, exports and checks the
model, and reports through :func:`services.trainer.engines.child.emit`:

- ``plan`` once, ``step`` during epochs (at most every half second, and at each epoch's end),
  ``epoch`` with the validation metrics (named and computed as in the PyTorch jobs) after
  every epoch, ``checkpoint`` once ``last.keras`` and ``state.json`` are written;
- ``failed`` with the reason, when training diverged or an export disagrees with Keras;
- ``result`` with the path of the JSON the parent turns into a FitOutcome.

With ``--onnx`` it trains nothing: it loads the serving model a TensorFlow-backend process left
as ``serving.keras`` and writes the ONNX export with this (torch) backend, checked against the
TensorFlow model's own answers on the validation rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.trainer.api.schemas import (
    METRIC_GOALS,
    ExportFormat,
    JobCreate,
    OptimizerName,
    Precision,
    SchedulerName,
    Task,
)
from services.trainer.engines import child
from services.trainer.engines.export import (
    INPUT_NAME,
    MAX_ABS_DIFF,
    MAX_IR_VERSION,
    OPSET,
    OUTPUT_NAMES,
    quiet_exporter,
)
from services.trainer.engines.keras_job import (
    ACK_FILE,
    CHECKPOINT_BEST,
    CHECKPOINT_MODEL,
    CHECKPOINT_STATE,
    CHECKPOINT_VERSION,
    JOB_FILE,
    ONNX_RESULT_FILE,
    REFERENCE,
    RESULT_FILE,
    SERVING_MODEL,
)

log = logging.getLogger("shipyard.trainer.keras_child")

STEP_EVENT_INTERVAL_S = 0.5
# The job process that started this one: if it goes away, so does this one (see ``orphaned``).
PARENT_PID = os.getppid()
PREDICT_BATCH = 4096


class Failed(Exception):
    """The job's error, reported to the parent as a ``failed`` event."""


@dataclass
class Job:
    folder: Path
    spec: JobCreate
    features: list[str]
    classes: list[Any]
    device: str
    checkpoint_dir: Path
    resume_dir: Path | None
    tensorboard_dir: Path
    exports_dir: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def task(self) -> Task:
        return self.spec.data.task

    @property
    def classification(self) -> bool:
        return self.task == Task.CLASSIFICATION

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.classification else 1

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.x_train) / self.spec.training.batch_size))

    def standardisation(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and variance of the training split; a constant column is left unscaled."""
        mean = self.x_train.mean(axis=0, dtype=np.float64)
        variance = self.x_train.var(axis=0, dtype=np.float64)
        variance = np.where(variance < 1e-24, 1.0, variance)
        return mean.astype(np.float32), variance.astype(np.float32)

    def target_scale(self) -> tuple[float, float]:
        """Regression trains on the standardised target (as the PyTorch jobs do); (mean, std)."""
        if self.classification:
            return 0.0, 1.0
        return float(self.y_train.mean()), float(self.y_train.std()) or 1.0


def load_job(folder: Path) -> Job:
    raw = json.loads((folder / JOB_FILE).read_text())
    arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False)
              for name in ("x_train", "y_train", "x_val", "y_val")}
    return Job(
        folder=folder, spec=JobCreate.model_validate(raw["spec"]), features=list(raw["features"]),
        classes=list(raw["classes"]), device=str(raw["device"]),
        checkpoint_dir=Path(raw["checkpoint_dir"]),
        resume_dir=Path(raw["resume_dir"]) if raw["resume_dir"] else None,
        tensorboard_dir=Path(raw["tensorboard_dir"]), exports_dir=Path(raw["exports_dir"]), **arrays,
    )


# --------------------------------------------------------------------------------------------
# Setup, model and optimizer


def backend_name() -> str:
    import keras

    return str(keras.backend.backend())


def configure(job: Job) -> None:
    """Seed, determinism and precision, before any model exists."""
    import keras

    training = job.spec.training
    if training.deterministic:
        if backend_name() == "tensorflow":
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()
        else:
            import torch

            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
    keras.utils.set_random_seed(int(training.seed))
    if training.precision == Precision.BF16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    elif training.precision == Precision.FP16:
        if running_device() != "cuda":  # the parent refuses this already; a GPU may have gone
            raise Failed("training.precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32'")
        keras.mixed_precision.set_global_policy("mixed_float16")


def running_device() -> str:
    if backend_name() == "tensorflow":
        import tensorflow as tf

        return "cuda" if tf.config.list_physical_devices("GPU") else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_core(job: Job) -> Any:
    """Raw feature rows → standardise → the spec's body → logits (or the standardised target)."""
    import keras
    from keras import layers

    spec = job.spec.model
    n_features = len(job.features)
    mean, variance = job.standardisation()
    inputs = keras.Input(shape=(n_features,), name=INPUT_NAME, dtype="float32")
    x = layers.Normalization(mean=mean, variance=variance, dtype="float32", name="standardise")(inputs)
    if spec.type == "mlp":
        for width in spec.hidden:
            x = layers.Dense(width, activation="relu")(x)
            if spec.dropout > 0:
                x = layers.Dropout(spec.dropout)(x)
    elif spec.type == "cnn":
        channels, height, width = spec.input_shape
        # The spec's shape is PyTorch's (C, H, W); Keras convolves channels-last (H, W, C).
        x = layers.Reshape((channels, height, width))(x)
        x = layers.Permute((2, 3, 1))(x)
        for filters in spec.channels:
            x = layers.Conv2D(filters, spec.kernel_size, padding="same")(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
            x = layers.MaxPooling2D(2, padding="same")(x)
        x = layers.Flatten()(x)
        x = layers.Dense(spec.hidden, activation="relu")(x)
        if spec.dropout > 0:
            x = layers.Dropout(spec.dropout)(x)
    elif spec.type in ("lstm", "gru"):
        steps = spec.sequence_length
        x = layers.Reshape((steps, n_features // steps))(x)
        cell = layers.LSTM if spec.type == "lstm" else layers.GRU
        for index in range(spec.num_layers):
            last = index == spec.num_layers - 1
            recurrent = cell(spec.hidden_size, return_sequences=not last)
            x = layers.Bidirectional(recurrent)(x) if spec.bidirectional else recurrent(x)
            if not last and spec.dropout > 0:  # between layers, as nn.LSTM's dropout
                x = layers.Dropout(spec.dropout)(x)
    else:  # the schema allows only the types above for framework keras
        raise Failed(f"model.type {spec.type!r} is not available with framework 'keras'")
    # float32 whatever the policy: softmax and the loss stay accurate under mixed precision.
    outputs = layers.Dense(job.n_outputs, dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name=f"shipyard_{spec.type}")


def build_serving(job: Job, core: Any) -> Any:
    """The exported model: the trained weights in float32, softmax or the target's units on top."""
    import keras
    from keras import layers

    keras.mixed_precision.set_global_policy("float32")
    fresh = build_core(job)
    fresh.set_weights(core.get_weights())
    if job.classification:
        out = layers.Softmax(name=OUTPUT_NAMES[Task.CLASSIFICATION])(fresh.output)
    else:
        mean, std = job.target_scale()
        out = layers.Rescaling(scale=std, offset=mean, name=OUTPUT_NAMES[Task.REGRESSION])(fresh.output)
    return keras.Model(fresh.input, out, name="serving")


def build_optimizer(job: Job) -> Any:
    import keras

    training = job.spec.training
    common: dict[str, Any] = {"learning_rate": training.learning_rate}
    if training.grad_clip_norm is not None:
        # The norm of all gradients together, as torch.nn.utils.clip_grad_norm_ (``clipnorm``
        # would clip each variable's gradient on its own).
        common["global_clipnorm"] = training.grad_clip_norm
    decay = training.weight_decay
    match training.optimizer:
        case OptimizerName.SGD:
            return keras.optimizers.SGD(momentum=training.momentum or 0.0,
                                        weight_decay=decay or None, **common)
        case OptimizerName.ADAM:
            return keras.optimizers.Adam(epsilon=1e-8, weight_decay=decay or None, **common)
        case OptimizerName.ADAMW:
            return keras.optimizers.AdamW(epsilon=1e-8, weight_decay=decay, **common)
        case OptimizerName.RMSPROP:  # PyTorch's defaults, so that the same spec trains alike
            return keras.optimizers.RMSprop(rho=0.99, epsilon=1e-8, weight_decay=decay or None, **common)
    raise AssertionError(training.optimizer)


def compile_model(job: Job, model: Any) -> None:
    import keras

    loss = (keras.losses.SparseCategoricalCrossentropy(from_logits=True) if job.classification
            else keras.losses.MeanSquaredError())
    model.compile(optimizer=build_optimizer(job), loss=loss, jit_compile=False)


# --------------------------------------------------------------------------------------------
# Callbacks


@dataclass
class RunState:
    """What the callbacks share, and what a checkpoint keeps of it."""

    epochs: int
    batches: int
    step: int = 0
    last_good: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    confusion: list[list[int]] | None = None
    epoch: int = 0  # 1-based, the epoch running now
    lr: float = 0.0  # the rate the running epoch started with
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoints: int = 0  # how many this process has written

    def diverged(self, what: str, batch: int) -> Failed:
        good = f"the last good epoch was {self.last_good}" if self.last_good else "no epoch finished"
        return Failed(
            f"training diverged: {what} is not finite at epoch {self.epoch}, step {self.step} "
            f"(batch {batch} of {self.batches}); {good}; try a smaller learning_rate or set grad_clip_norm"
        )


def current_lr(model: Any) -> float:
    import keras

    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def validation_scores(job: Job, out: np.ndarray) -> tuple[float, dict[str, float], list[list[int]] | None]:
    """(val_loss, metrics, confusion) from the core model's outputs on the validation rows.

    The loss is the training loss (cross-entropy on logits; MSE on the standardised target); the
    metrics are :func:`services.trainer.engines.engine.validation_metrics`, the PyTorch jobs' own code.
    """
    import torch

    from services.trainer.engines import engine
    from services.trainer.engines.types import TabularData

    out = out.astype(np.float64)
    if job.classification:
        labels = job.y_val.astype(np.int64)
        top = out.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(out - top).sum(axis=1))
        loss = float(np.mean(log_norm - out[np.arange(len(labels)), labels])) if len(labels) else 0.0
        y = torch.from_numpy(labels)
    else:
        mean, std = job.target_scale()
        target = job.y_val.astype(np.float64).reshape(-1, 1)
        loss = float(np.mean((out - (target - mean) / std) ** 2)) if len(target) else 0.0
        out = out * std + mean
        y = torch.from_numpy(target)
    data = TabularData(
        features=job.features, target=job.spec.data.target, task=job.task,
        x_train=job.x_train, y_train=job.y_train, x_val=job.x_val, y_val=job.y_val, classes=job.classes,
    )
    scores, confusion = engine.validation_metrics(data, torch.from_numpy(out), y)
    return loss, scores, confusion


def make_callbacks(job: Job, state: RunState, resumed: dict[str, Any] | None,
                   best_weights: list[np.ndarray] | None) -> tuple[list[Any], Any]:
    """The callbacks in the order they must run at an epoch's end; and the early stopper, if any."""
    import keras

    training = job.spec.training
    callbacks: list[Any] = lr_schedule(job)
    callbacks += [progress_callback(state), validation_callback(job, state)]
    stopper = early_stopper(job, resumed, best_weights)
    if stopper is not None:
        callbacks.append(stopper)
    plateau: Any = None
    if training.scheduler.name == SchedulerName.PLATEAU:
        plateau = plateau_callback(job, resumed)
        callbacks.append(plateau)
    callbacks.append(tensorboard_callback(job.tensorboard_dir, state))
    # Saved before the epoch is reported, so that a reported epoch always has its checkpoint:
    # the model with its optimizer state, written beside the checkpoint folder and moved in whole.
    staged = job.folder / "staging" / CHECKPOINT_MODEL
    staged.parent.mkdir(parents=True, exist_ok=True)
    callbacks.append(keras.callbacks.ModelCheckpoint(filepath=str(staged), save_weights_only=False,
                                                     verbose=0))
    callbacks += [checkpoint_callback(job, state, staged, stopper, plateau), epoch_callback(state)]
    return callbacks, stopper


def lr_schedule(job: Job) -> list[Any]:
    """A LearningRateScheduler for ``step`` and ``cosine``, stepped per epoch as in PyTorch; else none."""
    import keras

    training = job.spec.training
    scheduler = training.scheduler
    base_lr, epochs = training.learning_rate, training.epochs
    if scheduler.name == SchedulerName.STEP:
        # Epoch index e (from 0) runs at base·γ^(e // step_size), as StepLR stepped once per epoch.
        return [keras.callbacks.LearningRateScheduler(
            lambda e, lr: base_lr * scheduler.gamma ** (e // scheduler.step_size))]
    if scheduler.name == SchedulerName.COSINE:
        # CosineAnnealingLR(T_max=epochs) stepped once per epoch, down towards 0.
        return [keras.callbacks.LearningRateScheduler(
            lambda e, lr: base_lr * (1 + math.cos(math.pi * e / epochs)) / 2)]
    if scheduler.name == SchedulerName.ONECYCLE:  # the parent refuses it already
        raise Failed("training.scheduler 'onecycle' is not available with framework 'keras'")
    return []


def progress_callback(state: RunState) -> Any:
    import keras

    class Progress(keras.callbacks.Callback):
        """Counts steps, stops on a non-finite loss, reports progress (throttled)."""

        def __init__(self) -> None:
            super().__init__()
            self.last_event = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            state.epoch = epoch + 1
            state.lr = current_lr(self.model)

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            state.step += 1
            orphaned()
            loss = (logs or {}).get("loss")
            # Keras reports the epoch's running mean: once one batch's loss is not finite, neither is it.
            if loss is not None and not math.isfinite(float(loss)):
                raise state.diverged(f"the loss ({float(loss)})", batch + 1)
            now = time.monotonic()
            if now - self.last_event >= STEP_EVENT_INTERVAL_S or batch + 1 == state.batches:
                self.last_event = now
                child.emit("step", epoch=state.epoch, step=state.step)

    return Progress()


def validation_callback(job: Job, state: RunState) -> Any:
    import keras

    class ValidationMetrics(keras.callbacks.Callback):
        """The PyTorch jobs' epoch metrics, put into ``logs`` for the callbacks after this one."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            logs = logs if logs is not None else {}
            out = np.asarray(self.model.predict(job.x_val, batch_size=PREDICT_BATCH, verbose=0))
            train_loss = float(logs.get("loss", math.nan))
            if not math.isfinite(train_loss):
                raise state.diverged(f"the loss ({train_loss})", state.batches)
            if not np.isfinite(out).all():
                raise state.diverged("the validation output", state.batches)
            val_loss, scores, confusion = validation_scores(job, out)
            if not math.isfinite(val_loss):
                raise state.diverged(f"the validation loss ({val_loss})", state.batches)
            metrics = {"train_loss": train_loss, "val_loss": val_loss, **scores, "lr": state.lr}
            logs.update(metrics)
            state.metrics, state.confusion = metrics, confusion
            state.last_good = epoch + 1
            state.history.append({"epoch": float(epoch + 1), **metrics})

    return ValidationMetrics()


def early_stopper(job: Job, resumed: dict[str, Any] | None, best_weights: list[np.ndarray] | None) -> Any:
    """``training.early_stopping`` as Keras's EarlyStopping, carrying on where a lost worker stopped."""
    import keras

    stopping = job.spec.training.early_stopping
    if stopping is None:
        return None

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            super().on_train_begin(logs)
            saved = (resumed or {}).get("early_stopping")
            if saved:
                self.wait, self.best = int(saved["wait"]), saved["best"]
                self.best_epoch = int(saved["best_epoch"])
                self.best_weights = best_weights

    return ResumableEarlyStopping(
        monitor=stopping.metric, patience=stopping.patience, min_delta=stopping.min_delta,
        mode="max" if METRIC_GOALS[stopping.metric] else "min",
        restore_best_weights=stopping.restore_best, verbose=0,
    )


def plateau_callback(job: Job, resumed: dict[str, Any] | None) -> Any:
    """The ``plateau`` scheduler as Keras's ReduceLROnPlateau, carrying on where a lost worker stopped."""
    import keras

    scheduler = job.spec.training.scheduler

    class ResumablePlateau(keras.callbacks.ReduceLROnPlateau):
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            super().on_train_begin(logs)
            saved = (resumed or {}).get("plateau")
            if saved:
                self.wait, self.best = int(saved["wait"]), saved["best"]
                self.cooldown_counter = int(saved["cooldown_counter"])

    # ReduceLROnPlateau(patience=p) in PyTorch cuts after p + 1 epochs without improvement.
    return ResumablePlateau(monitor="val_loss", mode="min", factor=scheduler.gamma,
                            patience=scheduler.patience + 1, verbose=0)


def checkpoint_callback(job: Job, state: RunState, staged: Path, stopper: Any, plateau: Any) -> Any:
    import keras

    class CheckpointState(keras.callbacks.Callback):
        """After ModelCheckpoint wrote ``last.keras``: move it in, write the rest, then ``checkpoint``.

        The parent uploads the folder while this process goes on with the next epoch, so every
        file appears there whole (an ``os.replace``), the model first and the state last.
        """

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            directory = job.checkpoint_dir
            _move_into(staged, directory / CHECKPOINT_MODEL)
            saved: dict[str, Any] = {
                "version": CHECKPOINT_VERSION, "backend": backend_name(), "epoch": epoch + 1,
                "step": state.step, "last_good": state.last_good, "history": state.history,
                "confusion": state.confusion,
                "stopped_early": bool(self.model.stop_training) and epoch + 1 < state.epochs,
                "early_stopping": None, "plateau": None,
            }
            if stopper is not None:
                saved["early_stopping"] = {"wait": stopper.wait, "best": _plain(stopper.best),
                                           "best_epoch": stopper.best_epoch}
                if stopper.best_weights is not None and (stopper.best_epoch == epoch
                                                         or not (directory / CHECKPOINT_BEST).exists()):
                    _write_atomic(directory / CHECKPOINT_BEST,
                                  lambda f: np.savez(f, *stopper.best_weights), staged.parent)
            if plateau is not None:
                saved["plateau"] = {"wait": plateau.wait, "best": _plain(plateau.best),
                                    "cooldown_counter": plateau.cooldown_counter}
            _write_atomic(directory / CHECKPOINT_STATE, lambda f: f.write(json.dumps(saved).encode()),
                          staged.parent)
            state.checkpoints += 1
            child.emit("checkpoint")
            wait_for_upload(job.folder / ACK_FILE, state.checkpoints)

    return CheckpointState()


def tensorboard_callback(folder: Path, state: RunState) -> Any:
    import keras

    class TensorBoardScalars(keras.callbacks.Callback):
        """The epoch's metrics as TensorBoard scalars, tagged as the PyTorch jobs tag them."""

        def __init__(self) -> None:
            super().__init__()
            import tensorflow as tf  # Keras has imported it already (set_random_seed seeds it)

            folder.mkdir(parents=True, exist_ok=True)
            self.tf = tf
            self.writer = tf.summary.create_file_writer(str(folder))

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            with self.writer.as_default():
                for name, value in state.metrics.items():
                    tag = name.replace("val_", "val/", 1).replace("train_", "train/", 1)
                    self.tf.summary.scalar(tag, value, step=epoch + 1)
            self.writer.flush()

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            self.writer.close()

    return TensorBoardScalars()


def epoch_callback(state: RunState) -> Any:
    import keras

    class MlflowLogger(keras.callbacks.Callback):
        """Reports the epoch's metrics; the parent's observer logs them to MLflow and the job row."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            child.emit("epoch", epoch=epoch + 1, step=state.step, metrics=state.metrics)

    return MlflowLogger()


def orphaned() -> None:
    """Exit if the job process is gone (a lost worker): nobody would read what this one does."""
    if os.getppid() != PARENT_PID:
        raise SystemExit("the job process that started this training is gone")


def wait_for_upload(ack: Path, count: int) -> None:
    """Block until the parent has uploaded checkpoint number ``count`` (see keras_job.acknowledging)."""
    while True:
        try:
            if int(ack.read_text()) >= count:
                return
        except (FileNotFoundError, ValueError):
            pass
        orphaned()
        time.sleep(0.005)


def _plain(value: Any) -> Any:
    if value is None:
        return None
    number = float(np.asarray(value))
    return number if math.isfinite(number) else None


def _move_into(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError:  # another file system: copy beside the target, then rename
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def _write_atomic(path: Path, write: Any, staging: Path) -> None:
    tmp = staging / path.name
    with open(tmp, "wb") as handle:
        write(handle)
    _move_into(tmp, path)


# --------------------------------------------------------------------------------------------
# Resume


def load_resume(job: Job) -> tuple[Any, dict[str, Any], list[np.ndarray] | None] | None:
    """The lost worker's model (with its optimizer state), its state file and best weights; or None."""
    import keras

    if job.resume_dir is None:
        return None
    model_path, state_path = job.resume_dir / CHECKPOINT_MODEL, job.resume_dir / CHECKPOINT_STATE
    if not model_path.is_file() or not state_path.is_file():
        log.info("no Keras checkpoint to resume from; training starts at epoch 1")
        return None
    try:
        state = json.loads(state_path.read_text())
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{state_path} is not a version-{CHECKPOINT_VERSION} Shipyard Keras checkpoint")
        if state.get("backend") != backend_name():
            raise ValueError(f"it was written by the {state.get('backend')} backend")
        model = keras.saving.load_model(model_path, safe_mode=True)
        # The two files are written one after the other while training goes on; an upload that
        # caught last.keras from a later epoch than state.json must not pass for that epoch.
        optimizer = model.optimizer
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):  # it may skip steps
            iterations = int(keras.ops.convert_to_numpy(optimizer.iterations))
            if iterations != int(state["step"]):
                raise ValueError(f"{CHECKPOINT_MODEL} holds {iterations} optimizer steps, "
                                 f"{CHECKPOINT_STATE} says {state['step']}")
        best: list[np.ndarray] | None = None
        best_path = job.resume_dir / CHECKPOINT_BEST
        if state.get("early_stopping") and best_path.is_file():
            with np.load(best_path, allow_pickle=False) as saved:
                best = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    except Exception as exc:  # a torn or foreign file: training from scratch still gives a model
        log.warning("could not read the checkpoint (%s); training starts at epoch 1", exc)
        return None
    return model, state, best


# --------------------------------------------------------------------------------------------
# Exports


def _allowed(task: Task, reference: np.ndarray) -> float:
    # Probabilities lie in [0, 1]; a regression answers in the target's units, where float32
    # alone is off by more than 1e-4 past ~1000, so the bound grows with the largest output.
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return MAX_ABS_DIFF * (1.0 if task == Task.CLASSIFICATION else max(1.0, scale))


def _difference(name: str, task: Task, exported: np.ndarray, reference: np.ndarray) -> float:
    if exported.shape != reference.shape:
        raise Failed(f"the {name} export's output shape {exported.shape} differs from "
                     f"Keras's {reference.shape}")
    diff = float(np.max(np.abs(exported.astype(np.float64) - reference))) if reference.size else 0.0
    allowed = _allowed(task, reference)
    if not math.isfinite(diff) or diff > allowed:
        raise Failed(
            f"the {name} export disagrees with Keras by {diff:.3g} (more than {allowed:.3g}) "
            "on held-out rows; the model was not registered"
        )
    return diff


def export_onnx(serving: Any, job: Job, reference: np.ndarray) -> dict[str, Any]:
    """ONNX through Keras's own exporter (torch backend): input ``input``, output named for the task."""
    import onnx
    import onnxruntime as ort

    path = job.exports_dir / "onnx" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_exporter(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # and Keras's own, on top of the exporters'
        serving.export(str(path), format="onnx", verbose=False, opset_version=OPSET)
    proto = onnx.load(str(path))
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise Failed(f"the ONNX export has {len(graph.input)} inputs and {len(graph.output)} outputs; "
                     "expected one of each")
    _rename(graph, graph.input[0].name, INPUT_NAME)
    _rename(graph, graph.output[0].name, OUTPUT_NAMES[job.task])
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = np.ascontiguousarray(job.x_val, dtype=np.float32)
    (out,) = session.run(None, {INPUT_NAME: rows})
    diff = _difference("ONNX", job.task, np.asarray(out), reference)

    def describe(arg: Any) -> dict[str, Any]:
        shape = [dim if isinstance(dim, int) else None for dim in arg.shape]
        dtype = {"tensor(float)": "float32", "tensor(double)": "float64"}.get(arg.type, arg.type)
        return {"name": arg.name, "shape": shape, "dtype": dtype}

    signature = {"inputs": [describe(a) for a in session.get_inputs()],
                 "outputs": [describe(a) for a in session.get_outputs()]}
    log.info("ONNX export: max |difference| from Keras on %d held-out rows = %.3g", len(rows), diff)
    return {"format": ExportFormat.ONNX.value, "path": str(path), "max_abs_diff": diff,
            "signature": signature}


def _rename(graph: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def export_savedmodel(serving: Any, job: Job, reference: np.ndarray) -> dict[str, Any]:
    """A TF SavedModel whose ``serving_default`` signature maps ``input`` to the task's output name."""
    import keras
    import tensorflow as tf

    path = job.exports_dir / "savedmodel"
    output = OUTPUT_NAMES[job.task]
    archive = keras.export.ExportArchive()
    archive.track(serving)

    def serve(input: Any) -> dict[str, Any]:  # noqa: A002 - the signature's input name
        return {output: serving(input, training=False)}

    archive.add_endpoint(
        name="serving_default", fn=serve,
        input_signature=[tf.TensorSpec(shape=(None, len(job.features)), dtype=tf.float32, name=INPUT_NAME)],
    )
    archive.write_out(str(path), verbose=False)

    loaded = tf.saved_model.load(str(path))
    function = loaded.signatures["serving_default"]
    answers = function(**{INPUT_NAME: tf.constant(np.ascontiguousarray(job.x_val, dtype=np.float32))})
    diff = _difference("SavedModel", job.task, answers[output].numpy(), reference)

    def describe(name: str, spec: Any) -> dict[str, Any]:
        return {"name": name, "shape": list(spec.shape.as_list()), "dtype": spec.dtype.name}

    signature = {
        "inputs": [describe(n, s) for n, s in sorted(function.structured_input_signature[1].items())],
        "outputs": [describe(n, s) for n, s in sorted(function.structured_outputs.items())],
        "signature_defs": sorted(loaded.signatures.keys()),
    }
    log.info("SavedModel export: max |difference| from Keras on %d held-out rows = %.3g",
             len(job.x_val), diff)
    return {"format": ExportFormat.SAVEDMODEL.value, "path": str(path), "max_abs_diff": diff,
            "signature": signature}


# --------------------------------------------------------------------------------------------
# The two entry points


def train(job: Job) -> dict[str, Any]:
    import keras

    training = job.spec.training
    configure(job)
    device = running_device()
    state = RunState(epochs=training.epochs, batches=job.steps_per_epoch)
    resumed = load_resume(job)
    saved: dict[str, Any] | None = None
    best_weights: list[np.ndarray] | None = None
    first_epoch = 1
    if resumed is not None:
        core, saved, best_weights = resumed
        first_epoch = int(saved["epoch"]) + 1
        state.step, state.last_good = int(saved["step"]), int(saved["last_good"])
        state.history, state.confusion = list(saved["history"]), saved["confusion"]
        if state.history:
            state.metrics = {k: v for k, v in state.history[-1].items() if k != "epoch"}
        log.info("resuming at epoch %d from the checkpoint", first_epoch)
    else:
        core = build_core(job)
        compile_model(job, core)
    stopped_early = bool(saved and saved["stopped_early"])
    if stopped_early:  # it had stopped early: nothing left to train
        first_epoch = training.epochs + 1
    y_fit = job.y_train
    if not job.classification:
        mean, std = job.target_scale()
        y_fit = ((job.y_train - mean) / std).astype(np.float32)
    callbacks, stopper = make_callbacks(job, state, saved, best_weights)
    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    child.emit("plan", steps=job.steps_per_epoch * training.epochs)

    started = time.monotonic()
    if first_epoch <= training.epochs:
        core.fit(job.x_train, y_fit, batch_size=training.batch_size, epochs=training.epochs,
                 initial_epoch=first_epoch - 1, shuffle=True, verbose=0, callbacks=callbacks)
    seconds = time.monotonic() - started

    best_epoch: int | None = None
    stopping = training.early_stopping
    if stopping is not None:
        if stopper.stopped_epoch > 0:
            stopped_early = stopper.stopped_epoch + 1 < training.epochs
        if first_epoch <= training.epochs:
            best_epoch = int(stopper.best_epoch) + 1
        elif saved and saved.get("early_stopping"):
            best_epoch = int(saved["early_stopping"]["best_epoch"]) + 1
            if stopping.restore_best and best_weights is not None:
                core.set_weights(best_weights)  # fit did not run, so EarlyStopping restored nothing
    if not state.history:
        raise Failed("no epoch finished")
    metrics = {k: v for k, v in state.history[-1].items() if k != "epoch"}
    if best_epoch is not None and stopping is not None and stopping.restore_best:
        for entry in state.history:
            if int(entry["epoch"]) == best_epoch:
                metrics = {k: v for k, v in entry.items() if k != "epoch"}
    out = np.asarray(core.predict(job.x_val, batch_size=PREDICT_BATCH, verbose=0))
    _, _, confusion = validation_scores(job, out)

    serving = build_serving(job, core)
    reference = np.asarray(serving.predict(job.x_val, batch_size=PREDICT_BATCH, verbose=0), dtype=np.float64)
    exports: list[dict[str, Any]] = []
    backend = backend_name()
    for fmt in job.spec.exports:
        if fmt == ExportFormat.SAVEDMODEL:
            exports.append(export_savedmodel(serving, job, reference))
        elif fmt == ExportFormat.ONNX and backend == "torch":
            exports.append(export_onnx(serving, job, reference))
        elif fmt == ExportFormat.ONNX:
            # tf2onnx is not installed: a torch-backend process exports this file (see keras_job).
            serving.save(job.folder / SERVING_MODEL)
            np.save(job.folder / REFERENCE, reference, allow_pickle=False)
        else:
            raise Failed(f"export {fmt.value!r} is not available with framework 'keras'")
    layers = [layer for layer in core.layers if type(layer).__name__ != "InputLayer"]
    card = {
        "parameters": int(core.count_params()),
        "architecture": " → ".join(type(layer).__name__ for layer in layers),
        "backend": backend,
        "keras_version": keras.__version__,
    }
    return {
        "metrics": metrics, "history": state.history, "confusion": confusion if job.classification else None,
        "best_epoch": best_epoch, "stopped_early": stopped_early, "seconds": seconds,
        "device": device if job.device == "cuda" else "cpu", "exports": exports, "card": card,
    }


def export_from_saved(job: Job) -> dict[str, Any]:
    """``--onnx``: the ONNX export of a model another backend trained and saved."""
    import keras

    if backend_name() != "torch":
        raise Failed("the ONNX export of a Keras model needs the torch backend here "
                     "(tf2onnx is not installed)")
    serving = keras.saving.load_model(job.folder / SERVING_MODEL, safe_mode=True)
    reference = np.load(job.folder / REFERENCE, allow_pickle=False)
    here = np.asarray(serving.predict(job.x_val, batch_size=PREDICT_BATCH, verbose=0), dtype=np.float64)
    log.info("the saved model under the torch backend differs from the trained one by %.3g",
             float(np.max(np.abs(here - reference))) if reference.size else 0.0)
    return {"exports": [export_onnx(serving, job, reference)]}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    folder = Path(args[0])
    onnx_only = "--onnx" in args[1:]
    job = load_job(folder)
    try:
        result = export_from_saved(job) if onnx_only else train(job)
    except Failed as exc:
        child.emit("failed", message=str(exc))
        return 1
    path = folder / (ONNX_RESULT_FILE if onnx_only else RESULT_FILE)
    path.write_text(json.dumps(result))
    child.emit("result", path=str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
