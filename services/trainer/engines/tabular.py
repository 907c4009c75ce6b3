"""Tabular data for the PyTorch engine: the spec's columns checked and split, and the validation metrics.

:func:`validation_metrics` is shared: the Keras child computes its epoch metrics with it too, so that
both frameworks name and compute them alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from services.trainer.engines import preprocess
from services.trainer.engines.types import TabularData
from services.trainer.jobs.schemas import SPLIT_PARTS, JobCreate, Task, table_refusal
from shipyard_common.errors import InvalidInput


def prepare_data(
    frame: pd.DataFrame, spec: JobCreate, test_frame: pd.DataFrame | None = None, *,
    parent_table: preprocess.Table | None = None,
) -> TabularData:
    """Pick the columns, check them, and split them (:func:`split_rows`; stratified for classification);
    ``test_frame``: the rows of ``data.split.test_rev``, the test rows when the split names one.

    Categorical columns and missing values make a table (:mod:`~.preprocess`): its encodings and fill
    values fitted on the training rows only, then every part's rows encoded with them. Fine-tuning
    (``parent_table``, the parent version's) keeps the parent's: its weights mean those slots.
    """
    data = spec.data
    split_column = data.split.column if data.split is not None else None
    features = list(data.features) if data.features is not None else [
        str(c) for c in frame.columns if str(c) not in (data.target, split_column)]
    _check_columns(frame, features, spec, data.rev, extra=[split_column] if split_column else [])
    y, classes = _labels(frame[data.target], spec)
    rows = split_rows(frame, spec, y if classes else None)
    table = _table(frame, features, spec, rows["train"], parent_table)
    x = _feature_rows(frame, features, table)
    test = rows.get("test")
    x_test, y_test = (None, None) if test is None else (x[test], y[test])
    raw_test = None if test is None else frame.iloc[test]
    if test_frame is not None and data.split is not None and data.split.test_rev is not None:
        _check_columns(test_frame, features, spec, data.split.test_rev)
        x_test = _feature_rows(test_frame, features, table)
        y_test, _ = _labels(test_frame[data.target], spec, classes=classes)
        rows["test"] = np.arange(len(test_frame))
        raw_test = test_frame
    return TabularData(
        features=features, target=data.target, task=data.task,
        x_train=x[rows["train"]], y_train=y[rows["train"]], x_val=x[rows["validation"]],
        y_val=y[rows["validation"]], classes=[_plain(c) for c in classes], x_test=x_test, y_test=y_test,
        rows={part: positions.tolist() for part, positions in rows.items()}, table=table,
        val_frame=_raw(frame.iloc[rows["validation"]], features, table),
        test_frame=None if raw_test is None else _raw(raw_test, features, table),
    )


def _table(
    frame: pd.DataFrame, features: list[str], spec: JobCreate, train: np.ndarray,
    parent: preprocess.Table | None,
) -> preprocess.Table | None:
    """The table the rows are encoded with: the parent version's when fine-tuning one that has a table,
    else one fitted on the training rows where the features need it, else none."""
    if parent is None and not preprocess.needs_table(frame, features, spec):
        return None
    refused = table_refusal(spec)
    if refused:
        raise InvalidInput(f"the dataset has categorical columns or missing values: {refused}")
    if parent is None:
        return preprocess.fit_table(frame.iloc[train], features, spec)
    names = [column.name for column in parent.columns]
    if names != features:
        lacking, extra = [n for n in names if n not in features], [n for n in features if n not in names]
        differ = (f"this job lacks {lacking} and adds {extra}" if lacking or extra
                  else f"it takes them in the order {names}")
        raise InvalidInput(f"init_from: the parent version's feature columns differ ({differ}); fine-tuning "
                           "needs the same feature columns in the same order")
    return parent


def _raw(rows: pd.DataFrame, features: list[str], table: preprocess.Table | None) -> pd.DataFrame | None:
    """With a table, ``rows``' raw feature columns (what the exported graph takes); else None."""
    return None if table is None else rows[features].reset_index(drop=True)


def _check_columns(
    frame: pd.DataFrame, features: list[str], spec: JobCreate, rev: str, extra: list[str] | None = None
) -> None:
    """The 422 naming what is wrong with ``frame``'s columns (revision ``rev``), if anything is."""
    data = spec.data
    columns = [str(c) for c in frame.columns]
    missing = [c for c in [data.target, *features, *(extra or [])] if c not in columns]
    if missing:
        raise InvalidInput(
            f"dataset {data.dataset!r} at {rev[:12]} has no column(s) {missing}; "
            f"its columns are {columns[:50]}"
        )
    if not features:
        raise InvalidInput(f"dataset {data.dataset!r} has no feature columns besides the target")
    if frame[data.target].isna().any():
        raise InvalidInput(f"target {data.target!r} has missing values; drop those rows first")


def _feature_rows(frame: pd.DataFrame, features: list[str], table: preprocess.Table | None) -> np.ndarray:
    """``features`` of ``frame`` as float32 rows: as they are, or encoded by ``table``."""
    if table is not None:
        return preprocess.encode(table, frame)
    rows: np.ndarray = frame[features].to_numpy(dtype=np.float32)
    return rows


def _labels(
    target: pd.Series, spec: JobCreate, classes: list[Any] | None = None
) -> tuple[np.ndarray, list[Any]]:
    """The target as class indices (classification: the sorted classes, or ``classes`` given by the
    training rows) or float32 values (regression), and the classes."""
    name = spec.data.target
    if spec.data.task != Task.CLASSIFICATION:
        if not pd.api.types.is_numeric_dtype(target):
            raise InvalidInput(f"target {name!r} is not numeric; regression needs a number")
        return target.to_numpy(dtype=np.float32).reshape(-1, 1), []
    if classes is None:
        classes = sorted(target.unique().tolist())
        if len(classes) < 2:
            raise InvalidInput(f"target {name!r} has {len(classes)} class; classification needs two")
    unseen = sorted(set(target.unique().tolist()) - set(classes), key=str)
    if unseen:
        raise InvalidInput(f"the test revision's target {name!r} holds classes {unseen[:10]} that the "
                           f"training revision does not ({classes[:20]})")
    index = {label: i for i, label in enumerate(classes)}
    return target.map(index).to_numpy(dtype=np.int64), classes


def split_rows(frame: pd.DataFrame, spec: JobCreate, stratify: np.ndarray | None) -> dict[str, np.ndarray]:
    """Each part's row positions: ``data.split`` (shares drawn with its own seed, or a column naming each
    row's part), else ``validation_split`` with the training seed (train and validation only)."""
    data, split = spec.data, spec.data.split
    if split is not None and split.column is not None:
        parts = _parts_from_column(frame[split.column], split.column)
        if split.test_rev is not None and "test" in parts:
            raise InvalidInput(f"split column {split.column!r} names test rows, but data.split.test_rev "
                               "gives them: name only train and validation rows")
        return parts
    everything = np.arange(len(frame))
    if split is None:
        train, validation = _draw(everything, data.validation_split, spec.training.seed, stratify,
                                  "validation")
        return {"train": train, "validation": validation}
    assert split.train is not None and split.validation is not None
    if split.test_rev is not None:  # the test rows are another revision's
        train, validation = _draw(everything, split.validation, split.seed, stratify, "validation")
        return {"train": train, "validation": validation}
    assert split.test is not None
    rest, test = _draw(everything, split.test, split.seed, stratify, "test")
    rest_labels = None if stratify is None else stratify[rest]
    share = split.validation / (split.train + split.validation)
    train, validation = _draw(rest, share, split.seed, rest_labels, "validation")
    return {"train": train, "validation": validation, "test": test}


def _draw(
    positions: np.ndarray, share: float, seed: int, labels: np.ndarray | None, part: str
) -> tuple[np.ndarray, np.ndarray]:
    """(the rest, ``share`` of ``positions``), stratified on ``labels`` when given."""
    from sklearn.model_selection import train_test_split

    try:
        rest, drawn = train_test_split(positions, test_size=share, random_state=seed, stratify=labels)
    except ValueError as exc:  # too few rows, or a class too small to appear on both sides
        raise InvalidInput(f"cannot split {len(positions)} rows for {part}: {exc}") from exc
    return np.asarray(rest), np.asarray(drawn)


def _parts_from_column(column: pd.Series, name: str) -> dict[str, np.ndarray]:
    values = column.astype("string")
    unknown = sorted(set(values.dropna().unique()) - set(SPLIT_PARTS))
    if unknown or values.isna().any():
        shown = unknown[:5] + (["(missing)"] if values.isna().any() else [])
        raise InvalidInput(
            f"split column {name!r} holds {shown}; each row must name one of {list(SPLIT_PARTS)}"
        )
    parts = {part: np.flatnonzero((values == part).to_numpy()) for part in SPLIT_PARTS}
    empty = [part for part in ("train", "validation") if len(parts[part]) == 0]
    if empty:
        raise InvalidInput(f"split column {name!r} names no {' and no '.join(empty)} rows")
    if len(parts["test"]) == 0:
        del parts["test"]
    return parts


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


def metrics_on_test_rows(data: TabularData, predict: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    """The test rows' metrics, named ``test_*`` (as :func:`validation_metrics` computes them), measured
    once after training on rows neither training nor early stopping saw; {} without test rows."""
    if data.x_test is None or data.y_test is None or not len(data.x_test):
        return {}
    out = torch.from_numpy(np.ascontiguousarray(predict(data.x_test), dtype=np.float32))
    scores, _ = validation_metrics(data, out, torch.from_numpy(data.y_test))
    return {"test_" + name.removeprefix("val_"): value for name, value in scores.items()}
