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

The work is split by concern: :mod:`~.keras_setup` (the job, the model, the optimizer),
:mod:`~.keras_callbacks` (what runs around ``fit``), :mod:`~.keras_checkpoint` (its files, and
resuming from them), :mod:`~.keras_export` (the checked exports). This module is the entry point.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.trainer.engines import child
from services.trainer.engines.keras_callbacks import RunState, make_callbacks, validation_scores
from services.trainer.engines.keras_checkpoint import load_resume
from services.trainer.engines.keras_export import export_onnx, export_savedmodel
from services.trainer.engines.keras_job import (
    ONNX_RESULT_FILE,
    REFERENCE,
    RESULT_FILE,
    SERVING_MODEL,
    TEST_OUTPUTS,
    TEST_ROWS,
)
from services.trainer.engines.keras_setup import (
    PREDICT_BATCH,
    Failed,
    Job,
    backend_name,
    build_core,
    build_serving,
    compile_model,
    configure,
    load_job,
    running_device,
)
from services.trainer.jobs.schemas import ExportFormat

log = logging.getLogger("shipyard.trainer.keras_child")


@dataclass
class Start:
    """Where training starts: a new compiled model at epoch 1, or a lost worker's from its checkpoint."""

    core: Any
    saved: dict[str, Any] | None = None  # the checkpoint's state.json
    best_weights: list[np.ndarray] | None = None
    first_epoch: int = 1
    stopped_early: bool = False


def train(job: Job) -> dict[str, Any]:
    training = job.spec.training
    configure(job)
    device = running_device()
    state = RunState(epochs=training.epochs, batches=job.steps_per_epoch)
    start = start_or_resume(job, state)
    callbacks, stopper = make_callbacks(job, state, start.saved, start.best_weights)
    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    child.emit("plan", steps=job.steps_per_epoch * training.epochs)

    started = time.monotonic()
    if start.first_epoch <= training.epochs:
        start.core.fit(job.x_train, fit_target(job), batch_size=training.batch_size, epochs=training.epochs,
                       initial_epoch=start.first_epoch - 1, shuffle=True, verbose=0, callbacks=callbacks)
    seconds = time.monotonic() - started

    best_epoch, stopped_early = early_stopping_outcome(job, start, stopper)
    metrics = final_metrics(job, state, best_epoch)
    out = np.asarray(start.core.predict(job.x_val, batch_size=PREDICT_BATCH, verbose=0))
    _, _, confusion = validation_scores(job, out)
    score_test_rows(job, start.core)
    exports = export_all(job, build_serving(job, start.core))
    return {
        "metrics": metrics, "history": state.history, "confusion": confusion if job.classification else None,
        "best_epoch": best_epoch, "stopped_early": stopped_early, "seconds": seconds,
        "device": device if job.device == "cuda" else "cpu", "exports": exports,
        "card": model_card(start.core),
    }


def score_test_rows(job: Job, core: Any) -> None:
    """The trained model's outputs on a three-way split's test rows, in the target's units, for the
    parent's ``test_*`` metrics: measured once, after training (and after restore_best)."""
    rows = job.folder / TEST_ROWS
    if not rows.exists():
        return
    out = np.asarray(core.predict(np.load(rows, allow_pickle=False), batch_size=PREDICT_BATCH, verbose=0))
    if not job.classification:
        mean, std = job.target_scale()
        out = out * std + mean
    np.save(job.folder / TEST_OUTPUTS, out.astype(np.float32), allow_pickle=False)


def start_or_resume(job: Job, state: RunState) -> Start:
    """A new compiled model; or the lost worker's, with ``state`` set from its checkpoint."""
    resumed = load_resume(job)
    if resumed is None:
        core = build_core(job)
        compile_model(job, core)
        return Start(core=core)
    core, saved, best_weights = resumed
    first_epoch = int(saved["epoch"]) + 1
    state.step, state.last_good = int(saved["step"]), int(saved["last_good"])
    state.history, state.confusion = list(saved["history"]), saved["confusion"]
    if state.history:
        state.metrics = {k: v for k, v in state.history[-1].items() if k != "epoch"}
    log.info("resuming at epoch %d from the checkpoint", first_epoch)
    stopped_early = bool(saved["stopped_early"])
    if stopped_early:  # it had stopped early: nothing left to train
        first_epoch = job.spec.training.epochs + 1
    return Start(core=core, saved=saved, best_weights=best_weights, first_epoch=first_epoch,
                 stopped_early=stopped_early)


def fit_target(job: Job) -> np.ndarray:
    """What ``fit`` trains on: the labels, or the standardised target (as the PyTorch jobs do)."""
    if job.classification:
        return job.y_train
    mean, std = job.target_scale()
    return ((job.y_train - mean) / std).astype(np.float32)


def early_stopping_outcome(job: Job, start: Start, stopper: Any) -> tuple[int | None, bool]:
    """(best epoch, stopped early); a resumed run that had finished restores its best weights here."""
    training = job.spec.training
    stopping, stopped_early = training.early_stopping, start.stopped_early
    if stopping is None:
        return None, stopped_early
    best_epoch: int | None = None
    if stopper.stopped_epoch > 0:
        stopped_early = stopper.stopped_epoch + 1 < training.epochs
    if start.first_epoch <= training.epochs:
        best_epoch = int(stopper.best_epoch) + 1
    elif start.saved and start.saved.get("early_stopping"):
        best_epoch = int(start.saved["early_stopping"]["best_epoch"]) + 1
        if stopping.restore_best and start.best_weights is not None:
            start.core.set_weights(start.best_weights)  # fit did not run, so EarlyStopping restored nothing
    return best_epoch, stopped_early


def final_metrics(job: Job, state: RunState, best_epoch: int | None) -> dict[str, float]:
    """The last epoch's metrics; the best epoch's when early stopping restored its weights."""
    if not state.history:
        raise Failed("no epoch finished")
    metrics = {k: v for k, v in state.history[-1].items() if k != "epoch"}
    stopping = job.spec.training.early_stopping
    if best_epoch is not None and stopping is not None and stopping.restore_best:
        for entry in state.history:
            if int(entry["epoch"]) == best_epoch:
                metrics = {k: v for k, v in entry.items() if k != "epoch"}
    return metrics


def export_all(job: Job, serving: Any) -> list[dict[str, Any]]:
    """Every export the spec asks for, checked against the serving model's own answers."""
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
    return exports


def model_card(core: Any) -> dict[str, Any]:
    """What the model card says about the trained model beyond the spec."""
    import keras

    layers = [layer for layer in core.layers if type(layer).__name__ != "InputLayer"]
    return {
        "parameters": int(core.count_params()),
        "architecture": " → ".join(type(layer).__name__ for layer in layers),
        "backend": backend_name(),
        "keras_version": keras.__version__,
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
