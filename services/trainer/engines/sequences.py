"""Variable-length sequences (``data.sequence``) as padded arrays the sequence models read.

Each sequence becomes ``(steps, width)`` float32 values; every part is padded with NaN to one length,
(sequences, length, width): ``model.sequence_length`` when given (longer sequences keep their first
``length`` steps, as the exported graph does), else the longest training sequence. NaN marks padding
only: the models derive their mask from it (engines/architectures.py), and a real value must be finite.

Two layouts (:class:`~services.trainer.jobs.sequence_spec.SequenceSpec`): a list column (one sequence
per row; cells are lists, numpy arrays from Parquet, or their JSON text, which is how a Parquet list
column is versioned as CSV), or long format (one row per step, grouped by id, ordered by step; the
target and a split column must be constant within an id). The split draws whole sequences.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from services.trainer.engines.tabular import _labels, _plain, split_rows
from services.trainer.engines.types import TabularData
from services.trainer.jobs.schemas import JobCreate
from services.trainer.jobs.sequence_spec import SequenceSpec
from shipyard_common.errors import InvalidInput

Sequences = tuple[list[np.ndarray], pd.DataFrame, list[str]]


def prepare_sequences(
    frame: pd.DataFrame, spec: JobCreate, test_frame: pd.DataFrame | None = None
) -> TabularData:
    """The dataset's sequences, labelled, split by sequence and padded (see the module's docstring)."""
    data = spec.data
    sequences, per_sequence, features = read_sequences(frame, spec)
    y, classes = _labels(per_sequence[data.target], spec)
    rows = split_rows(per_sequence, spec, y if classes else None)
    length = getattr(spec.model, "sequence_length", None) or max(len(sequences[i]) for i in rows["train"])
    x = pad(sequences, length)
    test = rows.get("test")
    x_test, y_test = (None, None) if test is None else (x[test], y[test])
    if test_frame is not None and data.split is not None and data.split.test_rev is not None:
        test_sequences, test_rows, test_features = read_sequences(test_frame, spec)
        if test_features != features:
            raise InvalidInput(f"the test revision's steps have columns {test_features[:20]}, "
                               f"not {features[:20]}")
        x_test = pad(test_sequences, length)
        y_test, _ = _labels(test_rows[data.target], spec, classes=classes)
        rows["test"] = np.arange(len(test_sequences))
    return TabularData(
        features=features, target=data.target, task=data.task,
        x_train=x[rows["train"]], y_train=y[rows["train"]], x_val=x[rows["validation"]],
        y_val=y[rows["validation"]], classes=[_plain(c) for c in classes], x_test=x_test, y_test=y_test,
        rows={part: positions.tolist() for part, positions in rows.items()},
    )


def read_sequences(frame: pd.DataFrame, spec: JobCreate) -> Sequences:
    """Each sequence's (steps, width) values; one row per sequence with its target (and split column);
    and the step's feature names."""
    data = spec.data
    sequence = data.sequence
    assert sequence is not None
    split_column = data.split.column if data.split is not None else None
    per_sequence = [data.target, *([split_column] if split_column else [])]
    needed = [*per_sequence, *sequence.columns(), *(sequence.features or [])]
    columns = [str(c) for c in frame.columns]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InvalidInput(f"dataset {data.dataset!r} has no column(s) {missing}; "
                           f"its columns are {columns[:50]}")
    if frame[data.target].isna().any():
        raise InvalidInput(f"target {data.target!r} has missing values; drop those rows first")
    if not len(frame):
        raise InvalidInput(f"dataset {data.dataset!r} has no rows")
    if sequence.column is not None:
        return _list_column(frame, sequence.column)
    return _long_format(frame, sequence, per_sequence)


def _list_column(frame: pd.DataFrame, column: str) -> Sequences:
    """One sequence per row, from cells that are lists of numbers or of equal-width lists."""
    sequences = [_cell(value, column, index) for index, value in enumerate(frame[column].tolist())]
    width = sequences[0].shape[1]
    for index, values in enumerate(sequences):
        if values.shape[1] != width:
            raise InvalidInput(f"row {index} of column {column!r} has steps of {values.shape[1]} values; "
                               f"row 0's have {width}: every step must have the same width")
    features = [column] if width == 1 else [f"{column}[{i}]" for i in range(width)]
    return sequences, frame.reset_index(drop=True), features


def _cell(value: Any, column: str, index: int) -> np.ndarray:
    """One list cell as (steps, width) float32: numbers are steps of width 1, lists of lists wider steps."""
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
    if any(isinstance(v, bool | str) for v in value):
        raise InvalidInput(f"{where} holds {type(value[0]).__name__} values; steps are numbers")
    try:
        steps = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise InvalidInput(f"{where} is not a list of numbers or of equal-width lists of numbers") from None
    if steps.ndim == 1:
        steps = steps.reshape(-1, 1)
    if steps.ndim != 2 or steps.shape[1] == 0:
        raise InvalidInput(f"{where} is not a list of numbers or of equal-width lists of numbers")
    if not np.isfinite(steps).all():
        raise InvalidInput(f"{where} holds a missing or infinite value; fill or drop it first")
    return steps


def _long_format(frame: pd.DataFrame, sequence: SequenceSpec, per_id: list[str]) -> Sequences:
    """Sequences of the rows sharing an id, ordered by step; ``per_id`` columns must be constant in one."""
    id_, step = str(sequence.id), str(sequence.step)
    features = list(sequence.features) if sequence.features is not None else [
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
    sequences = np.split(ordered[features].to_numpy(dtype=np.float32), ends[:-1])
    if not all(np.isfinite(s).all() for s in sequences):
        raise InvalidInput(f"step feature column(s) {features[:20]} hold infinite values")
    return sequences, ordered.iloc[ends - lengths].reset_index(drop=True), features


def pad(sequences: list[np.ndarray], length: int) -> np.ndarray:
    """(sequences, length, width) float32: each sequence's first ``length`` steps, NaN after its end."""
    width = sequences[0].shape[1]
    padded = np.full((len(sequences), length, width), np.nan, dtype=np.float32)
    for index, steps in enumerate(sequences):
        kept = steps[:length]
        padded[index, : len(kept)] = kept
    return padded
