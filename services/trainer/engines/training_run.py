"""One PyTorch training run's state, and the steps of the loop that read or change it.

:class:`Setup` is what the run builds once (model, optimizer, loss, precision, loader);
:class:`Progress` is where it stands (all that a checkpoint keeps besides the weights, optimizer and
RNGs), :class:`Best` early stopping's best epoch. The loop itself, which calls these, is
:mod:`services.trainer.engines.engine`'s.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from services.trainer.engines.checkpoints import CHECKPOINT_VERSION, Checkpointer, rng_state, set_rng_state
from services.trainer.engines.tabular import validation_metrics
from services.trainer.engines.types import Observer, TabularData, TrainingFailed
from services.trainer.jobs.schemas import METRIC_GOALS, JobCreate, SchedulerName, Task, TrainingSpec


@dataclass
class Best:
    """Early stopping's best epoch so far: the monitored value, and the weights, metrics, confusion."""

    value: float
    epoch: int
    weights: dict[str, Any]
    metrics: dict[str, float]
    confusion: list[list[int]] | None

    def saved(self) -> dict[str, Any]:
        return {"value": self.value, "epoch": self.epoch, "weights": self.weights, "metrics": self.metrics,
                "confusion": self.confusion}

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> Best:
        return cls(value=float(saved["value"]), epoch=int(saved["epoch"]), weights=saved["weights"],
                   metrics=dict(saved["metrics"]), confusion=saved["confusion"])


@dataclass
class Progress:
    """Where the run stands: all that a checkpoint keeps besides the weights, optimizer and RNGs."""

    first_epoch: int = 1
    step: int = 0
    last_good: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    confusion: list[list[int]] | None = None
    best: Best | None = None
    since_best: int = 0
    stopped_early: bool = False


@dataclass
class Setup:
    """What :func:`_set_up` builds once: the model, its optimizer and loss, the precision, the data.

    ``runner``, ``ddp``, ``scale_target``, ``loader`` and ``sampler`` are set by :func:`wire`,
    after a resumed state is loaded (the scaling buffers come with the weights).
    """

    data: TabularData
    spec: JobCreate
    device: str
    world_size: int
    rank: int
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    amp_dtype: torch.dtype | None
    scaler: Any  # torch.amp.GradScaler; fp16 only, else a disabled pass-through
    generator: torch.Generator
    parameters: list[nn.Parameter]
    x_val: torch.Tensor
    y_val: torch.Tensor
    batches: int  # per epoch: each rank's share under DDP (DistributedSampler pads to equal shares)
    observer: Observer | None
    checkpointer: Checkpointer | None
    runner: Any = None
    ddp: Any = None
    scale_target: Callable[[torch.Tensor], torch.Tensor] | None = None
    loader: Any = None
    sampler: Any = None

    @property
    def training(self) -> TrainingSpec:
        return self.spec.training

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def classification(self) -> bool:
        return self.data.task == Task.CLASSIFICATION

    @property
    def scaling(self) -> bool:
        return bool(self.scaler.is_enabled())

    @property
    def per_batch(self) -> bool:
        return self.training.scheduler.name == SchedulerName.ONECYCLE

    @property
    def pin(self) -> bool:
        return self.training.pin_memory and self.device_type == "cuda"

    def diverged(
        self, progress: Progress, what: str, epoch: int, at_step: int, batch: int
    ) -> TrainingFailed:
        good = f"the last good epoch was {progress.last_good}" if progress.last_good else "no epoch finished"
        return TrainingFailed(
            f"training diverged: {what} is not finite at epoch {epoch}, step {at_step} "
            f"(batch {batch} of {self.batches}); {good}; try a smaller learning_rate or set grad_clip_norm"
        )


def restore(setup: Setup, progress: Progress, resume: dict[str, Any]) -> None:
    """Continue from a checkpoint: weights, optimizer, scheduler, loss scale, RNGs and progress."""
    setup.model.load_state_dict(resume["model"])
    setup.optimizer.load_state_dict(resume["optimizer"])
    if setup.scheduler is not None and resume["scheduler"] is not None:
        setup.scheduler.load_state_dict(resume["scheduler"])
    if setup.scaling and resume.get("grad_scaler"):
        setup.scaler.load_state_dict(resume["grad_scaler"])
    set_rng_state(resume["rng"], setup.generator)
    progress.step, progress.last_good = int(resume["step"]), int(resume["last_good"])
    progress.metrics, progress.history = dict(resume["metrics"]), list(resume["history"])
    progress.confusion = resume["confusion"]
    progress.since_best = int(resume["since_best"])
    if resume["best"] is not None:
        progress.best = Best.from_saved(resume["best"])
    progress.first_epoch = int(resume["epoch"]) + 1
    if resume["stopped_early"]:  # it had stopped early: nothing left to train
        progress.first_epoch, progress.stopped_early = setup.training.epochs + 1, True


