"""The Keras child's callbacks: progress, the PyTorch jobs' validation metrics, the schedulers,
early stopping, TensorBoard, the checkpoint and the epoch report, in the order they must run.

:class:`RunState` is what they share, and what a checkpoint keeps of it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.trainer.engines import child
from services.trainer.engines.keras_checkpoint import (
    move_into,
    orphaned,
    plain_number,
    wait_for_upload,
    write_atomic,
)
from services.trainer.engines.keras_job import (
    ACK_FILE,
    CHECKPOINT_BEST,
    CHECKPOINT_MODEL,
    CHECKPOINT_STATE,
    CHECKPOINT_VERSION,
)
from services.trainer.engines.keras_setup import PREDICT_BATCH, Failed, Job, backend_name
from services.trainer.jobs.schemas import METRIC_GOALS, SchedulerName

STEP_EVENT_INTERVAL_S = 0.5


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

    class Progress(keras.callbacks.Callback):  # type: ignore[misc]
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

    class ValidationMetrics(keras.callbacks.Callback):  # type: ignore[misc]
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

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):  # type: ignore[misc]
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

    class ResumablePlateau(keras.callbacks.ReduceLROnPlateau):  # type: ignore[misc]
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

    class CheckpointState(keras.callbacks.Callback):  # type: ignore[misc]
        """After ModelCheckpoint wrote ``last.keras``: move it in, write the rest, then ``checkpoint``.

        The parent uploads the folder while this process goes on with the next epoch, so every
        file appears there whole (an ``os.replace``), the model first and the state last.
        """

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            directory = job.checkpoint_dir
            move_into(staged, directory / CHECKPOINT_MODEL)
            saved: dict[str, Any] = {
                "version": CHECKPOINT_VERSION, "backend": backend_name(), "epoch": epoch + 1,
                "step": state.step, "last_good": state.last_good, "history": state.history,
                "confusion": state.confusion,
                "stopped_early": bool(self.model.stop_training) and epoch + 1 < state.epochs,
                "early_stopping": None, "plateau": None,
            }
            if stopper is not None:
                saved["early_stopping"] = {"wait": stopper.wait, "best": plain_number(stopper.best),
                                           "best_epoch": stopper.best_epoch}
                if stopper.best_weights is not None and (stopper.best_epoch == epoch
                                                         or not (directory / CHECKPOINT_BEST).exists()):
                    write_atomic(directory / CHECKPOINT_BEST,
                                  lambda f: np.savez(f, *stopper.best_weights), staged.parent)
            if plateau is not None:
                saved["plateau"] = {"wait": plateau.wait, "best": plain_number(plateau.best),
                                    "cooldown_counter": plateau.cooldown_counter}
            write_atomic(directory / CHECKPOINT_STATE, lambda f: f.write(json.dumps(saved).encode()),
                          staged.parent)
            state.checkpoints += 1
            child.emit("checkpoint")
            wait_for_upload(job.folder / ACK_FILE, state.checkpoints)

    return CheckpointState()


def tensorboard_callback(folder: Path, state: RunState) -> Any:
    import keras

    class TensorBoardScalars(keras.callbacks.Callback):  # type: ignore[misc]
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

    class MlflowLogger(keras.callbacks.Callback):  # type: ignore[misc]
        """Reports the epoch's metrics; the parent's observer logs them to MLflow and the job row."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            child.emit("epoch", epoch=epoch + 1, step=state.step, metrics=state.metrics)

    return MlflowLogger()
