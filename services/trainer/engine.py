"""The training loop: tabular data in, a fitted PyTorch MLP out.

Nothing here knows about jobs, databases or MLflow; :mod:`services.trainer.job` wires those
in through the ``observer`` callback. The fitted module takes raw feature rows: the
standardisation fitted on the training split lives inside it as buffers, so that whoever
serves the exported model cannot forget it or apply another one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from services.trainer.schemas import METRIC_GOALS, JobCreate, OptimizerName, SchedulerName, Task
from shipyard_common.errors import InvalidInput, ShipyardError

# (epoch, global step, metrics at the end of an epoch or None mid-epoch) → may raise to stop.
Observer = Callable[[int, int, dict[str, float] | None], None]
# Receives the full training state at the end of every epoch (see :func:`load_checkpoint`).
Checkpointer = Callable[[dict[str, Any]], None]

CHECKPOINT_VERSION = 1


class TrainingFailed(ShipyardError):
    """The job's inputs were fine, but training or exporting did not produce a usable model."""

    code = "training_failed"


@dataclass(frozen=True)
class TabularData:
    features: list[str]
    target: str
    task: Task
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    # Classification: the label each output column stands for, in output order.
    classes: list[Any] = field(default_factory=list)


def prepare_data(frame: pd.DataFrame, spec: JobCreate) -> TabularData:
    """Pick the columns, check them, and split train/validation (stratified for classification)."""
    from sklearn.model_selection import train_test_split

    data = spec.data
    columns = [str(c) for c in frame.columns]
    features = list(data.features) if data.features is not None else [c for c in columns if c != data.target]
    missing = [c for c in [data.target, *features] if c not in columns]
    if missing:
        raise InvalidInput(
            f"dataset {data.dataset!r} at {data.rev[:12]} has no column(s) {missing}; "
            f"its columns are {columns[:50]}"
        )
    if not features:
        raise InvalidInput(f"dataset {data.dataset!r} has no feature columns besides the target")
    not_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    if not_numeric:
        raise InvalidInput(f"feature column(s) {not_numeric[:20]} are not numeric; encode them first")
    with_gaps = [c for c in [*features, data.target] if frame[c].isna().any()]
    if with_gaps:
        raise InvalidInput(f"column(s) {with_gaps[:20]} have missing values; fill or drop them first")

    x = frame[features].to_numpy(dtype=np.float32)
    target = frame[data.target]
    classes: list[Any] = []
    stratify = None
    if data.task == Task.CLASSIFICATION:
        classes = sorted(target.unique().tolist())
        if len(classes) < 2:
            raise InvalidInput(f"target {data.target!r} has {len(classes)} class; classification needs two")
        index = {label: i for i, label in enumerate(classes)}
        y = target.map(index).to_numpy(dtype=np.int64)
        stratify = y
    else:
        if not pd.api.types.is_numeric_dtype(target):
            raise InvalidInput(f"target {data.target!r} is not numeric; regression needs a number")
        y = target.to_numpy(dtype=np.float32).reshape(-1, 1)
    try:
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=data.validation_split, random_state=spec.training.seed, stratify=stratify
        )
    except ValueError as exc:  # too few rows, or a class too small to appear on both sides
        raise InvalidInput(f"cannot split {len(frame)} rows for validation: {exc}") from exc
    return TabularData(
        features=features, target=data.target, task=data.task,
        x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
        classes=[_plain(c) for c in classes],
    )


def _plain(value: Any) -> Any:
    # numpy scalars do not survive json.dumps; labels end up in a registry tag.
    return value.item() if isinstance(value, np.generic) else value