def wire(setup: Setup) -> None:
    """What the training steps run (the model, under DDP and/or compiled) and the loader they read."""
    x_train, y_train, train_module = _training_rows(setup)
    runner: Any = train_module
    if setup.distributed:
        from torch.nn.parallel import DistributedDataParallel

        index = torch.device(setup.device).index
        setup.ddp = DistributedDataParallel(
            train_module, device_ids=[index] if setup.device_type == "cuda" else None
        )
        runner = setup.ddp
    if setup.training.compile:
        runner = torch.compile(runner)  # the returned and saved model stays the plain ``model``
    setup.runner = runner
    setup.loader, setup.sampler = _loader(setup, x_train, y_train)


def _training_rows(setup: Setup) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """The training rows and the module the steps train.

    For a model that standardises inside forward, its ``net`` on rows standardised once here
    (after any loaded weights, which carry the scaling buffers); else the model itself.
    """
    x_train, y_train = torch.from_numpy(setup.data.x_train), torch.from_numpy(setup.data.y_train)
    parts = _feature_parts(setup.model)
    if parts is not None:
        net, mean, std, target_mean, target_std = parts
        with torch.no_grad():  # on the host, where the loader keeps the rows
            x_train = (x_train - mean.cpu()) / std.cpu()
            if not setup.classification:
                y_train = (y_train - target_mean.cpu()) / target_std.cpu()
        return x_train, y_train, net
    if not setup.classification:
        setup.scale_target = getattr(setup.model, "scale_target", None)
    return x_train, y_train, setup.model


def _loader(setup: Setup, x_train: torch.Tensor, y_train: torch.Tensor) -> tuple[Any, Any]:
    """The DataLoader over the training rows, and its DistributedSampler under DDP (else None)."""
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, TensorDataset

    training = setup.training
    dataset = TensorDataset(x_train, y_train)
    sampler: DistributedSampler[Any] | None = None
    order: Any
    if setup.distributed:
        sampler = order = DistributedSampler(dataset, num_replicas=setup.world_size, rank=setup.rank,
                                             shuffle=True, seed=training.seed)
    else:
        # The order comes from ``generator`` alone (one draw an epoch, checkpointed with the RNG
        # states); the loader's own generator only seeds worker processes. So loading in workers
        # or inline, resumed or not, the batches are the same.
        order = RandomSampler(dataset, generator=setup.generator)
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
    loader = DataLoader(dataset, pin_memory=setup.pin, **loader_options)
    assert len(loader) == setup.batches, (len(loader), setup.batches)
    return loader, sampler


class FiniteChecks:
    """Losses (and, when clipping without a scaler, gradient norms) stay on the device between
    checks: no host sync per batch. A check finds the first non-finite one and names its step.
    """

    def __init__(self, setup: Setup, progress: Progress) -> None:
        self.setup, self.progress = setup, progress
        self.losses: list[torch.Tensor] = []
        self.sizes: list[int] = []
        self.norms: list[tuple[int, torch.Tensor]] = []  # (index into losses, norm)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=setup.device)

    def start_epoch(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.setup.device)

    def add_loss(self, loss: torch.Tensor, rows: int) -> None:
        self.losses.append(loss)
        self.sizes.append(rows)

    def add_norm(self, norm: torch.Tensor) -> None:
        self.norms.append((len(self.losses) - 1, norm))

    def check(self, epoch: int, last_batch: int) -> None:
        """Raise (every rank alike) if a loss or gradient since the last check was not finite."""
        count = len(self.losses)
        if not count:
            return
        losses = torch.stack(self.losses).float()
        bad = ~torch.isfinite(losses)
        code = self._first_bad(losses, bad)
        if code < 2 * count:
            index, is_gradient = divmod(code, 2)
            if is_gradient:
                what = "a gradient"
            elif bool(bad[index]):
                what = f"the loss ({float(losses[index])})"
            else:
                what = "the loss (on another rank)"
            at_step = self.progress.step - count + 1 + index
            batch = last_batch - count + 1 + index
            raise self.setup.diverged(self.progress, what, epoch, at_step, batch)
        sizes = torch.tensor(self.sizes, dtype=torch.float64, device=losses.device)
        self.loss_sum = self.loss_sum + (losses.double() * sizes).sum()
        self.losses.clear()
        self.sizes.clear()
        self.norms.clear()

    def _first_bad(self, losses: torch.Tensor, bad: torch.Tensor) -> int:
        """2 × the index of the first bad step (+1 for a gradient), on every rank; 2 × count if none."""
        count = len(self.losses)
        first = torch.where(bad, torch.arange(count, device=losses.device) * 2, 2 * count).min()
        if self.norms:
            at = torch.tensor([i for i, _ in self.norms], device=losses.device)
            norms = torch.stack([n for _, n in self.norms]).float()
            first = torch.minimum(first, torch.where(torch.isfinite(norms), 2 * count, at * 2 + 1).min())
        if self.setup.distributed:
            import torch.distributed as dist

            first = first.to(self.setup.device)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        return int(first.item())


