"""Reference data: the training data of a served version, read from DVC at its revision, once.

A :class:`Reference` holds the frame and the statistics the quality checks need (the kind of each
column as Evidently would treat it, min/max of numerical columns, the categories of the others),
computed when the revision is first read and never per window. The frames handed to Evidently
(features plus the target as the prediction column) are prepared once per feature set too.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import pandas as pd

NUMERICAL = "numerical"
CATEGORICAL = "categorical"
T = TypeVar("T")


@dataclass(frozen=True)
class ColumnStats:
    """What a window's values of one column are checked against."""

    kind: str
    minimum: float | None = None
    maximum: float | None = None
    categories: frozenset[str] = frozenset()


@dataclass
class Reference:
    """One (dataset, rev): its frame, its column statistics, and frames prepared for Evidently."""

    dataset: str
    rev: str
    frame: pd.DataFrame
    columns: dict[str, ColumnStats]
    _prepared: dict[tuple[object, ...], Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rows(self) -> int:
        return len(self.frame)

    def columns_as(self, kinds: dict[str, str] | None) -> dict[str, ColumnStats]:
        """The column statistics, those named in ``kinds`` as that kind (a table's columns as its model
        takes them: a column of numbers may be categorical); None: every column as its dtype says."""
        if not kinds or all(self.columns[name].kind == kind for name, kind in kinds.items()
                            if name in self.columns):
            return self.columns
        key = ("kinds", tuple(sorted(kinds.items())))
        return self.prepared(key, lambda: {**self.columns, **{
            name: column_stats(self.frame[name], kind=kind) for name, kind in kinds.items()
            if name in self.columns and self.columns[name].kind != kind}})

    def prepared(self, key: tuple[object, ...], build: Callable[[], T]) -> T:
        """What ``build`` makes for ``key`` (a feature set), built on the first call only."""
        with self._lock:
            if key in self._prepared:
                return cast(T, self._prepared[key])
        made = build()
        with self._lock:
            self._prepared[key] = made
        return made


def column_kind(series: pd.Series) -> str:
    """Numerical when the reference column holds numbers (booleans are categories), else categorical."""
    numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    return NUMERICAL if numeric else CATEGORICAL


def column_stats(series: pd.Series, *, kind: str | None = None) -> ColumnStats:
    """The statistics of ``series`` as a column of ``kind`` (by default, what its dtype says)."""
    if (kind or column_kind(series)) == NUMERICAL:
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return ColumnStats(NUMERICAL)
        return ColumnStats(NUMERICAL, minimum=float(finite.min()), maximum=float(finite.max()))
    return ColumnStats(CATEGORICAL, categories=frozenset(category_strings(series).dropna().unique().tolist()))


def category_strings(series: pd.Series) -> pd.Series:
    """Each value as the text the trainer's categories hold (``str(value)``); null, NaN and ``""`` (the
    trainer's and serving's null category) as None."""
    return series.map(lambda value: None if _missing(value) else str(value)).astype(object)


def _missing(value: Any) -> bool:
    if isinstance(value, str):
        return not value
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def describe(dataset: str, rev: str, frame: pd.DataFrame) -> Reference:
    """A :class:`Reference` with the statistics of every column of ``frame``."""
    stats = {str(name): column_stats(frame[name]) for name in frame.columns}
    return Reference(dataset=dataset, rev=rev, frame=frame, columns=stats)


class ReferenceCache:
    """References by (dataset, rev): a revision never changes, so a hit is always valid.

    Bounded, because every promoted version may pin a different revision. ``loads`` counts the
    reads of the loader (DVC).
    """

    def __init__(self, loader: Callable[[str, str], pd.DataFrame], size: int) -> None:
        self._loader = loader
        self._size = size
        self._references: OrderedDict[tuple[str, str], Reference] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, dataset: str, rev: str) -> Reference:
        key = (dataset, rev)
        with self._lock:
            if key in self._references:
                self._references.move_to_end(key)
                return self._references[key]
        # Read outside the lock: a DVC fetch can take seconds and must not stall other models.
        reference = describe(dataset, rev, self._loader(dataset, rev))
        with self._lock:
            self.loads += 1
            self._references[key] = reference
            self._references.move_to_end(key)
            while len(self._references) > self._size:
                self._references.popitem(last=False)
        return reference
