"""The training loop: tabular data in, a fitted PyTorch MLP out.

Nothing here knows about jobs, databases or MLflow; :mod:`services.trainer.worker.runner` wires those
in through the ``observer`` callback. The fitted module takes raw feature rows: the
standardisation fitted on the training split lives inside it as buffers, so that whoever
serves the exported model cannot forget it or apply another one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from services.trainer.api.schemas import (
    METRIC_GOALS,
    JobCreate,
    OptimizerName,
    Precision,
    SchedulerName,
    Task,
)
from services.trainer.engines.types import Observer, TabularData, TrainingFailed
from shipyard_common.errors import InvalidInput

log = logging.getLogger("shipyard.trainer.engine")

# Receives the full training state at the end of every epoch (see :func:`load_checkpoint`).
Checkpointer = Callable[[dict[str, Any]], None]

CHECKPOINT_VERSION = 1


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


@dataclass
class TrainResult:
    model: nn.Module
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


def build_model(data: TabularData, spec: JobCreate, *, plugin_dir: Path | None = None) -> Any:
    """The model ``spec.model`` describes (see :mod:`services.trainer.engines.architectures`).

    An ``nn.Module`` taking raw rows; typed ``Any`` because the loop calls a regression
    model's ``scale_target``. ``plugin_dir`` is where ``plugin`` factories are loaded from.
    """
    from services.trainer.engines import architectures

    return architectures.build_model(data, spec, plugin_dir=plugin_dir)


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
    """Validation metrics from the model's outputs (logits, or probabilities); and the confusion matrix.

    scikit-learn's definitions (the tests compare with it): MSE and MAE; accuracy and macro F1
    (zero where a class is neither present nor predicted), taken from the confusion matrix,
    which is counted with numpy (scikit-learn's input checks cost more than the counting, once
    per epoch); ROC-AUC as the Mann-Whitney U of the score of class 1 against class 0 (the
    logit difference orders the rows as the softmax probability does, without its rounding to 1).
    """
    from sklearn import metrics as skm

    if data.task == Task.REGRESSION:
        pred, true = out.detach().cpu().numpy().ravel(), y.detach().cpu().numpy().ravel()
        return {
            "val_mse": float(skm.mean_squared_error(true, pred)),
            "val_mae": float(skm.mean_absolute_error(true, pred)),
        }, None
    scores = out.detach().float().cpu().numpy()
    true = y.detach().cpu().numpy().astype(np.int64).ravel()
    pred = scores.argmax(axis=1)
    k = len(data.classes)
    matrix = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    hits = np.diag(matrix).astype(np.float64)
    either = matrix.sum(axis=1) + matrix.sum(axis=0)
    f1 = np.divide(2 * hits, either, out=np.zeros(k), where=either > 0)
    values = {
        "val_accuracy": float(hits.sum() / max(int(matrix.sum()), 1)),
        "val_f1_macro": float(f1.mean()),
    }
    # Binary only; undefined when the validation split holds one class, so left out then.
    positives = int(matrix[1].sum()) if k == 2 else 0
    negatives = len(true) - positives
    if k == 2 and positives and negatives:
        # Mann-Whitney U with average ranks for ties: the area roc_auc_score computes.
        from scipy.stats import rankdata

        ranks = rankdata(scores[:, 1] - scores[:, 0])
        u = float(ranks[true == 1].sum()) - positives * (positives + 1) / 2
        values["val_roc_auc"] = u / (positives * negatives)
    return values, matrix.tolist()


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
    tensorboard_dir: Path | None = None, initial_weights: dict[str, Any] | None = None,
    plugin_dir: Path | None = None, rank: int = 0, world_size: int = 1,
) -> TrainResult:
    """Fit the model the spec describes; report each step and each epoch to ``observer``.

    ``checkpointer`` receives the whole training state after every epoch; passing such a state
    back as ``resume`` continues from the epoch after it, as if training had never stopped.
    ``initial_weights`` (a state dict: fine-tuning from a parent version) is loaded before the
    first epoch. ``tensorboard_dir`` receives per-epoch scalars (losses, lr, validation metrics).

    With ``world_size > 1`` the caller has initialised the default process group (see
    :mod:`services.trainer.engines.distributed`): each rank trains on its share of the rows
    (``DistributedSampler``) in a ``DistributedDataParallel`` model; every rank validates on the
    whole validation split (the same weights, hence the same metrics and the same early-stopping
    decisions); rank 0 alone reports to ``observer``, checkpoints and writes TensorBoard.
    """
    _check_spec_fits_data(data, spec)
    with _determinism(spec.training.deterministic):
        return _train(
            data, spec, device=device, observer=observer, checkpointer=checkpointer, resume=resume,
            tensorboard_dir=tensorboard_dir, initial_weights=initial_weights, plugin_dir=plugin_dir,
            rank=rank, world_size=world_size,
        )


def resolve_precision(precision: Precision, device: str) -> Precision:
    """The precision the run will use on ``device``: the spec's, unless the device cannot do it.

    bf16 autocast works on CPU and CUDA. fp16 autocast (with a GradScaler) works on CUDA and, in
    PyTorch 2.13, on CPU too (slow there: there is rarely a reason to ask for it); a device whose
    autocast refuses the dtype falls back to fp32 with a warning rather than failing the job.
    """
    if precision == Precision.FP32:
        return precision
    device_type = torch.device(device).type
    dtype = torch.bfloat16 if precision == Precision.BF16 else torch.float16
    try:
        with torch.autocast(device_type, dtype=dtype):
            probe = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        if probe.dtype != dtype:
            raise RuntimeError(f"autocast on {device_type} computed {probe.dtype}")
    except (RuntimeError, ValueError) as exc:
        log.warning("precision %s is not available on %s (%s); training in fp32",
                    precision.value, device, exc)
        return Precision.FP32
    return precision


def _unwrap_weights(weights: dict[str, Any]) -> dict[str, Any]:
    # A state dict saved from a compiled or DDP-wrapped module carries these prefixes.
    for prefix in ("_orig_mod.", "module."):
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items()}
    return weights


def load_initial_weights(model: nn.Module, weights: dict[str, Any]) -> None:
    try:
        model.load_state_dict(_unwrap_weights(weights))
    except RuntimeError as exc:  # missing/unexpected keys or size mismatches, listed by PyTorch
        detail = " ".join(str(exc).split())
        raise InvalidInput(
            "init_from: the parent version's weights do not fit the model this spec builds "
            "(fine-tuning needs the same model type and sizes, the same feature columns and the same "
            f"classes): {detail[:1500]}"
        ) from None


def _feature_parts(model: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor,
                                              torch.Tensor, torch.Tensor] | None:
    """``(net, mean, std, target_mean, target_std)`` of a model that standardises its raw rows
    inside ``forward`` (``FeatureModel``); None for any other model.

    Training then standardises the training split once instead of every batch and trains
    ``net`` on it: the same arithmetic, minus four element-wise ops (and their backward) a step.
    """
    # By name: this class's forward is exactly net((x - mean) / std) * target_std + target_mean.
    kind = type(model)
    if (kind.__module__, kind.__name__) != ("services.trainer.engines.architectures", "FeatureModel"):
        return None
    net = model.net
    if not isinstance(net, nn.Module):
        return None
    buffers = dict(model.named_buffers(recurse=False))
    try:
        return net, buffers["mean"], buffers["std"], buffers["target_mean"], buffers["target_std"]
    except KeyError:
        return None


def _seed_worker(worker_id: int) -> None:
    # Each DataLoader worker's torch seed derives from the loader's seeded generator; numpy and
    # random follow it, so that any randomness in a dataset repeats run after run.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _tensorboard_without_tensorflow() -> None:
    """Let TensorBoard use its own TF stub rather than import TensorFlow (installed for Keras).

    ``tensorboard.compat`` imports ``tensorflow`` (seconds) unless ``tensorboard.compat.notf``
    exists, the marker of its TensorFlow-free build; the event files are the same either way.
    Left alone when TensorFlow is already loaded in this process.
    """
    import sys
    import types

    if "tensorflow" not in sys.modules and "tensorboard.compat.notf" not in sys.modules:
        sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")


class _TensorBoard:
    """Per-epoch scalars to ``SummaryWriter`` (imported only when asked for: it is slow to import)."""

    def __init__(self, folder: Path | None) -> None:
        self.writer: Any = None
        if folder is not None:
            _tensorboard_without_tensorflow()
            from torch.utils.tensorboard import SummaryWriter

            folder.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(folder))

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in metrics.items():
            if name == "lr":
                tag = "lr"
            elif name.startswith("val_"):
                tag = f"val/{name[4:]}"
            elif name.startswith("train_"):
                tag = f"train/{name[6:]}"
            else:
                tag = name
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# How many steps may pass between two checks that the losses are finite. Each check is one host
# sync (and, under DDP, one all-reduce); between checks the losses stay on the device.
FINITE_CHECK_EVERY = 256


def _train(
    data: TabularData, spec: JobCreate, *, device: str, observer: Observer | None,
    checkpointer: Checkpointer | None, resume: dict[str, Any] | None, tensorboard_dir: Path | None,
    initial_weights: dict[str, Any] | None, plugin_dir: Path | None, rank: int, world_size: int,
) -> TrainResult:
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, TensorDataset

    training = spec.training
    distributed = world_size > 1
    if rank != 0:  # one voice: rank 0 reports, checkpoints and writes TensorBoard
        observer, checkpointer, tensorboard_dir = None, None, None
    random.seed(training.seed)
    torch.manual_seed(training.seed)
    np.random.seed(training.seed % 2**32)
    model: Any = build_model(data, spec, plugin_dir=plugin_dir)
    if initial_weights is not None:
        load_initial_weights(model, initial_weights)
    model = model.to(device)
    optimizer = build_optimizer(model, spec)
    classification = data.task == Task.CLASSIFICATION
    loss_fn: nn.Module = nn.CrossEntropyLoss() if classification else nn.MSELoss()
    device_type = torch.device(device).type
    precision = resolve_precision(training.precision, device)
    amp_dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(precision)
    # fp16 needs loss scaling; a disabled scaler is a pass-through (and saves no state).
    scaler = torch.amp.GradScaler(device_type, enabled=precision == Precision.FP16)
    scaling = scaler.is_enabled()

    generator = torch.Generator().manual_seed(training.seed)
    accum = training.grad_accum_steps
    stopping = training.early_stopping
    x_val = torch.from_numpy(data.x_val).to(device)
    y_val = torch.from_numpy(data.y_val).to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    clip = training.grad_clip_norm

    started = time.monotonic()
    step = 0
    metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    confusion: list[list[int]] | None = None
    best: tuple[float, int, dict[str, Any], dict[str, float], list[list[int]] | None] | None = None
    since_best = 0
    stopped_early = False
    last_good = 0
    first_epoch = 1
    # Batches per epoch (each rank's share under DDP: DistributedSampler pads to equal shares).
    rows = math.ceil(len(data.x_train) / world_size)
    batches = math.ceil(rows / training.batch_size)
    # Built before a resumed optimizer state is loaded: building one resets the optimizer's lr.
    scheduler = build_scheduler(optimizer, spec, updates_per_epoch=math.ceil(batches / accum))
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None and resume["scheduler"] is not None:
            scheduler.load_state_dict(resume["scheduler"])
        if scaling and resume.get("grad_scaler"):
            scaler.load_state_dict(resume["grad_scaler"])
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

    # What the training steps run: for a model that standardises inside forward, its ``net`` on
    # rows standardised once here (after any loaded weights, which carry the scaling buffers).
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    parts = _feature_parts(model)
    train_module: nn.Module = model
    scale_target: Callable[[torch.Tensor], torch.Tensor] | None = None
    if parts is not None:
        net, mean, std, target_mean, target_std = parts
        with torch.no_grad():  # on the host, where the loader keeps the rows
            x_train = (x_train - mean.cpu()) / std.cpu()
            if not classification:
                y_train = (y_train - target_mean.cpu()) / target_std.cpu()
        train_module = net
    elif not classification:
        scale_target = getattr(model, "scale_target", None)
    runner: Any = train_module
    ddp: Any = None
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        index = torch.device(device).index
        ddp = DistributedDataParallel(train_module, device_ids=[index] if device_type == "cuda" else None)
        runner = ddp
    if training.compile:
        runner = torch.compile(runner)  # the returned and saved model stays the plain ``model``

    dataset = TensorDataset(x_train, y_train)
    sampler: DistributedSampler[Any] | None = None
    order: Any
    if distributed:
        sampler = order = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                             seed=training.seed)
    else:
        # The order comes from ``generator`` alone (one draw an epoch, checkpointed with the RNG
        # states); the loader's own generator only seeds worker processes. So loading in workers
        # or inline, resumed or not, the batches are the same.
        order = RandomSampler(dataset, generator=generator)
    # Whole batches of indices: TensorDataset gathers a batch in one indexing op per tensor, the
    # same rows in the same order as the DataLoader's own batching, without a __getitem__ per
    # row and a stack per batch (over half of a small model's step on CPU).
    loader_options: dict[str, Any] = {
        "sampler": BatchSampler(order, batch_size=training.batch_size, drop_last=False),
        "batch_size": None,
        "generator": torch.Generator().manual_seed(training.seed),
    }
    if training.num_workers > 0:
        loader_options.update(num_workers=training.num_workers, persistent_workers=True,
                              worker_init_fn=_seed_worker)
    pin = training.pin_memory and device_type == "cuda"
    loader = DataLoader(dataset, pin_memory=pin, **loader_options)
    assert len(loader) == batches, (len(loader), batches)
    per_batch = training.scheduler.name == SchedulerName.ONECYCLE
    transfer = device_type != "cpu"
    tensorboard = _TensorBoard(tensorboard_dir)

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if amp_dtype is None:
            out = runner(x)
        else:
            with torch.autocast(device_type, dtype=amp_dtype):
                out = runner(x)
        if scale_target is not None:
            return loss_fn(scale_target(out.float()), scale_target(y))
        return loss_fn(out.float() if amp_dtype is not None else out, y)

    # Validation in chunks of a few batches: one pass over a large split (token ids through
    # attention above all) would need memory for every row's activations at once.
    val_chunk = max(training.batch_size * 8, 256)

    def eval_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Validation runs the whole model in fp32: the metrics are those of the model exported.
        scale = None if classification else getattr(model, "scale_target", None)
        outs: list[torch.Tensor] = []
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for start in range(0, len(x), val_chunk):
            xs, ys = x[start:start + val_chunk], y[start:start + val_chunk]
            out = model(xs)
            loss = loss_fn(scale(out), scale(ys)) if scale is not None else loss_fn(out, ys)
            total += loss.double() * len(xs)  # the losses are means: weigh each chunk by its rows
            outs.append(out)
        return (total / max(len(x), 1)).float(), torch.cat(outs)

    def diverged(what: str, epoch: int, at_step: int, batch: int) -> TrainingFailed:
        good = f"the last good epoch was {last_good}" if last_good else "no epoch finished"
        return TrainingFailed(
            f"training diverged: {what} is not finite at epoch {epoch}, step {at_step} "
            f"(batch {batch} of {batches}); {good}; try a smaller learning_rate or set grad_clip_norm"
        )

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
            # fp16 only: the loss scale and its growth tracker, so that a resumed run scales alike.
            "grad_scaler": scaler.state_dict() if scaling else None,
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

    # Losses (and, when clipping without a scaler, gradient norms) stay on the device between
    # checks: no host sync per batch. A check finds the first non-finite one and names its step.
    pending_losses: list[torch.Tensor] = []
    pending_sizes: list[int] = []
    pending_norms: list[tuple[int, torch.Tensor]] = []  # (index into pending_losses, norm)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def check_finite(epoch: int, last_batch: int) -> None:
        """Raise (every rank alike) if a loss or gradient since the last check was not finite."""
        nonlocal loss_sum
        count = len(pending_losses)
        if not count:
            return
        losses = torch.stack(pending_losses).float()
        bad = ~torch.isfinite(losses)
        # Encoded as 2 * index (+1 for a gradient), the first bad one is the smallest code.
        first = torch.where(bad, torch.arange(count, device=losses.device) * 2, 2 * count).min()
        if pending_norms:
            at = torch.tensor([i for i, _ in pending_norms], device=losses.device)
            norms = torch.stack([n for _, n in pending_norms]).float()
            first = torch.minimum(first, torch.where(torch.isfinite(norms), 2 * count, at * 2 + 1).min())
        if distributed:
            import torch.distributed as dist

            first = first.to(device)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        code = int(first.item())
        if code < 2 * count:
            index, is_gradient = divmod(code, 2)
            at_step = step - count + 1 + index
            batch = last_batch - count + 1 + index
            if is_gradient:
                what = "a gradient"
            elif bool(bad[index]):
                what = f"the loss ({float(losses[index])})"
            else:
                what = "the loss (on another rank)"
            raise diverged(what, epoch, at_step, batch)
        sizes = torch.tensor(pending_sizes, dtype=torch.float64, device=losses.device)
        loss_sum = loss_sum + (losses.double() * sizes).sum()
        pending_losses.clear()
        pending_sizes.clear()
        pending_norms.clear()

    try:
        for epoch in range(first_epoch, training.epochs + 1):
            model.train()
            if sampler is not None:
                sampler.set_epoch(epoch)
            lr = float(optimizer.param_groups[0]["lr"])  # the rate this epoch starts with
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            optimizer.zero_grad()
            for batch, (x, y) in enumerate(loader, start=1):
                if transfer:
                    x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
                update = batch % accum == 0 or batch == batches
                with ddp.no_sync() if ddp is not None and not update else contextlib.nullcontext():
                    loss = batch_loss(x, y)
                    step += 1
                    pending_losses.append(loss.detach())
                    pending_sizes.append(len(x))
                    seen += len(x)
                    if accum > 1:
                        # Each batch's share of the accumulated update; the last group may be short.
                        loss = loss / min(accum, batches - (batch - 1) // accum * accum)
                    if scaling:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                if update:
                    if clip is not None:
                        if scaling:
                            scaler.unscale_(optimizer)
                        norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
                        # With a scaler, an inf norm is an overflow step that it skips: not divergence.
                        if not scaling:
                            pending_norms.append((len(pending_losses) - 1, norm))
                    if scaling:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad()
                    if per_batch and scheduler is not None:
                        scheduler.step()
                if batch % FINITE_CHECK_EVERY == 0:
                    check_finite(epoch, batch)
                if observer:
                    observer(epoch, step, None)
            check_finite(epoch, batches)

            totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
            if distributed:
                import torch.distributed as dist

                dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            train_loss = float(totals[0]) / max(float(totals[1]), 1.0)
            model.eval()
            with torch.no_grad():
                val_loss, out = eval_loss(x_val, y_val)
            metrics = {"train_loss": train_loss, "val_loss": float(val_loss.item())}
            if not all(math.isfinite(v) for v in metrics.values()) or not torch.isfinite(out).all():
                raise diverged("the validation loss or output", epoch, step, batches)
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
            tensorboard.epoch(epoch, metrics)
            if observer:
                observer(epoch, step, dict(metrics))
            if stop:
                stopped_early = epoch < training.epochs
                break
    finally:
        tensorboard.close()

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
    """Optimizer-loop steps (batches) one process runs per epoch; each rank's share under DDP."""
    rows = len(data.x_train)
    if spec.resources.gpus > 1:
        rows = math.ceil(rows / spec.resources.gpus)  # DistributedSampler pads to equal shares
    return math.ceil(rows / spec.training.batch_size)
