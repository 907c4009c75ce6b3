"""A closed window's logged rows, read from the prediction log and laid out as the reference's columns."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import orjson
import pandas as pd
from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session

from services.monitor.windows.cutting import TIME, Due
from services.monitor.windows.inputs import SEQUENCES, TABLE, Inputs
from services.monitor.windows.references import NUMERICAL, ColumnStats, category_strings
from services.monitor.windows.sequences import summarise
from shipyard_common.records import PredictionRecord as P

# Rows read per round trip: JSON text, parsed here with orjson rather than by the driver.
_FETCH = 2000


@dataclass
class WindowRows:
    """The rows of a window whose width is the version's feature count, and what did not fit.

    ``widths``: rows by width, for the rows of another width (a schema change); ``not_rows``: the
    rows of requests whose inputs are not a list of rows (named tensors; for a table, not its
    columns), counted as the window's cutting counts them (:class:`.cutting.rows_of`).
    A sequence version's rows are its sequences' summaries (:mod:`.sequences`); ``expected`` is
    then the width of a step, and ``widths`` counts the sequences by the width of their steps.
    """

    expected: int
    rows: list[list[Any]] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    widths: Counter[int] = field(default_factory=Counter)
    not_rows: int = 0
    total: int = 0
    fitting: int = 0
    sequences: bool = False

    @property
    def expected_shape(self) -> str:
        """What a row that fits has, for a person: the features, or a sequence's steps."""
        return f"steps of {self.expected} values" if self.sequences else f"the {self.expected} features"

    def release(self) -> None:
        """Drop the rows and outputs (once laid out as arrays); the counts stay."""
        self.rows, self.outputs = [], []

    @property
    def mismatched(self) -> int:
        return sum(self.widths.values()) + self.not_rows

    def add(self, inputs: Any, outputs: Any) -> None:
        if not isinstance(inputs, list):
            self.not_fitting(inputs)
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

    def not_fitting(self, inputs: Any) -> None:
        """A request whose inputs are not rows: its batch length (named inputs: the first's) counted."""
        first = next(iter(inputs.values()), None) if isinstance(inputs, dict) else inputs
        rows = len(first) if isinstance(first, list) else 1
        self.not_rows += rows
        self.total += rows

    def add_columns(self, inputs: Any, outputs: Any, *, features: tuple[str, ...]) -> None:
        """A table version's request: ``{column: [values]}``, as serving logs one array per input
        (a table of one column: its list of values); or rows, as :meth:`add` takes them."""
        if isinstance(inputs, list) and len(features) == 1 and not (inputs and isinstance(inputs[0], list)):
            inputs = {features[0]: inputs}
        if not isinstance(inputs, dict):
            self.add(inputs, outputs)
            return
        columns = [inputs.get(name) for name in features]
        lengths = {len(column) if isinstance(column, list) else -1 for column in columns}
        if len(lengths) != 1 or -1 in lengths:  # not the version's columns, or of different lengths
            self.not_fitting(inputs)
            return
        self.add([list(row) for row in zip(*columns, strict=True)], outputs)

    def add_sequences(self, inputs: Any, outputs: Any) -> None:
        """A sequence version's request: its sequences (padded with null), each kept as its summary."""
        if not isinstance(inputs, list) or not inputs:
            self.not_fitting(inputs)
            return
        fits = isinstance(outputs, list) and len(outputs) == len(inputs)
        answers = outputs if fits else [None] * len(inputs)
        self.total += len(inputs)
        for (summary, width), answer in zip(summarise(inputs, width=self.expected), answers, strict=True):
            if summary is None:
                self.widths[width] += 1
            else:
                self.rows.append(summary)
                self.outputs.append(answer)
                self.fitting += 1


def read_rows(session: Session, *, model: str, version: str, due: Due, features: tuple[str, ...],
              inputs: Inputs) -> WindowRows:
    """Every logged row of ``due`` (its id range; a window by time, its period too), read as
    ``inputs`` says a request holds them."""
    statement = (
        select(cast(P.inputs, Text), cast(P.outputs, Text))
        .where(P.model == model, P.version == version, P.id >= (due.first_id or 0),
               P.id <= (due.last_id or 0))
        .order_by(P.id)
        .execution_options(yield_per=_FETCH)
    )
    if due.kind == TIME:
        statement = statement.where(P.created_at >= due.started_at, P.created_at < due.ended_at)
    sequences = inputs.kind == SEQUENCES
    found = WindowRows(expected=inputs.width if sequences else len(features), sequences=sequences)
    add: Callable[[Any, Any], None] = found.add
    if inputs.kind == TABLE:
        add = partial(found.add_columns, features=features)
    elif sequences:
        add = found.add_sequences
    with paused_gc():
        for logged, outputs in session.execute(statement):
            add(orjson.loads(logged), orjson.loads(outputs) if outputs else None)
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
    """Numerical features as float64 (null → NaN), categorical ones as strings (null and ``""`` missing)."""
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
            raw[name] = category_strings(raw[name])
    return Typed(raw, mismatch)
