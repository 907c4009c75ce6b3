"""Framework ``keras``: Keras 3 training in a child process, reported as if it ran here.

Keras picks its backend once per process, so every job gets a fresh child
(:mod:`services.trainer.engines.keras_child`): backend ``torch`` unless a SavedModel is wanted, then
``tensorflow``. This side prepares the data exactly as the PyTorch jobs do
(:func:`services.trainer.engines.engine.prepare_data`), hands the child the arrays and the spec as
files in the job's scratch folder, relays its events through :func:`services.trainer.engines.child.run`
(plan, steps, epochs, checkpoints; a cancel kills the child) and turns its result file into a
:class:`~services.trainer.engines.types.FitOutcome`.

A TensorFlow child cannot write ONNX (that needs ``tf2onnx``), so when a job wants both
``savedmodel`` and ``onnx`` the TensorFlow child saves the serving model as a ``.keras`` file,
which every backend reads, and a second, torch-backend child exports that to ONNX and checks
it against the predictions the TensorFlow model made.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

import services
from services.trainer.engines import child, engine, quantize
from services.trainer.engines.tabular import metrics_on_test_rows
from services.trainer.engines.types import Export, FitContext, FitOutcome, TabularData
from services.trainer.jobs.schemas import ExportFormat, JobCreate, Precision, SchedulerName, Task
from shipyard_common.errors import InvalidInput

log = logging.getLogger("shipyard.trainer.keras_job")

# Files the child keeps in ``context.checkpoint_dir`` after every epoch (see keras_child).
CHECKPOINT_MODEL = "last.keras"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_BEST = "best.weights.npz"
CHECKPOINT_VERSION = 1

# What the parent writes into ``<workdir>/keras`` for the child, and what the child writes back.
JOB_FILE = "job.json"
ARRAYS = ("x_train", "y_train", "x_val", "y_val")
SERVING_MODEL = "serving.keras"  # the trained serving model, for an export by another backend
REFERENCE = "reference.npy"  # the serving model's own answers on the validation rows
TEST_ROWS = "x_test.npy"  # a three-way split's test rows, when the spec has one
TEST_OUTPUTS = "test_out.npy"  # the trained model's outputs on them (the target's units), for test_* metrics
RESULT_FILE = "result.json"
# The number of checkpoints the parent has uploaded; the child waits for it after each one.
ACK_FILE = "checkpoints.ack"
ONNX_RESULT_FILE = "onnx_result.json"


def backend_for(spec: JobCreate) -> str:
    """``tensorflow`` when a SavedModel is wanted (only that backend writes one), else ``torch``."""
    return "tensorflow" if ExportFormat.SAVEDMODEL in spec.exports else "torch"


def check_spec(data: TabularData, spec: JobCreate, device: str) -> None:
    """Refuse, before any process starts, what the Keras jobs cannot do with this data."""
    training, model = spec.training, spec.model
    n_features = len(data.features)
    if training.scheduler.name == SchedulerName.ONECYCLE:
        raise InvalidInput(
            "training.scheduler 'onecycle' is not available with framework 'keras'; "
            "use 'step', 'cosine' or 'plateau', or framework 'pytorch'"
        )
    if training.precision == Precision.FP16 and device != "cuda":
        raise InvalidInput(
            f"training.precision 'fp16' needs a CUDA device and this job runs on {device}; "
            "use 'bf16' or 'fp32'"
        )
    stopping = training.early_stopping
    if stopping and stopping.metric == "val_roc_auc" and len(data.classes) != 2:
        raise InvalidInput(
            f"training.early_stopping.metric 'val_roc_auc' needs two classes; "
            f"target {data.target!r} has {len(data.classes)}"
        )
    if model.type == "cnn":
        channels, height, width = model.input_shape
        if channels * height * width != n_features:
            raise InvalidInput(
                f"model.input_shape {list(model.input_shape)} holds {channels * height * width} values "
                f"but there are {n_features} features"
            )
    elif model.type in ("lstm", "gru") and (
            model.sequence_length is None or n_features % model.sequence_length):
        raise InvalidInput(
            f"{n_features} features cannot be read as {model.sequence_length} steps of equal width "
            f"(model.sequence_length must divide the number of features)"
        )


def child_env(backend: str, device: str) -> dict[str, str]:
    root = str(Path(services.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    env = {
        "KERAS_BACKEND": backend,
        "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}",
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # TensorFlow takes every GPU's whole memory by default; take what the job needs.
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    }
    if device != "cuda":
        # A CPU job must not touch (or reserve memory on) a GPU that this machine happens to have.
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def acknowledging(context: FitContext, ack: Path) -> FitContext:
    """``context`` whose ``checkpoint_saved`` then tells the child that the upload is done.

    The child waits for that before it trains on: otherwise the next epoch's files could replace
    the ones being uploaded, and the uploaded model and state would belong to different epochs.
    """
    ack.unlink(missing_ok=True)
    uploaded = 0

    def checkpoint_saved() -> None:
        nonlocal uploaded
        context.checkpoint_saved()
        uploaded += 1
        tmp = ack.with_name(ack.name + ".tmp")
        tmp.write_text(str(uploaded))
        os.replace(tmp, ack)

    return dataclasses.replace(context, checkpoint_saved=checkpoint_saved)


def fit(context: FitContext) -> FitOutcome:
    spec = context.spec
    data = engine.prepare_data(context.frame, spec, context.test_frame)
    check_spec(data, spec, context.device)
    folder = _write_job(context, data)
    backend = backend_for(spec)
    log.info("training with Keras (backend %s) in a child process", backend)
    module = [sys.executable, "-m", "services.trainer.engines.keras_child", str(folder)]
    result = child.run(module, context=acknowledging(context, folder / ACK_FILE),
                       env=child_env(backend, context.device))
    done: dict[str, dict[str, Any]] = {item["format"]: item for item in result["exports"]}
    if ExportFormat.ONNX in spec.exports and ExportFormat.ONNX.value not in done:
        # Written by a torch-backend child from the TensorFlow child's .keras file.
        log.info("exporting ONNX from the trained model with the Keras torch backend")
        onnx_result = child.run([*module, "--onnx"], context=context, env=child_env("torch", "cpu"))
        done.update({item["format"]: item for item in onnx_result["exports"]})

    tested = metrics_on_test_rows(data, lambda _: np.load(folder / TEST_OUTPUTS, allow_pickle=False))
    outcome = FitOutcome(
        task=data.task, features=data.features, target=data.target, classes=data.classes,
        n_train=len(data.x_train), n_val=len(data.x_val),
        metrics={**{k: float(v) for k, v in result["metrics"].items()}, **tested},
        n_test=0 if data.x_test is None else len(data.x_test), rows=data.rows,
        history=[{k: float(v) for k, v in entry.items()} for entry in result["history"]],
        confusion=result["confusion"] if data.task == Task.CLASSIFICATION else None,
        best_epoch=result["best_epoch"], stopped_early=bool(result["stopped_early"]),
        seconds=float(result["seconds"]), device=str(result["device"]), exports=_exports(data, spec, done),
        state_dict=None, card=dict(result["card"]),
    )
    quantize.add_int8(outcome, data, spec, context.workdir / "exports")
    return outcome


def _write_job(context: FitContext, data: TabularData) -> Path:
    """The child's folder: the prepared arrays (``.npy``, no pickle) and the job it runs (JSON)."""
    spec = context.spec
    folder = context.workdir / "keras"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        np.save(folder / f"{name}.npy", getattr(data, name), allow_pickle=False)
    if data.x_test is not None:
        np.save(folder / TEST_ROWS, data.x_test, allow_pickle=False)
    job = {
        # onnx_int8 is made here, from the child's ONNX export (quantize.add_int8).
        "spec": {**spec.model_dump(mode="json"),
                 "exports": [f.value for f in spec.exports if f != ExportFormat.ONNX_INT8]},
        "features": data.features,
        "classes": data.classes,
        "device": context.device,
        "checkpoint_dir": str(context.checkpoint_dir),
        "resume_dir": str(context.resume_dir) if context.resume_dir is not None else None,
        "tensorboard_dir": str(context.tensorboard_dir),
        "exports_dir": str(context.workdir / "exports"),
    }
    (folder / JOB_FILE).write_text(json.dumps(job))
    return folder


def _exports(data: TabularData, spec: JobCreate, done: dict[str, dict[str, Any]]) -> list[Export]:
    """The child's exports in the spec's order (onnx_int8 is added after, from the ONNX file)."""
    exports: list[Export] = []
    for fmt in spec.exports:
        if fmt == ExportFormat.ONNX_INT8:
            continue
        item = done[fmt.value]
        signature = dict(item["signature"])
        if data.classes:
            signature["classes"] = list(data.classes)
        log.info("exported %s: max |difference| from Keras on %d held-out rows = %.3g",
                 fmt.value, len(data.x_val), item["max_abs_diff"])
        exports.append(Export(format=fmt, path=Path(item["path"]), max_abs_diff=float(item["max_abs_diff"]),
                              signature=signature))
    return exports