class TabularMLP(nn.Module):
    """Standardise → (Linear → ReLU → Dropout)* → Linear, on raw feature rows.

    For regression the target is standardised too (the loss then does not depend on the
    target's units) and the output is mapped back, so ``forward`` answers in target units.
    """

    mean: torch.Tensor
    std: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor

    def __init__(
        self,
        *,
        mean: np.ndarray,
        std: np.ndarray,
        hidden: list[int],
        outputs: int,
        dropout: float,
        target_mean: float = 0.0,
        target_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.register_buffer("target_mean", torch.tensor(target_mean, dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(target_std, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = int(mean.shape[0])
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net((x - self.mean) / self.std)
        return out * self.target_std + self.target_mean

    def scale_target(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.target_mean) / self.target_std


@dataclass
class TrainResult:
    model: TabularMLP
    metrics: dict[str, float]
    device: str
    seconds: float
    # One entry per finished epoch: {"epoch": n, "lr": …, "train_loss": …, "val_…": …}.
    history: list[dict[str, float]] = field(default_factory=list)
    # Classification: rows are true classes, columns predicted, both in ``classes`` order,
    # for the weights that were returned (the best epoch's when restored).
    confusion: list[list[int]] | None = None
    best_epoch: int | None = None
    stopped_early: bool = False


def pick_device(queue: str) -> str:
    """CUDA for jobs sent to the gpu queue when this worker has it; the job records which ran."""
    return "cuda" if queue == "gpu" and torch.cuda.is_available() else "cpu"


def build_model(data: TabularData, spec: JobCreate) -> TabularMLP:
    mean = data.x_train.mean(axis=0)
    std = data.x_train.std(axis=0)
    # A constant column would divide by zero; leave it centred and unscaled.
    std = np.where(std < 1e-12, 1.0, std)
    target_mean, target_std = 0.0, 1.0
    if data.task == Task.REGRESSION:
        target_mean = float(data.y_train.mean())
        target_std = float(data.y_train.std()) or 1.0
    return TabularMLP(
        mean=mean, std=std, hidden=list(spec.model.hidden),
        outputs=len(data.classes) if data.task == Task.CLASSIFICATION else 1,
        dropout=spec.model.dropout, target_mean=target_mean, target_std=target_std,
    )


def build_optimizer(model: nn.Module, spec: JobCreate) -> torch.optim.Optimizer:
    training = spec.training
    lr, decay = training.learning_rate, training.weight_decay
    match training.optimizer:
        case OptimizerName.SGD:
            momentum = training.momentum or 0.0
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=decay)
        case OptimizerName.ADAM:
            return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=decay)
        case OptimizerName.ADAMW:
            return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)
        case OptimizerName.RMSPROP:
            return torch.optim.RMSprop(model.parameters(), lr=lr, weight_decay=decay)
    raise AssertionError(training.optimizer)


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: JobCreate, *, updates_per_epoch: int
) -> Any:
    """The spec's LR scheduler, or None. ``onecycle`` steps per optimizer update, the rest per epoch."""
    from torch.optim import lr_scheduler

    scheduler, epochs = spec.training.scheduler, spec.training.epochs
    match scheduler.name:
        case SchedulerName.NONE:
            return None
        case SchedulerName.STEP:
            return lr_scheduler.StepLR(optimizer, step_size=scheduler.step_size, gamma=scheduler.gamma)
        case SchedulerName.COSINE:
            return lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        case SchedulerName.ONECYCLE:
            return lr_scheduler.OneCycleLR(
                optimizer, max_lr=spec.training.learning_rate, epochs=epochs,
                steps_per_epoch=updates_per_epoch,
            )
        case SchedulerName.PLATEAU:
            return lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=scheduler.gamma, patience=scheduler.patience
            )
    raise AssertionError(scheduler.name)


def validation_metrics(
    data: TabularData, out: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, float], list[list[int]] | None]:
    """Validation metrics from the model's outputs, computed by scikit-learn; and the confusion matrix."""
    from sklearn import metrics as skm

    if data.task == Task.REGRESSION:
        pred, true = out.detach().cpu().numpy().ravel(), y.detach().cpu().numpy().ravel()
        return {
            "val_mse": float(skm.mean_squared_error(true, pred)),
            "val_mae": float(skm.mean_absolute_error(true, pred)),
        }, None
    probabilities = torch.softmax(out.detach().float(), dim=1).cpu().numpy()
    true = y.detach().cpu().numpy()
    pred = probabilities.argmax(axis=1)
    labels = list(range(len(data.classes)))
    values = {
        "val_accuracy": float(skm.accuracy_score(true, pred)),
        "val_f1_macro": float(skm.f1_score(true, pred, average="macro", labels=labels, zero_division=0)),
    }
    # Binary only; undefined when the validation split holds one class, so left out then.
    if len(data.classes) == 2 and len(np.unique(true)) == 2:
        values["val_roc_auc"] = float(skm.roc_auc_score(true, probabilities[:, 1]))
    confusion = skm.confusion_matrix(true, pred, labels=labels).tolist()
    return values, confusion


