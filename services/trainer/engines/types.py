"""The data types the engines share: what the runner hands a framework, and what comes back.

- :class:`TabularData`: a prepared dataset, split for training and validation;
- :class:`TrainingFailed`: the inputs were fine, but no usable model came out;
- :class:`FitContext`: a job's data, spec and callbacks, as a framework sees them;
- :class:`FitOutcome` and :class:`Export`: the fitted model's facts and its checked exports.

Nothing here imports torch or another engine module, so every module can import this one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from services.trainer.jobs.schemas import ExportFormat, JobCreate, Task
from shipyard_common.errors import ShipyardError

if TYPE_CHECKING:
    from services.trainer.engines.preprocess import Table

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
    # The test rows of a three-way split (data.split): scored once, after training; None without one.
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    # Each part's row positions in the dataset (train, validation, test), stored with the run.
    rows: dict[str, list[int]] = field(default_factory=dict)
    # A table with categorical columns or missing values (engines/preprocess.py): how each column is
    # encoded, fitted on the training rows; the x_* arrays are encoded. None: the columns as they are.
    table: Table | None = None
    # With a table: the validation rows' raw feature columns, which the exported graph is checked on,
    # and the test rows' (None without test rows), which the int8 file is scored on.
    val_frame: pd.DataFrame | None = None
    test_frame: pd.DataFrame | None = None


@dataclass
class FitContext:
    spec: JobCreate
    frame: pd.DataFrame
    device: str
    # Scratch space for this job, removed when it ends: exports and reports are written here.
    workdir: Path
    # Called after every step and every epoch; raises (JobAborted) when the job must stop.
    observer: Observer
    # The framework writes its checkpoint file(s) here each epoch, then calls ``checkpoint_saved``,
    # which uploads the folder's files as the run's ``checkpoints/``.
    checkpoint_dir: Path
    checkpoint_saved: Callable[[], None]
    # A lost worker's last checkpoint files, downloaded; None when training starts at epoch 1.
    resume_dir: Path | None
    # TensorBoard event files go here; ``job`` uploads the folder as the run's ``tensorboard/``.
    tensorboard_dir: Path
    # Called once, before the first step, with the number of optimizer steps the whole run
    # will take (all epochs), so that progress can show a fraction and an ETA.
    plan: Callable[[int], None]
    # Fine-tuning: the parent version's trained weights (a state dict read with weights_only).
    initial_weights: dict[str, Any] | None = None
    # Fine-tuning a table: the parent version's columns (its columns.json), which this job encodes with.
    initial_columns: list[dict[str, Any]] | None = None
    # Where ``model.type: plugin`` factories are looked up (the trainer's SHIPYARD_TRAINER_PLUGIN_DIR).
    plugin_dir: Path | None = None
    # The rows of ``data.split.test_rev`` (another revision of the dataset): the test rows.
    test_frame: pd.DataFrame | None = None


@dataclass(frozen=True)
class Export:
    format: ExportFormat
    # A file (model.onnx, model.pt) or a folder (SavedModel).
    path: Path
    # Largest |exported - framework| on held-out rows; checked ≤ 1e-4 (scaled for regression).
    max_abs_diff: float
    # {"inputs": [{"name", "shape" (None = any), "dtype"}], "outputs": [...]} (+ "classes").
    signature: dict[str, Any]


@dataclass(frozen=True)
class Fold:
    """One fold of a cross-validation: its validation metrics, and its rows' positions in the dataset."""

    metrics: dict[str, float]
    rows: list[int]


@dataclass
class FitOutcome:
    task: Task
    features: list[str]
    target: str
    # Classification: the label each output column stands for, in output order.
    classes: list[Any]
    n_train: int
    n_val: int
    metrics: dict[str, float]
    # One entry per finished epoch: {"epoch": n, "lr": …, "train_loss": …, "val_…": …}.
    history: list[dict[str, float]]
    confusion: list[list[int]] | None
    best_epoch: int | None
    stopped_early: bool
    seconds: float
    device: str
    exports: list[Export]
    # The trained weights as a state dict, kept as the run's ``weights/model.pt`` so that a later
    # job can fine-tune from this version (``init_from``); None where the framework has none.
    state_dict: dict[str, Any] | None = None
    # Further files to upload: (local path, artifact folder), e.g. the tokenizer.
    artifacts: list[tuple[Path, str]] = field(default_factory=list)
    # What the model card says about the model beyond the spec (parameters, architecture).
    card: dict[str, Any] = field(default_factory=dict)
    # Test rows (a three-way split), scored once after training into the ``test_*`` metrics.
    n_test: int = 0
    # Each part's row positions in the dataset revision (TabularData.rows): the version's split.json.
    rows: dict[str, list[int]] = field(default_factory=dict)
    # Cross-validation (evaluation.kfold): each fold's validation metrics and its rows' positions.
    folds: list[Fold] = field(default_factory=list)
    # A table's columns as declared or inferred and fitted (Table.describe(): the version's
    # columns.json, and the run's columns.* params); [] without a table.
    columns: list[dict[str, Any]] = field(default_factory=list)
