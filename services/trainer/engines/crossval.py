"""Cross-validation (``evaluation.kfold``): the training rows cut into k folds, the engine trained on
all folds but one and scored on that one, k times, before the registered model trains on every
training row. The folds only measure: their models are thrown away (docs/training.md)."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pandas as pd

from services.trainer.engines import engine, preprocess
from services.trainer.engines.types import FitContext, Fold, Observer, TabularData
from services.trainer.jobs.schemas import JobCreate, Task
from shipyard_common.errors import InvalidInput

log = logging.getLogger("shipyard.trainer.crossval")

#: (positions in x_train of the fold's training rows, of its validation rows)
Cut = tuple[np.ndarray, np.ndarray]


def cuts(data: TabularData, spec: JobCreate) -> list[Cut]:
    """The k folds of ``data``'s training rows, shuffled with the split's seed (the training seed without
    a split), stratified by class when asked and the task is classification."""
    from sklearn.model_selection import KFold, StratifiedKFold

    assert spec.evaluation is not None
    split = spec.data.split
    seed = split.seed if split is not None else spec.training.seed
    k = spec.evaluation.kfold
    if len(data.x_train) < k:
        raise InvalidInput(f"evaluation.kfold is {k}, but there are {len(data.x_train)} training rows")
    if spec.evaluation.stratified and data.task == Task.CLASSIFICATION:
        smallest = int(np.bincount(data.y_train.ravel()).min())
        if smallest < k:
            raise InvalidInput(
                f"evaluation.kfold is {k}, but a class has only {smallest} training rows: stratified folds "
                "need at least one of each class per fold (lower kfold, or stratified: false)")
        splitter: KFold | StratifiedKFold = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(data.x_train, data.y_train.ravel()))
    return list(KFold(n_splits=k, shuffle=True, random_state=seed).split(data.x_train))


def steps(data: TabularData, spec: JobCreate, folds: list[Cut]) -> int:
    """Optimizer steps the folds take in all (each fold trains on fewer rows than the final model)."""
    per_epoch = sum(math.ceil(len(train) / spec.training.batch_size) for train, _ in folds)
    return per_epoch * spec.training.epochs


def cross_validate(data: TabularData, context: FitContext, folds: list[Cut]) -> list[Fold]:
    """Train and score each fold; its progress counts toward the job's steps, its metrics toward none
    of the job's epochs (only the final model's epochs are the job's history)."""
    spec, done, found = context.spec, 0, []
    positions = np.asarray(data.rows.get("train", range(len(data.x_train))))
    for number, (train, validation) in enumerate(folds, start=1):
        fold = fold_data(data, context.frame, spec, (train, validation), number=number,
                         refit=context.initial_columns is None)
        result = engine.train(fold, spec, device=context.device, observer=_quiet(context.observer, done),
                              initial_weights=context.initial_weights, plugin_dir=context.plugin_dir)
        scores = {name: value for name, value in result.metrics.items() if name.startswith("val_")}
        log.info("fold %d/%d: %s", number, len(folds), ", ".join(f"{k}={v:.4g}" for k, v in scores.items()))
        found.append(Fold(metrics=scores, rows=positions[validation].tolist()))
        done += steps(data, spec, [(train, validation)])
    return found


def fold_data(
    data: TabularData, frame: pd.DataFrame, spec: JobCreate, cut: Cut, *, number: int, refit: bool = True
) -> TabularData:
    """One fold's rows: its training rows to train on, its held-out rows to score. A table's encoding
    (categories, fill values) is fitted afresh on the fold's training rows alone, ``frame``'s raw rows,
    so that its held-out rows are encoded as serving would encode rows training never saw (a category
    only they hold is unknown); the network's standardisation is fitted on them by the engine anyway.
    Without ``refit`` (fine-tuning: the parent version's encoding, which its weights need) the fold
    keeps the job's encoding."""
    train, validation = cut
    fold = dataclasses.replace(
        data, x_train=data.x_train[train], y_train=data.y_train[train], x_val=data.x_train[validation],
        y_val=data.y_train[validation], x_test=None, y_test=None, rows={}, val_frame=None, test_frame=None,
    )
    if data.table is None or not refit:
        return fold
    positions = np.asarray(data.rows["train"])
    rows = {"train": frame.iloc[positions[train]], "validation": frame.iloc[positions[validation]]}
    try:
        table = preprocess.fit_table(rows["train"], data.features, spec)
    except InvalidInput as exc:
        raise InvalidInput(f"cross-validation fold {number}: {exc.message}") from None
    return dataclasses.replace(fold, table=table, x_train=preprocess.encode(table, rows["train"]),
                               x_val=preprocess.encode(table, rows["validation"]))


def summary(folds: list[Fold]) -> dict[str, float]:
    """``cv_<metric>_mean`` and ``cv_<metric>_std`` (population) over the folds, e.g. cv_accuracy_mean."""
    if not folds:
        return {}
    names = [name for name in folds[0].metrics if all(name in fold.metrics for fold in folds)]
    values: dict[str, float] = {}
    for name in names:
        scores = np.asarray([fold.metrics[name] for fold in folds], dtype=np.float64)
        base = name.removeprefix("val_")
        values[f"cv_{base}_mean"], values[f"cv_{base}_std"] = float(scores.mean()), float(scores.std())
    return values


def per_fold(fold: Fold) -> dict[str, float]:
    """A fold's metrics as the run logs them, one step per fold: ``cv_<metric>``."""
    return {f"cv_{name.removeprefix('val_')}": value for name, value in fold.metrics.items()}


def _quiet(observer: Observer, offset: int) -> Observer:
    """The job's observer for a fold: its steps after ``offset``, no epoch of the job's (epoch 1, no
    metrics), so that a cancel still stops it and the progress still moves."""

    def report(epoch: int, step: int, metrics: dict[str, float] | None) -> None:
        observer(1, offset + step, None)

    return report


def shifted(observer: Observer, offset: int) -> Observer:
    """The job's observer for the final model: its steps after the folds' ``offset``."""

    def report(epoch: int, step: int, metrics: dict[str, float] | None) -> None:
        observer(epoch, offset + step, metrics)

    return report
