"""Labels against predictions: what a label means for a version, and the metrics sklearn computes.

No I/O here. A version's *target* says what it predicts: its task and, for a classifier, its
classes in training order (the ``classes`` of its ``shipyard.signature`` tag). Serving answers a
classifier's row with one probability per class in that order, so the predicted class is the index
of the highest probability, and a label is the index of its class in the same list. A regression
answers one value per row.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

CLASSIFICATION = "classification"
REGRESSION = "regression"
TASKS = (CLASSIFICATION, REGRESSION)
# Classes named in an error message, at most.
_SHOWN = 20


class Unscorable(ValueError):
    """A label that cannot be compared with its prediction; the message says why, for a person."""


@dataclass(frozen=True)
class Target:
    """What a version predicts: ``task`` (None: unrecorded, read from the answer's shape), its classes."""

    task: str | None = None
    classes: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Scores:
    """Live metrics of some labelled rows; ``confusion``: [[true, predicted, count], …] for classifiers."""

    labelled: int = 0
    accuracy: float | None = None
    f1: float | None = None
    mae: float | None = None
    rmse: float | None = None
    confusion: list[list[int]] | None = None


def answer_of(outputs: Any, row: int) -> Any:
    """The logged answer for ``row`` of a request (``outputs``: one entry per row)."""
    if not isinstance(outputs, list) or row >= len(outputs):
        count = len(outputs) if isinstance(outputs, list) else 0
        raise Unscorable(f"the request has {count} row(s); there is no row {row}")
    return outputs[row]


def task_of(target: Target, answer: Any) -> str:
    if target.task in TASKS:
        return str(target.task)
    values = answer if isinstance(answer, list) else [answer]
    return REGRESSION if len(values) == 1 else CLASSIFICATION


def pair(target: Target, answer: Any, label: Any) -> tuple[str, float, float]:
    """(task, true, predicted) for one labelled row; classes as their indexes. Raises :class:`Unscorable`."""
    task = task_of(target, answer)
    if task == REGRESSION:
        return task, true_value(label), predicted_value(answer)
    probabilities = _probabilities(answer)
    return task, true_class(label, target.classes, len(probabilities)), max_index(probabilities)


def predicted_value(answer: Any) -> float:
    value = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
    number = _number(value)
    if number is None:
        raise Unscorable(f"the logged prediction {str(answer)[:80]} is not one number")
    return number


def true_value(label: Any) -> float:
    number = _number(label)
    if number is None:
        raise Unscorable(f"label {label!r} is not a number, and the version is a regression")
    return number


def true_class(label: Any, classes: Sequence[Any] | None, width: int) -> int:
    """The index of ``label`` among ``classes`` (exact value first, then as numbers or text)."""
    if classes:
        for index, known in enumerate(classes):
            if type(known) is type(label) and known == label:
                return index
        key = _key(label)
        for index, known in enumerate(classes):
            if _key(known) == key:
                return index
        shown = ", ".join(repr(c) for c in list(classes)[:_SHOWN])
        raise Unscorable(f"label {label!r} is not one of the version's classes ({shown})")
    number = _number(label)
    if number is None or not number.is_integer() or not 0 <= number < width:
        raise Unscorable(
            f"label {label!r} is not a class index 0…{width - 1} (the version records no class names)"
        )
    return int(number)


def max_index(probabilities: list[float]) -> int:
    best = 0
    for index, value in enumerate(probabilities):
        if value > probabilities[best]:
            best = index
    return best


def _probabilities(answer: Any) -> list[float]:
    values = [_number(value) for value in answer] if isinstance(answer, list) else []
    if len(values) < 2 or any(value is None for value in values):
        raise Unscorable(f"the logged prediction {str(answer)[:80]} is not a list of class probabilities")
    return [float(value) for value in values if value is not None]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _key(value: Any) -> Any:
    # "1", 1 and 1.0 name the same class (a CSV has only text); other text is compared as is.
    if isinstance(value, bool):
        return float(value)
    number = _number(value)
    return number if number is not None else str(value)


def score(task: str, pairs: Sequence[tuple[float, float]]) -> Scores:
    """The metrics of (true, predicted) ``pairs``: accuracy and macro F1, or MAE and RMSE."""
    if not pairs:
        return Scores()
    truth = [p[0] for p in pairs]
    predicted = [p[1] for p in pairs]
    if task == REGRESSION:
        from sklearn.metrics import mean_absolute_error, root_mean_squared_error

        return Scores(labelled=len(pairs), mae=float(mean_absolute_error(truth, predicted)),
                      rmse=float(root_mean_squared_error(truth, predicted)))
    from sklearn.metrics import accuracy_score, f1_score

    classes_true = [int(t) for t in truth]
    classes_predicted = [int(p) for p in predicted]
    counts = Counter(zip(classes_true, classes_predicted, strict=True))
    return Scores(
        labelled=len(pairs),
        accuracy=float(accuracy_score(classes_true, classes_predicted)),
        f1=float(f1_score(classes_true, classes_predicted, average="macro", zero_division=0)),
        confusion=[[t, p, n] for (t, p), n in sorted(counts.items())],
    )


def combine(parts: Iterable[Scores]) -> Scores:
    """The metrics over the rows of several windows, exactly as if scored at once.

    Accuracy and MAE are means weighted by rows; RMSE the root of the weighted mean square; macro F1
    from the summed confusion counts, over the classes that occur as truth or prediction (sklearn's).
    """
    parts = [part for part in parts if part.labelled]
    total = sum(part.labelled for part in parts)
    if not total:
        return Scores()
    if all(part.mae is not None and part.rmse is not None for part in parts):
        mae = sum((part.mae or 0.0) * part.labelled for part in parts) / total
        square = sum((part.rmse or 0.0) ** 2 * part.labelled for part in parts) / total
        return Scores(labelled=total, mae=mae, rmse=math.sqrt(square))
    counts: Counter[tuple[int, int]] = Counter()
    for part in parts:
        for true, predicted, count in part.confusion or []:
            counts[(true, predicted)] += count
    return _from_confusion(counts)


def _from_confusion(counts: Counter[tuple[int, int]]) -> Scores:
    total = sum(counts.values())
    if not total:
        return Scores()
    correct = sum(n for (t, p), n in counts.items() if t == p)
    classes = {t for t, _ in counts} | {p for _, p in counts}
    f1s = []
    for c in sorted(classes):
        tp = counts.get((c, c), 0)
        fp = sum(n for (t, p), n in counts.items() if p == c and t != c)
        fn = sum(n for (t, p), n in counts.items() if t == c and p != c)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return Scores(labelled=total, accuracy=correct / total, f1=sum(f1s) / len(f1s),
                  confusion=[[t, p, n] for (t, p), n in sorted(counts.items())])
