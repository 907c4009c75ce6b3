"""The training loop: tabular data in, a fitted PyTorch MLP out.

Nothing here knows about jobs, databases or MLflow; :mod:`services.trainer.job` wires those
in through the ``observer`` callback. The fitted module takes raw feature rows: the
standardisation fitted on the training split lives inside it as buffers, so that whoever
serves the exported model cannot forget it or apply another one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from services.trainer.schemas import JobCreate, OptimizerName, Task
from shipyard_common.errors import InvalidInput, ShipyardError

# (epoch, global step, metrics at the end of an epoch or None mid-epoch) → may raise to stop.
Observer = Callable[[int, int, dict[str, float] | None], None]


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
    kinds: dict[OptimizerName, Callable[..., torch.optim.Optimizer]] = {
        OptimizerName.SGD: torch.optim.SGD,
        OptimizerName.ADAM: torch.optim.Adam,
        OptimizerName.ADAMW: torch.optim.AdamW,
        OptimizerName.RMSPROP: torch.optim.RMSprop,
    }
    return kinds[training.optimizer](
        model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay
    )


def train(
    data: TabularData, spec: JobCreate, *, device: str, observer: Observer | None = None
) -> TrainResult:
    """Fit the model the spec describes; report each step and each epoch to ``observer``."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(spec.training.seed)
    np.random.seed(spec.training.seed % 2**32)
    model = build_model(data, spec).to(device)
    optimizer = build_optimizer(model, spec)
    classification = data.task == Task.CLASSIFICATION
    loss_fn: nn.Module = nn.CrossEntropyLoss() if classification else nn.MSELoss()

    generator = torch.Generator().manual_seed(spec.training.seed)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)),
        batch_size=spec.training.batch_size, shuffle=True, generator=generator,
    )
    x_val = torch.from_numpy(data.x_val).to(device)
    y_val = torch.from_numpy(data.y_val).to(device)

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x)
        if classification:
            return loss_fn(out, y), out
        return loss_fn(model.scale_target(out), model.scale_target(y)), out

    started = time.monotonic()
    step = 0
    metrics: dict[str, float] = {}
    for epoch in range(1, spec.training.epochs + 1):
        model.train()
        total, seen = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss, _ = batch_loss(x, y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(x)
            seen += len(x)
            step += 1
            if observer:
                observer(epoch, step, None)

        model.eval()
        with torch.no_grad():
            val_loss, out = batch_loss(x_val, y_val)
            metrics = {"train_loss": total / max(seen, 1), "val_loss": float(val_loss.item())}
            if classification:
                metrics["val_accuracy"] = float((out.argmax(dim=1) == y_val).float().mean().item())
            else:
                metrics["val_mse"] = float(((out - y_val) ** 2).mean().item())
                metrics["val_mae"] = float((out - y_val).abs().mean().item())
        if not all(math.isfinite(v) for v in metrics.values()):
            raise TrainingFailed(
                f"training diverged at epoch {epoch} ({metrics}); try a smaller learning rate"
            )
        if observer:
            observer(epoch, step, dict(metrics))
    model.eval()
    return TrainResult(model=model.cpu(), metrics=metrics, device=device, seconds=time.monotonic() - started)


def steps_per_epoch(data: TabularData, spec: JobCreate) -> int:
    return math.ceil(len(data.x_train) / spec.training.batch_size)