def _check_spec_fits_data(data: TabularData, spec: JobCreate) -> None:
    stopping = spec.training.early_stopping
    if stopping and stopping.metric == "val_roc_auc" and len(data.classes) != 2:
        raise InvalidInput(
            f"training.early_stopping.metric 'val_roc_auc' needs two classes; "
            f"target {data.target!r} has {len(data.classes)}"
        )


@contextlib.contextmanager
def _determinism(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the run only, restored afterwards."""
    if not enabled:
        yield
        return
    # cuBLAS needs this set before its first use to be deterministic (and to not raise).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    before_cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before_cudnn


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` (from a :data:`Checkpointer`) atomically: a reader never sees half a file."""
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors, numbers, strings and containers only."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a version-{CHECKPOINT_VERSION} Shipyard training checkpoint")
    return state


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": generator.get_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["loader"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def train(
    data: TabularData, spec: JobCreate, *, device: str, observer: Observer | None = None,
    checkpointer: Checkpointer | None = None, resume: dict[str, Any] | None = None,
) -> TrainResult:
    """Fit the model the spec describes; report each step and each epoch to ``observer``.

    ``checkpointer`` receives the whole training state after every epoch; passing such a state
    back as ``resume`` continues from the epoch after it, as if training had never stopped.
    """
    _check_spec_fits_data(data, spec)
    with _determinism(spec.training.deterministic):
        return _train(data, spec, device=device, observer=observer, checkpointer=checkpointer, resume=resume)


