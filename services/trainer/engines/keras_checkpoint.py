"""The Keras child's checkpoint files: written after every epoch (by
:func:`services.trainer.engines.keras_callbacks.checkpoint_callback`, with the helpers here), read back
by the process that takes over a lost worker's job (:func:`load_resume`).

The files are ``last.keras`` (the model with its optimizer state), ``state.json`` (the run's
progress, early stopping's and the plateau scheduler's counters) and, under early stopping, the
best epoch's weights. Each appears in the checkpoint folder whole (an ``os.replace``); the child
waits for the parent to upload each checkpoint before it goes on (:func:`wait_for_upload`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.trainer.engines.keras_job import (
    CHECKPOINT_BEST,
    CHECKPOINT_MODEL,
    CHECKPOINT_STATE,
    CHECKPOINT_VERSION,
)
from services.trainer.engines.keras_setup import Job, backend_name

log = logging.getLogger("shipyard.trainer.keras_child")

# The job process that started this one: if it goes away, so does this one (see ``orphaned``).
PARENT_PID = os.getppid()


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


def plain_number(value: Any) -> Any:
    if value is None:
        return None
    number = float(np.asarray(value))
    return number if math.isfinite(number) else None


def move_into(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError:  # another file system: copy beside the target, then rename
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def write_atomic(path: Path, write: Any, staging: Path) -> None:
    tmp = staging / path.name
    with open(tmp, "wb") as handle:
        write(handle)
    move_into(tmp, path)
