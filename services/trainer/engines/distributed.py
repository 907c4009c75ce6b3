"""``resources.gpus > 1``: the engine's loop under torchrun, one process per GPU, DistributedDataParallel.

The parent (:func:`train`, in the worker) writes the data arrays (``np.save``, no pickle), the
spec and the starting weights into ``context.workdir``, then runs::

    python -m torch.distributed.run --standalone --nproc_per_node=<gpus> \
        -m services.trainer.engines.distributed …

through :func:`services.trainer.engines.child.run`, which relays the ranks' events to the job. Each rank
(:func:`main`) joins the process group (NCCL on CUDA, one GPU per rank; gloo on CPU, which is
how the tests run it) and calls :func:`services.trainer.engines.engine.train` with its ``rank`` and
``world_size``: ``DistributedSampler`` shares, a DDP model, the train loss all-reduced,
validation on every rank (same weights, same metrics, same early-stopping decisions), a NaN
in any rank stopping all of them at the same check. Rank 0 alone reports progress, writes the
checkpoint into ``context.checkpoint_dir`` (then emits ``checkpoint``), writes TensorBoard,
and at the end saves the final state dict and the metrics and emits ``result``. The parent
rebuilds the model with :func:`engine.build_model` and loads that state dict
(``weights_only=True``).

A rank that fails (divergence, bad input) emits ``failed`` with the engine's message, which
the parent raises as :class:`~services.trainer.engines.types.TrainingFailed`. torchrun starts
each rank in a session of its own, out of reach of the parent's process-group kill on cancel;
so each rank watches its launcher and exits as soon as the launcher is gone.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from services.trainer.engines import child, engine, preprocess
from services.trainer.engines.checkpoints import Checkpointer
from services.trainer.engines.resume import CHECKPOINT_FILE, load_resume
from services.trainer.engines.types import FitContext, Observer, TabularData, TrainingFailed
from services.trainer.jobs.schemas import JobCreate, Task
from shipyard_common.errors import ShipyardError

log = logging.getLogger("shipyard.trainer.distributed")

DATA_META = "data.json"
SPEC_FILE = "spec.json"
INITIAL_WEIGHTS = "initial_weights.pt"
RESULT_FILE = "result.json"
WEIGHTS_FILE = "model.pt"
# A rank reports a mid-epoch step at most this often (the job's progress is throttled anyway).
STEP_EVENT_EVERY_S = 0.5
ROOT = Path(__file__).resolve().parents[3]


def train(data: TabularData, context: FitContext) -> engine.TrainResult:
    """Train on ``context.spec.resources.gpus`` processes; the fitted model as ``engine.train`` gives it."""
    spec = context.spec
    world = spec.resources.gpus
    device_type = torch.device(context.device).type
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise TrainingFailed(
            f"resources.gpus is {world} but this worker sees {torch.cuda.device_count()} GPU(s)"
        )
    # Input errors surface here, in the job's process, as they would without DDP.
    engine._check_spec_fits_data(data, spec)
    plugin_dir = context.plugin_dir
    model = engine.build_model(data, spec, plugin_dir=plugin_dir)
    if context.initial_weights is not None:
        engine.load_initial_weights(model, context.initial_weights)

    folder = context.workdir / "distributed"
    folder.mkdir(parents=True, exist_ok=True)
    write_data(data, folder)
    (folder / SPEC_FILE).write_text(spec.model_dump_json())
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
        "-m", "services.trainer.engines.distributed",
        "--folder", str(folder), "--device", device_type, "--checkpoint-dir", str(context.checkpoint_dir),
        "--tensorboard-dir", str(context.tensorboard_dir),
    ]
    if plugin_dir is not None:
        command += ["--plugin-dir", str(plugin_dir)]
    if context.initial_weights is not None:
        torch.save(context.initial_weights, folder / INITIAL_WEIGHTS)
        command += ["--initial-weights", str(folder / INITIAL_WEIGHTS)]
    resume = _resume_file(context)
    if resume is not None:
        command += ["--resume", str(resume)]
    path = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}
    log.info("training on %d %s processes (DistributedDataParallel)", world, device_type)
    result = child.run(command, context=context, env=env, cwd=ROOT)

    weights = torch.load(result["weights"], map_location="cpu", weights_only=True)
    model.load_state_dict(weights)
    model.eval()
    return engine.TrainResult(
        model=model, metrics=dict(result["metrics"]), device=context.device, seconds=float(result["seconds"]),
        history=list(result["history"]), confusion=result["confusion"], best_epoch=result["best_epoch"],
        stopped_early=bool(result["stopped_early"]),
    )


def _resume_file(context: FitContext) -> Path | None:
    # The same rule as in-process training: a readable checkpoint resumes, anything else starts over.
    if load_resume(context) is None or context.resume_dir is None:
        return None
    return context.resume_dir / CHECKPOINT_FILE


def write_data(data: TabularData, folder: Path) -> None:
    """Arrays as ``<field>.npy`` (no pickle); the other fields (JSON values, enums, paths, a table's
    columns as ``Table.describe`` gives them) in data.json. The raw frames stay behind: only the parent
    exports, and it checks the exported graph on them."""
    kind = type(data)
    meta: dict[str, Any] = {"class": f"{kind.__module__}:{kind.__qualname__}", "arrays": [], "values": {}}
    for item in dataclasses.fields(data):
        value = getattr(data, item.name)
        if isinstance(value, pd.DataFrame):
            continue
        if isinstance(value, preprocess.Table):
            meta["values"][item.name] = {"table": value.describe()}
        elif isinstance(value, np.ndarray):
            np.save(folder / f"{item.name}.npy", value, allow_pickle=False)
            meta["arrays"].append(item.name)
        elif isinstance(value, enum.Enum):
            meta["values"][item.name] = {"enum": value.value}
        elif isinstance(value, Path):
            meta["values"][item.name] = {"path": str(value)}
        else:
            meta["values"][item.name] = {"json": value}
    (folder / DATA_META).write_text(json.dumps(meta))


def read_data(folder: Path) -> TabularData:
    meta = json.loads((folder / DATA_META).read_text())
    module, _, name = str(meta["class"]).partition(":")
    if not module.startswith("services.trainer."):
        raise ValueError(f"{meta['class']!r} is not a Shipyard data class")
    kind = getattr(importlib.import_module(module), name)
    values: dict[str, Any] = {n: np.load(folder / f"{n}.npy", allow_pickle=False) for n in meta["arrays"]}
    for key, boxed in meta["values"].items():
        if "enum" in boxed:
            values[key] = Task(boxed["enum"])
        elif "path" in boxed:
            values[key] = Path(boxed["path"])
        elif "table" in boxed:
            values[key] = preprocess.table_of(boxed["table"], where=f"the ranks' {DATA_META}")
        else:
            values[key] = boxed["json"]
    data: TabularData = kind(**values)
    return data


def _watch_launcher() -> None:
    """Exit when torchrun is gone (killed on cancel): nothing else would stop this rank."""
    launcher = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != launcher:
                os._exit(3)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    """One rank (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address)."""
    import torch.distributed as dist

    args = _parse_args(argv)
    _watch_launcher()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    dist.init_process_group(backend=backend)
    lead = rank == 0
    try:
        spec = JobCreate.model_validate_json((args.folder / SPEC_FILE).read_text())
        data = read_data(args.folder)
        initial = None
        if args.initial_weights is not None:
            initial = torch.load(args.initial_weights, map_location="cpu", weights_only=True)
        resume = engine.load_checkpoint(args.resume) if args.resume is not None else None
        result = engine.train(
            data, spec, device=device, observer=_observer() if lead else None,
            checkpointer=_checkpointer(args.checkpoint_dir) if lead else None, resume=resume,
            tensorboard_dir=args.tensorboard_dir if lead else None, initial_weights=initial,
            plugin_dir=args.plugin_dir, rank=rank, world_size=world,
        )
        if lead:
            _write_result(result, args.folder)
        return 0
    except ShipyardError as exc:
        # Every rank raises the engine's divergence alike; one message reaches the job.
        if lead:
            child.emit("failed", message=exc.message)
        return 1
    finally:
        dist.destroy_process_group()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="one DDP rank of a Shipyard training job")
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--tensorboard-dir", type=Path, required=True)
    parser.add_argument("--initial-weights", type=Path)
    parser.add_argument("--plugin-dir", type=Path)
    parser.add_argument("--resume", type=Path)
    return parser.parse_args(argv)


def _observer() -> Observer:
    """Rank 0's reports to the job process: every epoch, and a mid-epoch step at most so often."""
    last_step_event = 0.0

    def observer(epoch: int, step: int, metrics: dict[str, float] | None) -> None:
        nonlocal last_step_event
        if metrics is not None:
            child.emit("epoch", epoch=epoch, step=step, metrics=metrics)
            return
        now = time.monotonic()
        if now - last_step_event >= STEP_EVENT_EVERY_S:
            last_step_event = now
            child.emit("step", epoch=epoch, step=step)

    return observer


def _checkpointer(checkpoint_dir: Path) -> Checkpointer:
    def checkpointer(state: dict[str, Any]) -> None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(state, checkpoint_dir / CHECKPOINT_FILE)
        child.emit("checkpoint")

    return checkpointer


def _write_result(result: engine.TrainResult, folder: Path) -> None:
    """Rank 0's weights and summary, for the job process (see :func:`train`)."""
    weights = folder / WEIGHTS_FILE
    torch.save(result.model.state_dict(), weights)
    summary = {
        "weights": str(weights), "metrics": result.metrics, "history": result.history,
        "confusion": result.confusion, "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early, "seconds": result.seconds, "device": result.device,
    }
    (folder / RESULT_FILE).write_text(json.dumps(summary))
    child.emit("result", path=str(folder / RESULT_FILE))


if __name__ == "__main__":
    sys.exit(main())