def _train(
    data: TabularData, spec: JobCreate, *, device: str, observer: Observer | None,
    checkpointer: Checkpointer | None, resume: dict[str, Any] | None,
) -> TrainResult:
    from torch.utils.data import DataLoader, TensorDataset

    training = spec.training
    random.seed(training.seed)
    torch.manual_seed(training.seed)
    np.random.seed(training.seed % 2**32)
    model = build_model(data, spec).to(device)
    optimizer = build_optimizer(model, spec)
    classification = data.task == Task.CLASSIFICATION
    loss_fn: nn.Module = nn.CrossEntropyLoss() if classification else nn.MSELoss()

    generator = torch.Generator().manual_seed(training.seed)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)),
        batch_size=training.batch_size, shuffle=True, generator=generator,
    )
    accum = training.grad_accum_steps
    batches = len(loader)
    scheduler = build_scheduler(optimizer, spec, updates_per_epoch=math.ceil(batches / accum))
    per_batch = training.scheduler.name == SchedulerName.ONECYCLE
    x_val = torch.from_numpy(data.x_val).to(device)
    y_val = torch.from_numpy(data.y_val).to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    clip = training.grad_clip_norm if training.grad_clip_norm is not None else math.inf
    stopping = training.early_stopping

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x)
        if classification:
            return loss_fn(out, y), out
        return loss_fn(model.scale_target(out), model.scale_target(y)), out

    started = time.monotonic()
    step = 0
    metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    confusion: list[list[int]] | None = None
    best: tuple[float, int, dict[str, Any], dict[str, float], list[list[int]] | None] | None = None
    since_best = 0
    stopped_early = False
    last_good = 0

    def diverged(what: str, epoch: int, batch: int) -> TrainingFailed:
        good = f"the last good epoch was {last_good}" if last_good else "no epoch finished"
        return TrainingFailed(
            f"training diverged: {what} is not finite at epoch {epoch}, step {step} "
            f"(batch {batch} of {batches}); {good}; try a smaller learning_rate or set grad_clip_norm"
        )

    first_epoch = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None and resume["scheduler"] is not None:
            scheduler.load_state_dict(resume["scheduler"])
        _set_rng_state(resume["rng"], generator)
        step, last_good = int(resume["step"]), int(resume["last_good"])
        metrics, history, confusion = dict(resume["metrics"]), list(resume["history"]), resume["confusion"]
        since_best = int(resume["since_best"])
        if resume["best"] is not None:
            b = resume["best"]
            best = (float(b["value"]), int(b["epoch"]), b["weights"], dict(b["metrics"]), b["confusion"])
        first_epoch = int(resume["epoch"]) + 1
        if resume["stopped_early"]:  # it had stopped early: nothing left to train
            first_epoch, stopped_early = training.epochs + 1, True

    def checkpoint(epoch: int, stop: bool) -> None:
        if checkpointer is None:
            return
        checkpointer({
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,
            "stopped_early": stop and epoch < training.epochs,
            "step": step,
            "last_good": last_good,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "grad_scaler": None,  # no mixed precision in this engine yet
            "rng": _rng_state(generator),
            "metrics": dict(metrics),
            "history": list(history),
            "confusion": confusion,
            "since_best": since_best,
            "best": None if best is None else {
                "value": best[0], "epoch": best[1], "weights": best[2], "metrics": best[3],
                "confusion": best[4],
            },
        })

    for epoch in range(first_epoch, training.epochs + 1):
        model.train()
        lr = float(optimizer.param_groups[0]["lr"])  # the rate this epoch starts with
        total, seen = 0.0, 0
        optimizer.zero_grad()
        for batch, (x, y) in enumerate(loader, start=1):
            x, y = x.to(device), y.to(device)
            loss, _ = batch_loss(x, y)
            step += 1
            if not torch.isfinite(loss):
                raise diverged(f"the loss ({loss.item()})", epoch, batch)
            # Each batch's share of the accumulated update; the last group may be short.
            group = min(accum, batches - (batch - 1) // accum * accum)
            (loss / group).backward()
            total += loss.item() * len(x)
            seen += len(x)
            if batch % accum == 0 or batch == batches:
                norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
                if not torch.isfinite(norm):
                    raise diverged("a gradient", epoch, batch)
                optimizer.step()
                optimizer.zero_grad()
                if per_batch and scheduler is not None:
                    scheduler.step()
            if observer:
                observer(epoch, step, None)

        model.eval()
        with torch.no_grad():
            val_loss, out = batch_loss(x_val, y_val)
        metrics = {"train_loss": total / max(seen, 1), "val_loss": float(val_loss.item())}
        if not all(math.isfinite(v) for v in metrics.values()) or not torch.isfinite(out).all():
            raise diverged("the validation loss or output", epoch, batches)
        scores, confusion = validation_metrics(data, out, y_val)
        metrics.update(scores)
        metrics["lr"] = lr
        last_good = epoch
        history.append({"epoch": float(epoch), **metrics})
        if scheduler is not None and not per_batch:
            if training.scheduler.name == SchedulerName.PLATEAU:
                scheduler.step(metrics["val_loss"])
            else:
                scheduler.step()
        stop = False
        if stopping is not None:
            value = metrics[stopping.metric]
            if best is None:
                gain = math.inf
            else:
                gain = value - best[0] if METRIC_GOALS[stopping.metric] else best[0] - value
            if gain > stopping.min_delta:
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = (value, epoch, weights, dict(metrics), confusion)
                since_best = 0
            else:
                since_best += 1
                stop = since_best >= stopping.patience
        # Saved before the epoch is reported, so that a reported epoch always has its checkpoint.
        checkpoint(epoch, stop)
        if observer:
            observer(epoch, step, dict(metrics))
        if stop:
            stopped_early = epoch < training.epochs
            break

    best_epoch = None
    if stopping is not None and best is not None:
        best_epoch = best[1]
        if stopping.restore_best:
            model.load_state_dict(best[2])
            metrics, confusion = best[3], best[4]
    model.eval()
    return TrainResult(
        model=model.cpu(), metrics=metrics, device=device, seconds=time.monotonic() - started,
        history=history, confusion=confusion, best_epoch=best_epoch, stopped_early=stopped_early,
    )


def steps_per_epoch(data: TabularData, spec: JobCreate) -> int:
    return math.ceil(len(data.x_train) / spec.training.batch_size)
