"""Variable-length sequences in a dataset frame: where they are (:class:`SequenceLayout`) and the one
reader of them (:func:`read_sequences`), which the trainer, batch scoring and the monitor share, so
that a sequence reads the same wherever it is read.

Two layouts (a job's ``data.sequence``): a list column (one sequence per row; each cell a list of
numbers, steps of width 1, or of equal-width lists; numpy arrays from Parquet, or their JSON text,
which is how a Parquet list column is versioned as CSV: ``lists_as_json`` in ``repo.py``), or long
format (one row per step: an id column, a step column and the step's feature columns; a sequence is
the rows of one id ordered by step, and the sequences come in the order of their ids).

A registered version's layout is its ``shipyard.sequence`` tag (:data:`~shipyard_common.lineage.
TAG_SEQUENCE`, written by the trainer); :func:`sequence_layout` reads it, and for a version registered
before the tag, its training run's ``data.sequence.*`` params, else the list column its features name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from shipyard_common.errors import InvalidInput
from shipyard_common.lineage import TAG_SEQUENCE

# The trainer's run params for data.sequence (its job spec, flattened) and its name for step value i of
# a list column of wider steps: "<column>[i]".
_SEQUENCE_PARAM = "data.sequence."
_LIST_FEATURE = re.compile(r"(.+)\[(\d+)\]")
_NULL_PARAMS = (None, "", "null", "None")


@dataclass(frozen=True)
class SequenceLayout:
    """Where a dataset holds its sequences: a list ``column``, or long format (``id``, ``step`` and the
    step's ``features``; None: every column but id, step and the per-sequence ones). ``max_length``:
    the longest sequence the model reads (longer ones keep their first steps), where known."""

    column: str | None = None
    id: str | None = None
    step: str | None = None
    features: tuple[str, ...] | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        if (self.column is None) == (self.id is None or self.step is None):
            raise ValueError("a sequence layout is a list column or long format (id and step), not both "
                             "and not neither")

    def tag(self) -> str:
        """The ``shipyard.sequence`` tag's JSON: the fields that are set."""
        fields = {"column": self.column, "id": self.id, "step": self.step,
                  "features": list(self.features) if self.features is not None else None,
                  "max_length": self.max_length}
        return json.dumps({key: value for key, value in fields.items() if value is not None}, sort_keys=True)


@dataclass(frozen=True)
class Sequences:
    """A frame's sequences: ``values[i]`` is sequence i's (steps, width) floats; ``rows`` holds one row
    per sequence (a list column's row; in long format, the id's first step's row), ``ids`` its id (a
    list column's row position) and ``features`` each step's value names."""

    values: list[np.ndarray]
    rows: pd.DataFrame
    ids: np.ndarray
    features: list[str]


def read_sequences(frame: pd.DataFrame, layout: SequenceLayout, *, per_sequence: Sequence[str] = (),
                   dtype: Any = np.float32) -> Sequences:
    """``frame``'s sequences as ``layout`` says, as ``dtype`` (finite values only); ``per_sequence``:
    columns of one value per sequence (a target), never step features, constant within an id.
    InvalidInput naming the row, id or column that is not a sequence."""
    steps = (layout.features or ()) if layout.column is None else ()  # a list column's are in its cells
    needed = [c for c in (layout.column, layout.id, layout.step, *steps) if c is not None]
    columns = [str(c) for c in frame.columns]
    missing = [c for c in [*needed, *per_sequence] if c not in columns]
    if missing:
        raise InvalidInput(f"there is no column(s) {missing}; the columns are {columns[:50]}")
    if not len(frame):
        raise InvalidInput("there are no rows, so no sequences")
    if layout.column is not None:
        return _list_column(frame, layout.column, dtype)
    return _long_format(frame, layout, list(per_sequence), dtype)


def _list_column(frame: pd.DataFrame, column: str, dtype: Any) -> Sequences:
    """One sequence per row, from cells that are lists of numbers or of equal-width lists."""
    values = [_cell(value, column, index, dtype) for index, value in enumerate(frame[column].tolist())]
    width = values[0].shape[1]
    for index, steps in enumerate(values):
        if steps.shape[1] != width:
            raise InvalidInput(f"row {index} of column {column!r} has steps of {steps.shape[1]} values; "
                               f"row 0's have {width}: every step must have the same width")
    features = [column] if width == 1 else [f"{column}[{i}]" for i in range(width)]
    return Sequences(values=values, rows=frame.reset_index(drop=True), ids=np.arange(len(values)),
                     features=features)


def _cell(value: Any, column: str, index: int, dtype: Any) -> np.ndarray:
    """One list cell as (steps, width): numbers are steps of width 1, lists of lists wider steps."""
    where = f"row {index} of column {column!r}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidInput(f"{where} is {value[:40]!r}, not a list of numbers (JSON text or a Parquet "
                               "list)") from None
    if isinstance(value, np.ndarray) and value.dtype == object:  # Parquet lists of lists
        value = [np.asarray(step).tolist() if isinstance(step, np.ndarray) else step for step in value]
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise InvalidInput(f"{where} is {type(value).__name__}, not a list of numbers")
    if not value:
        raise InvalidInput(f"{where} is an empty sequence; every sequence needs at least one step")
    bad = next((v for v in value if isinstance(v, bool | str)), None)
    if bad is not None:
        raise InvalidInput(f"{where} holds {type(bad).__name__} {bad!r:.40}; steps are numbers")
    try:
        with np.errstate(over="ignore"):  # beyond the dtype's range is inf, refused below
            steps = np.asarray(value, dtype=dtype)
    except (ValueError, TypeError):
        raise InvalidInput(f"{where} is not a list of numbers or of equal-width lists of numbers") from None
    if steps.ndim == 1:
        steps = steps.reshape(-1, 1)
    if steps.ndim != 2 or steps.shape[1] == 0:
        raise InvalidInput(f"{where} is not a list of numbers or of equal-width lists of numbers")
    if not np.isfinite(steps).all():
        raise InvalidInput(f"{where} holds a missing or infinite value; fill or drop it first")
    return steps


def _long_format(frame: pd.DataFrame, layout: SequenceLayout, per_id: list[str], dtype: Any) -> Sequences:
    """Sequences of the rows sharing an id, ordered by step; ``per_id`` columns must be constant in one."""
    id_, step = str(layout.id), str(layout.step)
    features = list(layout.features) if layout.features is not None else [
        str(c) for c in frame.columns if str(c) not in (id_, step, *per_id)]
    if not features:
        raise InvalidInput("long format: there are no step feature columns besides the id, step and target")
    not_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    if not_numeric:
        raise InvalidInput(f"step feature column(s) {not_numeric[:20]} are not numeric")
    gaps = [c for c in [id_, step, *features] if frame[c].isna().any()]
    if gaps:
        raise InvalidInput(f"column(s) {gaps[:20]} have missing values; fill or drop them first")
    ordered = frame.sort_values([id_, step], kind="stable").reset_index(drop=True)
    repeated = ordered[ordered.duplicated([id_, step])]
    if len(repeated):
        first = repeated.iloc[0]
        raise InvalidInput(f"id {_plain(first[id_])!r} has step {_plain(first[step])!r} more than once")
    for column in per_id:
        varying = ordered.groupby(id_, sort=False)[column].nunique(dropna=False)
        if (varying > 1).any():
            ids = [_plain(v) for v in varying.index[varying > 1][:5]]
            raise InvalidInput(f"column {column!r} must be constant within each sequence (one value per "
                               f"{id_!r}); it varies within id(s) {ids}")
    lengths = ordered.groupby(id_, sort=False).size().to_numpy()
    ends = np.cumsum(lengths)
    with np.errstate(over="ignore"):  # beyond the dtype's range is inf, refused below
        values = np.split(ordered[features].to_numpy(dtype=dtype), ends[:-1])
    if not all(np.isfinite(s).all() for s in values):
        raise InvalidInput(f"step feature column(s) {features[:20]} hold infinite values")
    rows = ordered.iloc[ends - lengths].reset_index(drop=True)
    return Sequences(values=values, rows=rows, ids=rows[id_].to_numpy(), features=features)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds, so that a message shows ``1``, not ``np.int64(1)``."""
    return value.item() if isinstance(value, np.generic) else value


def sequence_layout(tags: Mapping[str, str], params: Mapping[str, str], *,
                    features: Sequence[str]) -> SequenceLayout | None:
    """Where a registered sequence version's dataset holds its sequences: its ``shipyard.sequence`` tag;
    without one (registered before the tag), its training run's ``data.sequence.*`` ``params`` (long
    format's steps being its ``features``); else a list column its features name (``[steps]``, or
    ``[steps[0], steps[1], ...]``); else None. InvalidInput when the tag is there but malformed."""
    tagged = tags.get(TAG_SEQUENCE)
    if tagged:
        return _from_tag(tagged)

    def param(name: str) -> str | None:
        value = params.get(f"{_SEQUENCE_PARAM}{name}")
        return None if value in _NULL_PARAMS else value

    column, id_, step = param("column"), param("id"), param("step")
    if column is not None:
        return SequenceLayout(column=column)
    if id_ is not None and step is not None:
        return SequenceLayout(id=id_, step=step, features=tuple(features))
    named = _named_list_column(tuple(features))
    return None if named is None else SequenceLayout(column=named)


def _from_tag(tagged: str) -> SequenceLayout:
    what = f"tag {TAG_SEQUENCE} ({tagged[:80]!r})"
    try:
        found = json.loads(tagged)
    except ValueError:
        raise InvalidInput(f"{what} is not JSON") from None
    if not isinstance(found, dict):
        raise InvalidInput(f"{what} is not a JSON object")
    names = [found.get(key) for key in ("column", "id", "step")]
    features, max_length = found.get("features"), found.get("max_length")
    if (not all(n is None or (isinstance(n, str) and n) for n in names)
            or not (features is None or (isinstance(features, list) and features
                                         and all(isinstance(f, str) for f in features)))
            or not (max_length is None or (isinstance(max_length, int) and max_length > 0))):
        raise InvalidInput(f"{what}: column, id and step are names, features a list of names, "
                           "max_length a positive number")
    try:
        return SequenceLayout(column=names[0], id=names[1], step=names[2], max_length=max_length,
                              features=tuple(features) if features is not None else None)
    except ValueError as exc:
        raise InvalidInput(f"{what}: {exc}") from None


def _named_list_column(features: tuple[str, ...]) -> str | None:
    """The list column the trainer named ``features`` after: ``[steps]``, or ``steps[0]``, ``steps[1]`` …"""
    matches = [_LIST_FEATURE.fullmatch(name) for name in features]
    if len(features) == 1 and matches[0] is None:
        return features[0]
    named = {match.group(1) for match in matches if match is not None}
    indexes = [int(match.group(2)) for match in matches if match is not None]
    return named.pop() if len(named) == 1 and indexes == list(range(len(features))) else None
