"""Tabular data for the PyTorch engine: the spec's columns checked and split, and the validation metrics.

:func:`validation_metrics` is shared: the Keras child computes its epoch metrics with it too, so that
both frameworks name and compute them alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from services.trainer.engines.types import TabularData
from services.trainer.jobs.schemas import JobCreate, Task
from shipyard_common.errors import InvalidInput


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
