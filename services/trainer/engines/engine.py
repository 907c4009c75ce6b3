"""The training loop: tabular data in, a fitted PyTorch MLP out.

Nothing here knows about jobs, databases or MLflow; :mod:`services.trainer.worker.runner` wires those
in through the ``observer`` callback. The fitted module takes raw feature rows: the
standardisation fitted on the training split lives inside it as buffers, so that whoever
serves the exported model cannot forget it or apply another one.

:func:`train` sets the run up (:func:`_set_up`), continues a checkpoint's, builds its loader, then
runs the epochs (:func:`_run_epochs`, :func:`_train_epoch`, :func:`_batch_step`). What one run holds
and the steps between batches (validation, early stopping, the checkpoint's state) are
:mod:`~.training_run`'s; the data preparation and validation metrics :mod:`~.tabular`'s; the
checkpoint file :mod:`~.checkpoints`'. The names other modules know them by here are re-exported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from services.trainer.engines import preprocess, tabular
from services.trainer.engines.checkpoints import CHECKPOINT_VERSION as CHECKPOINT_VERSION
from services.trainer.engines.checkpoints import Checkpointer as Checkpointer
from services.trainer.engines.checkpoints import load_checkpoint as load_checkpoint
from services.trainer.engines.checkpoints import save_checkpoint as save_checkpoint
from services.trainer.engines.tabular import validation_metrics as validation_metrics
from services.trainer.engines.tensorboard_log import TensorBoardLog
from services.trainer.engines.training_run import (
    FiniteChecks,
    Progress,
    Setup,
    batch_loss,
    early_stop,
    optimizer_step,
    restore,
    save_state,
    step_scheduler_per_epoch,
    validate,
    wire,
)
from services.trainer.engines.types import Observer, TabularData
from services.trainer.engines.types import TrainingFailed as TrainingFailed
from services.trainer.jobs.schemas import JobCreate, OptimizerName, Precision, SchedulerName, Task
from shipyard_common.errors import InvalidInput

log = logging.getLogger("shipyard.trainer.engine")


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

    if data.table is not None and data.table.embedded():  # embedded columns: learned tables in front
        from services.trainer.engines.preprocess import with_embeddings

        return with_embeddings(data.table, data.x_train, lambda wide: architectures.build_model(
            dataclasses.replace(data, x_train=wide), spec, plugin_dir=plugin_dir))
    return architectures.build_model(data, spec, plugin_dir=plugin_dir)


def prepare_data(
    frame: pd.DataFrame, spec: JobCreate, test_frame: pd.DataFrame | None = None, *,
    parent_table: preprocess.Table | None = None,
) -> TabularData:
    """The job's rows checked and split: a table (:func:`~.tabular.prepare_data`; ``parent_table``: the
    encoding of the version it fine-tunes), or with ``data.sequence`` padded variable-length sequences
    (:func:`~.sequences.prepare_sequences`)."""
    if spec.data.sequence is not None:
        from services.trainer.engines.sequences import prepare_sequences

        return prepare_sequences(frame, spec, test_frame)
    return tabular.prepare_data(frame, spec, test_frame, parent_table=parent_table)


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


# How many steps may pass between two checks that the losses are finite. Each check is one host
# sync (and, under DDP, one all-reduce); between checks the losses stay on the device.
FINITE_CHECK_EVERY = 256


def _train(
    data: TabularData, spec: JobCreate, *, device: str, observer: Observer | None,
    checkpointer: Checkpointer | None, resume: dict[str, Any] | None, tensorboard_dir: Path | None,
    initial_weights: dict[str, Any] | None, plugin_dir: Path | None, rank: int, world_size: int,
) -> TrainResult:
    if rank != 0:  # one voice: rank 0 reports, checkpoints and writes TensorBoard
        observer, checkpointer, tensorboard_dir = None, None, None
    setup = _set_up(data, spec, device=device, observer=observer, checkpointer=checkpointer,
                    initial_weights=initial_weights, plugin_dir=plugin_dir, rank=rank, world_size=world_size)
    started = time.monotonic()
    progress = Progress()
    if resume is not None:
        restore(setup, progress, resume)
    wire(setup)
    tensorboard = TensorBoardLog(tensorboard_dir)
    try:
        _run_epochs(setup, progress, tensorboard)
    finally:
        tensorboard.close()
    return _result(setup, progress, started)


def _set_up(
    data: TabularData, spec: JobCreate, *, device: str, observer: Observer | None,
    checkpointer: Checkpointer | None, initial_weights: dict[str, Any] | None, plugin_dir: Path | None,
    rank: int, world_size: int,
) -> Setup:
    """Seeds, then the model (with any initial weights), optimizer, loss, precision and scheduler."""
    training = spec.training
    random.seed(training.seed)
    torch.manual_seed(training.seed)
    np.random.seed(training.seed % 2**32)
    model: Any = build_model(data, spec, plugin_dir=plugin_dir)
    if initial_weights is not None:
        load_initial_weights(model, initial_weights)
    model = model.to(device)
    optimizer = build_optimizer(model, spec)
    classification = data.task == Task.CLASSIFICATION
    precision = resolve_precision(training.precision, device)
    rows = math.ceil(len(data.x_train) / world_size)
    batches = math.ceil(rows / training.batch_size)
    updates = math.ceil(batches / training.grad_accum_steps)
    return Setup(
        data=data, spec=spec, device=device, world_size=world_size, rank=rank, model=model,
        optimizer=optimizer,
        # Built before a resumed optimizer state is loaded: building one resets the optimizer's lr.
        scheduler=build_scheduler(optimizer, spec, updates_per_epoch=updates),
        loss_fn=nn.CrossEntropyLoss() if classification else nn.MSELoss(),
        amp_dtype={Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(precision),
        # fp16 needs loss scaling; a disabled scaler is a pass-through (and saves no state).
        scaler=torch.amp.GradScaler(torch.device(device).type, enabled=precision == Precision.FP16),
        generator=torch.Generator().manual_seed(training.seed),
        parameters=[p for p in model.parameters() if p.requires_grad],
        x_val=torch.from_numpy(data.x_val).to(device), y_val=torch.from_numpy(data.y_val).to(device),
        batches=batches, observer=observer, checkpointer=checkpointer,
    )


def _run_epochs(setup: Setup, progress: Progress, tensorboard: TensorBoardLog) -> None:
    """Train, validate, step the scheduler, decide on early stopping, checkpoint, report; per epoch."""
    checks = FiniteChecks(setup, progress)
    for epoch in range(progress.first_epoch, setup.training.epochs + 1):
        lr, train_loss = _train_epoch(setup, progress, checks, epoch)
        validate(setup, progress, epoch, train_loss=train_loss, lr=lr)
        step_scheduler_per_epoch(setup, progress.metrics)
        stop = early_stop(setup, progress, epoch)
        # Saved before the epoch is reported, so that a reported epoch always has its checkpoint.
        save_state(setup, progress, epoch, stop)
        tensorboard.epoch(epoch, progress.metrics)
        if setup.observer:
            setup.observer(epoch, progress.step, dict(progress.metrics))
        if stop:
            progress.stopped_early = epoch < setup.training.epochs
            break


def _train_epoch(setup: Setup, progress: Progress, checks: FiniteChecks, epoch: int) -> tuple[float, float]:
    """One pass over the training rows: (the lr the epoch started with, its mean training loss)."""
    setup.model.train()
    if setup.sampler is not None:
        setup.sampler.set_epoch(epoch)
    lr = float(setup.optimizer.param_groups[0]["lr"])
    checks.start_epoch()
    seen = 0
    transfer, pin = setup.device_type != "cpu", setup.pin
    setup.optimizer.zero_grad()
    for batch, (x, y) in enumerate(setup.loader, start=1):
        if transfer:
            x, y = x.to(setup.device, non_blocking=pin), y.to(setup.device, non_blocking=pin)
        _batch_step(setup, progress, checks, batch, x, y)
        seen += len(x)
        if batch % FINITE_CHECK_EVERY == 0:
            checks.check(epoch, batch)
        if setup.observer:
            setup.observer(epoch, progress.step, None)
    checks.check(epoch, setup.batches)
    rows = torch.tensor(float(seen), dtype=torch.float64, device=setup.device)
    totals = torch.stack([checks.loss_sum, rows])
    if setup.distributed:
        import torch.distributed as dist

        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return lr, float(totals[0]) / max(float(totals[1]), 1.0)


def _batch_step(
    setup: Setup, progress: Progress, checks: FiniteChecks, batch: int, x: torch.Tensor, y: torch.Tensor
) -> None:
    """Forward and backward on one batch; the optimizer update at the end of each accumulation group."""
    accum, batches = setup.training.grad_accum_steps, setup.batches
    update = batch % accum == 0 or batch == batches
    with setup.ddp.no_sync() if setup.ddp is not None and not update else contextlib.nullcontext():
        loss = batch_loss(setup, x, y)
        progress.step += 1
        checks.add_loss(loss.detach(), len(x))
        if accum > 1:
            # Each batch's share of the accumulated update; the last group may be short.
            loss = loss / min(accum, batches - (batch - 1) // accum * accum)
        if setup.scaling:
            setup.scaler.scale(loss).backward()
        else:
            loss.backward()  # type: ignore[no-untyped-call]
    if update:
        optimizer_step(setup, checks)


def _result(setup: Setup, progress: Progress, started: float) -> TrainResult:
    """The fitted model (the best epoch's weights when early stopping restores them), on the CPU."""
    stopping = setup.training.early_stopping
    metrics, confusion, best_epoch = progress.metrics, progress.confusion, None
    if stopping is not None and progress.best is not None:
        best_epoch = progress.best.epoch
        if stopping.restore_best:
            setup.model.load_state_dict(progress.best.weights)
            metrics, confusion = progress.best.metrics, progress.best.confusion
    setup.model.eval()
    return TrainResult(
        model=setup.model.cpu(), metrics=metrics, device=setup.device, seconds=time.monotonic() - started,
        history=progress.history, confusion=confusion, best_epoch=best_epoch,
        stopped_early=progress.stopped_early,
    )


def predict_rows(model: nn.Module, rows: np.ndarray, spec: JobCreate) -> np.ndarray:
    """The fitted model's outputs for ``rows`` (on the CPU, in fp32, a few batches at a time)."""
    chunk = max(spec.training.batch_size * 8, 256)
    model.eval()
    with torch.no_grad():
        outs = [model(torch.from_numpy(rows[start:start + chunk])) for start in range(0, len(rows), chunk)]
    return torch.cat(outs).float().numpy()


def steps_per_epoch(data: TabularData, spec: JobCreate) -> int:
    """Optimizer-loop steps (batches) one process runs per epoch; each rank's share under DDP."""
    rows = len(data.x_train)
    if spec.resources.gpus > 1:
        rows = math.ceil(rows / spec.resources.gpus)  # DistributedSampler pads to equal shares
    return math.ceil(rows / spec.training.batch_size)
