"""A closed window's logged rows, read from the prediction log and laid out as the reference's columns."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pandas as pd
from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session

from services.monitor.windows.cutting import TIME, Due
from services.monitor.windows.references import NUMERICAL, ColumnStats
from shipyard_common.records import PredictionRecord as P

# Rows read per round trip: JSON text, parsed here with orjson rather than by the driver.
_FETCH = 2000


@dataclass
class WindowRows:
    """The rows of a window whose width is the version's feature count, and what did not fit.

    ``widths``: rows by width, for the rows of another width (a schema change); ``not_rows``:
    requests whose inputs are not a list of rows (named tensors).
    """

    expected: int
    rows: list[list[Any]] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    widths: Counter[int] = field(default_factory=Counter)
    not_rows: int = 0
    total: int = 0
    fitting: int = 0

    def release(self) -> None:
        """Drop the rows and outputs (once laid out as arrays); the counts stay."""
        self.rows, self.outputs = [], []

    @property
    def mismatched(self) -> int:
        return sum(self.widths.values()) + self.not_rows

    def add(self, inputs: Any, outputs: Any) -> None:
        if not isinstance(inputs, list):
            self.not_rows += 1
            self.total += 1
            return
        if inputs and not isinstance(inputs[0], list):  # one row logged without its batch brackets
            inputs, outputs = [inputs], [outputs]
        fits = isinstance(outputs, list) and len(outputs) == len(inputs)
        answers = outputs if fits else [None] * len(inputs)
        self.total += len(inputs)
        for row, answer in zip(inputs, answers, strict=True):
            width = len(row) if isinstance(row, list) else 1
            if width == self.expected:
                self.rows.append(row)
                self.outputs.append(answer)
                self.fitting += 1
            else:
                self.widths[width] += 1


def read_rows(session: Session, *, model: str, version: str, due: Due, expected: int) -> WindowRows:
    """Every logged row of ``due`` (its id range; a window by time, its period too)."""
    statement = (
        select(cast(P.inputs, Text), cast(P.outputs, Text))
        .where(P.model == model, P.version == version, P.id >= (due.first_id or 0),
               P.id <= (due.last_id or 0))
        .order_by(P.id)
        .execution_options(yield_per=_FETCH)
    )
    if due.kind == TIME:
        statement = statement.where(P.created_at >= due.started_at, P.created_at < due.ended_at)
    found = WindowRows(expected=expected)
    with paused_gc():
        for inputs, outputs in session.execute(statement):
            found.add(orjson.loads(inputs), orjson.loads(outputs) if outputs else None)
    return found


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while millions of lists and floats are made, none of them cyclic.

    Each collection the allocations trigger walks every live object; for a window of 100,000
    rows that took about a tenth of the window's whole cost.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class Typed:
    """The window's rows as a frame of the reference's kinds, and the values that were not of the kind."""

    frame: pd.DataFrame
    type_mismatch: dict[str, int]


def to_frame(rows: list[list[Any]], *, features: list[str], columns: dict[str, ColumnStats]) -> Typed:
    """Numerical features as float64 (null → NaN), categorical ones as strings (null kept missing)."""
    numerical = [name for name in features if columns[name].kind == NUMERICAL]
    if len(numerical) == len(features):
        try:  # the common case, and the fast one: every value a number or null
            matrix = np.array(rows, dtype=np.float64) if rows else np.empty((0, len(features)))
            return Typed(pd.DataFrame(matrix, columns=features), {})
        except (TypeError, ValueError):
            pass
    raw = pd.DataFrame(rows, columns=features, dtype=object)
    mismatch: dict[str, int] = {}
    for name in features:
        if columns[name].kind == NUMERICAL:
            converted = pd.to_numeric(raw[name], errors="coerce")
            bad = int((converted.isna() & raw[name].notna()).sum())
            if bad:
                mismatch[name] = bad
            raw[name] = converted.astype(np.float64)
        else:
            raw[name] = raw[name].map(lambda value: None if value is None else str(value)).astype(object)
    return Typed(raw, mismatch)