def batch_loss(setup: Setup, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if setup.amp_dtype is None:
        out = setup.runner(x)
    else:
        with torch.autocast(setup.device_type, dtype=setup.amp_dtype):
            out = setup.runner(x)
    loss: torch.Tensor
    if setup.scale_target is not None:
        loss = setup.loss_fn(setup.scale_target(out.float()), setup.scale_target(y))
    else:
        loss = setup.loss_fn(out.float() if setup.amp_dtype is not None else out, y)
    return loss


def optimizer_step(setup: Setup, checks: FiniteChecks) -> None:
    """Clip (if asked), step the optimizer (through the scaler under fp16), and a per-batch scheduler."""
    clip, optimizer = setup.training.grad_clip_norm, setup.optimizer
    if clip is not None:
        if setup.scaling:
            setup.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(setup.parameters, clip)
        # With a scaler, an inf norm is an overflow step that it skips: not divergence.
        if not setup.scaling:
            checks.add_norm(norm)
    if setup.scaling:
        setup.scaler.step(optimizer)
        setup.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad()
    if setup.per_batch and setup.scheduler is not None:
        setup.scheduler.step()


def validate(setup: Setup, progress: Progress, epoch: int, *, train_loss: float, lr: float) -> None:
    """The epoch's metrics on the validation split, recorded in ``progress``; raises if not finite."""
    setup.model.eval()
    with torch.no_grad():
        val_loss, out = _eval_loss(setup)
    metrics = {"train_loss": train_loss, "val_loss": float(val_loss.item())}
    if not all(math.isfinite(v) for v in metrics.values()) or not torch.isfinite(out).all():
        raise setup.diverged(progress, "the validation loss or output", epoch, progress.step, setup.batches)
    scores, confusion = validation_metrics(setup.data, out, setup.y_val)
    metrics.update(scores)
    metrics["lr"] = lr
    progress.metrics, progress.confusion = metrics, confusion
    progress.last_good = epoch
    progress.history.append({"epoch": float(epoch), **metrics})


def _eval_loss(setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation in chunks of a few batches: one pass over a large split (token ids through
    attention above all) would need memory for every row's activations at once.

    It runs the whole model in fp32: the metrics are those of the model exported.
    """
    model, loss_fn, x, y = setup.model, setup.loss_fn, setup.x_val, setup.y_val
    chunk = max(setup.training.batch_size * 8, 256)
    scale = None if setup.classification else getattr(model, "scale_target", None)
    outs: list[torch.Tensor] = []
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, len(x), chunk):
        xs, ys = x[start:start + chunk], y[start:start + chunk]
        out = model(xs)
        loss = loss_fn(scale(out), scale(ys)) if scale is not None else loss_fn(out, ys)
        total += loss.double() * len(xs)  # the losses are means: weigh each chunk by its rows
        outs.append(out)
    return (total / max(len(x), 1)).float(), torch.cat(outs)


def step_scheduler_per_epoch(setup: Setup, metrics: dict[str, float]) -> None:
    if setup.scheduler is None or setup.per_batch:
        return
    if setup.training.scheduler.name == SchedulerName.PLATEAU:
        setup.scheduler.step(metrics["val_loss"])
    else:
        setup.scheduler.step()


def early_stop(setup: Setup, progress: Progress, epoch: int) -> bool:
    """Keep the best epoch's weights; whether ``patience`` epochs have passed without a gain."""
    stopping = setup.training.early_stopping
    if stopping is None:
        return False
    value = progress.metrics[stopping.metric]
    best = progress.best
    if best is None:
        gain = math.inf
    else:
        gain = value - best.value if METRIC_GOALS[stopping.metric] else best.value - value
    if gain > stopping.min_delta:
        weights = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
        progress.best = Best(value=value, epoch=epoch, weights=weights, metrics=dict(progress.metrics),
                              confusion=progress.confusion)
        progress.since_best = 0
        return False
    progress.since_best += 1
    return progress.since_best >= stopping.patience


def save_state(setup: Setup, progress: Progress, epoch: int, stop: bool) -> None:
    if setup.checkpointer is None:
        return
    setup.checkpointer({
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "stopped_early": stop and epoch < setup.training.epochs,
        "step": progress.step,
        "last_good": progress.last_good,
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict() if setup.scheduler is not None else None,
        # fp16 only: the loss scale and its growth tracker, so that a resumed run scales alike.
        "grad_scaler": setup.scaler.state_dict() if setup.scaling else None,
        "rng": rng_state(setup.generator),
        "metrics": dict(progress.metrics),
        "history": list(progress.history),
        "confusion": progress.confusion,
        "since_best": progress.since_best,
        "best": None if progress.best is None else progress.best.saved(),
    })


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
