"""What one closed window holds: its status, data quality, and drift of inputs and predictions.

Prediction drift compares the window's predictions with the training target of the served
version's dataset revision (``shipyard.target``): for a classifier, the predicted class (the
class of the highest probability, classes in the trainer's order: the sorted distinct target
values) against the target's classes, as categories; for a regressor, the predicted value
against the target's values. It is reported beside the data drift and never counts in its share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from services.monitor.windows import quality, sequences
from services.monitor.windows.drift import Columns, DriftOptions, DriftResult, FeatureDrift, compute_drift
from services.monitor.windows.frames import WindowRows, to_frame
from services.monitor.windows.inputs import SEQUENCES
from services.monitor.windows.lineage import Lineage
from services.monitor.windows.references import (
    CATEGORICAL,
    NUMERICAL,
    ColumnStats,
    Reference,
    category_strings,
)
from shipyard_common.errors import Conflict

PREDICTION = "prediction"
NOT_COMPUTED = "not computed: no values in this window"


@dataclass
class Outcome:
    status: str
    message: str | None
    quality: dict[str, Any] = field(default_factory=dict)
    drift: DriftResult | None = None
    features: list[FeatureDrift] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    """The reference's answers for prediction drift: a column of the prepared frame, and its classes."""

    kind: str
    classes: tuple[str, ...] = ()


def assess(*, found: WindowRows, lineage: Lineage, reference: Reference, min_rows: int,
           options: DriftOptions) -> Outcome:
    """Check the quality of the window's rows and, when enough fit, compute their drift.

    A sequence version's rows are its sequences' summaries, compared with those of the training
    sequences (:mod:`.sequences`); a table's columns are of the kinds its model takes them as.
    """
    if lineage.inputs.kind == SEQUENCES:
        reference, lineage = sequences.summarised(reference, lineage=lineage)
    features = list(lineage.features)
    absent = [name for name in features if name not in reference.columns]
    if absent:
        raise Conflict(f"dataset {reference.dataset!r} at {reference.rev[:12]} lacks features {absent[:5]} "
                       f"that v{lineage.version} was trained on")
    columns = reference.columns_as(lineage.inputs.kinds(lineage.features))
    report = quality.schema_quality(found)
    report["reference_rows"] = reference.rows
    verdict = quality.judge(found, None, min_rows=min_rows)
    if not found.rows:
        return Outcome(verdict.status, verdict.message, report)
    typed = to_frame(found.rows, features=features, columns=columns)
    outputs = _outputs(found.outputs)
    # Millions of Python floats in lists: gone before Evidently runs, or every collection of the
    # garbage collector walks them again.
    found.release()
    report.update(quality.value_quality(typed, columns))
    verdict = quality.judge(found, typed.frame, min_rows=min_rows)
    if verdict.status != quality.OK:
        return Outcome(verdict.status, verdict.message, report)
    return _drift(outputs, typed.frame, lineage=lineage, reference=reference, stats=columns, report=report,
                  options=options)


def _outputs(outputs: list[Any]) -> np.ndarray | str:
    """The logged outputs as an array of one row per input row, or why they are not."""
    try:
        values = np.array(outputs, dtype=np.float64)
    except (TypeError, ValueError):
        return "the logged outputs are not rows of numbers of one width"
    return values.reshape(len(outputs), -1)


def _drift(outputs: np.ndarray | str, current: pd.DataFrame, *, lineage: Lineage, reference: Reference,
           stats: dict[str, ColumnStats], report: dict[str, Any], options: DriftOptions) -> Outcome:
    features = list(lineage.features)
    kinds = {name: stats[name].kind for name in features}
    prepared, target = reference.prepared(
        ("evidently", lineage.features, tuple(kinds.values()), lineage.target, lineage.task),
        lambda: _prepare(reference, lineage, kinds))
    judged = [name for name in features if current[name].notna().any() and prepared[name].notna().any()]
    predicted, why = _predictions(outputs, target)
    columns = Columns(kinds=kinds, features=judged)
    if predicted is not None and target is not None:
        current = current.assign(**{_prediction_column(features): predicted})
        columns = Columns(kinds={**kinds, _prediction_column(features): target.kind}, features=judged,
                          prediction=_prediction_column(features))
    report["prediction_drift"] = {"reference": f"training target {lineage.target!r}", "skipped": why}
    result = compute_drift(reference=prepared, current=current, columns=columns, options=options)
    judged_by_name = {feature.name: feature for feature in result.features}
    every = [judged_by_name.get(name) or FeatureDrift(name, None, NOT_COMPUTED, None, False, kinds[name])
             for name in features]
    report["not_judged"] = [name for name in features if name not in judged_by_name]
    return Outcome(quality.OK, None, report, result, every)


def _prediction_column(features: list[str]) -> str:
    return PREDICTION if PREDICTION not in features else f"__{PREDICTION}__"


def _prepare(reference: Reference, lineage: Lineage,
             kinds: dict[str, str]) -> tuple[pd.DataFrame, Target | None]:
    """The reference as Evidently reads it (numbers as float64, categories as strings) and its target."""
    source = reference.frame
    prepared = pd.DataFrame(index=source.index)
    for name in lineage.features:
        prepared[name] = _typed(source[name], kinds[name])
    target_name = lineage.target
    if not target_name or target_name not in source.columns or lineage.task not in ("classification",
                                                                                      "regression"):
        return prepared, None
    if lineage.task == "classification":
        classes = tuple(str(value) for value in sorted(source[target_name].dropna().unique().tolist()))
        prepared[_prediction_column(list(lineage.features))] = _typed(source[target_name], CATEGORICAL)
        return prepared, Target(CATEGORICAL, classes)
    prepared[_prediction_column(list(lineage.features))] = _typed(source[target_name], NUMERICAL)
    return prepared, Target(NUMERICAL)


def _typed(series: pd.Series, kind: str) -> pd.Series:
    if kind == NUMERICAL:
        return pd.to_numeric(series, errors="coerce").astype(np.float64)
    return category_strings(series)


def _predictions(values: np.ndarray | str, target: Target | None) -> tuple[pd.Series | None, str | None]:
    """The window's predicted classes or values, or why there are none."""
    if target is None:
        return None, "the version has no usable target/task lineage tags"
    if isinstance(values, str):
        return None, values
    if target.kind == NUMERICAL:
        if values.shape[1] != 1:
            return None, f"a regressor's outputs have {values.shape[1]} values per row, not 1"
        return pd.Series(values[:, 0]), None
    if values.shape[1] != len(target.classes):
        return None, (f"the outputs have {values.shape[1]} values per row; "
                      f"the target has {len(target.classes)} classes")
    labels = np.array(target.classes, dtype=object)[np.nan_to_num(values, nan=-np.inf).argmax(axis=1)]
    labels[np.isnan(values).any(axis=1)] = None
    return pd.Series(labels, dtype=object), None
