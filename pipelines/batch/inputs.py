"""What a version's ONNX file takes, read once from the dataset version's rows, and fed chunk by chunk.

The trainer registers three kinds of ONNX files; the file's own inputs say which one it is:

- **rows**: one float input [batch, features]: the ``shipyard.features`` columns as numbers (NaN for null).
- **a table** (the job's ``data.columns``): one input per column, [batch] each, raw values as serving
  feeds them: strings for a categorical column (``str(value)``, ``""`` for null, as the trainer
  encodes the training rows), float32 with NaN for null for a numeric one. Unseen categories and
  nulls are the graph's to handle.
- **sequences** (``data.sequence``): one float input [batch, time, width] with a free time axis; each
  sequence from a list column (JSON text in the CSV) or long format (one row per step: an id column,
  a step column, the step's features), read by the platform's one reader
  (:func:`~shipyard_common.datasets.sequences.read_sequences`), and each chunk padded with NaN to its
  longest sequence, as serving pads a request. An output row is a sequence (in long format, named by
  its id, in id order). As serving, a sequence longer than the version's ``sequence.max_length`` is
  refused (its graph would read only its first steps).

Each kind gives a chunk's feeds, a digest of its values (the chunk's id) and what the prediction log
holds for a record of its rows: what serving logs for the same model (the rows, the table's columns
by name, the padded sequences). What none of them fits is refused, naming what is wrong.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import orjson
import pandas as pd

from pipelines.batch.model import ModelInfo
from shipyard_common.datasets.sequences import read_sequences
from shipyard_common.errors import InvalidInput
from shipyard_common.lineage import TAG_SEQUENCE

ROW = "row"  # the output's column: the row's position in the dataset version (a sequence's, in order)
_FLOATS = {"tensor(float)": np.float32, "tensor(double)": np.float64}
_STRING = "tensor(string)"


class ModelInputs(ABC):
    """The dataset's rows as the version takes them. ``rows``: how many rows (sequences) are scored;
    ``ids``: the output's id column (``id_column``), one value per scored row, or None."""

    kind = ""

    def __init__(self, *, rows: int, ids: np.ndarray | None, id_column: str | None) -> None:
        self.rows, self.ids, self.id_column = rows, ids, id_column

    @abstractmethod
    def feeds(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """What ONNX Runtime is given for rows ``[start, stop)``."""

    @abstractmethod
    def digest(self, start: int, stop: int) -> str:
        """A hash of rows ``[start, stop)``'s values (a chunk's id says which rows it scored)."""

    @abstractmethod
    def logged(self, feeds: dict[str, np.ndarray], start: int, stop: int) -> bytes:
        """The prediction log's inputs (JSON) for rows ``[start, stop)`` of a chunk's ``feeds``."""


class RowInputs(ModelInputs):
    """One float input [batch, features]: the features' columns as one matrix."""

    kind = "rows"

    def __init__(self, name: str, values: np.ndarray, **ids: Any) -> None:
        super().__init__(rows=len(values), **ids)
        self.name, self.values = name, values

    def feeds(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {self.name: self.values[start:stop]}

    def digest(self, start: int, stop: int) -> str:
        return _hash(self.values[start:stop].tobytes())

    def logged(self, feeds: dict[str, np.ndarray], start: int, stop: int) -> bytes:
        return _json(feeds[self.name][start:stop])


class TableInputs(ModelInputs):
    """One input per column, [batch]: strings (``""`` for null) or float32 (NaN for null)."""

    kind = "table"

    def __init__(self, columns: dict[str, np.ndarray], **ids: Any) -> None:
        super().__init__(rows=len(next(iter(columns.values()))), **ids)
        self.columns = columns

    def feeds(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: values[start:stop] for name, values in self.columns.items()}

    def digest(self, start: int, stop: int) -> str:
        parts = [values[start:stop].tobytes() if values.dtype != object
                 else orjson.dumps(values[start:stop].tolist()) for values in self.columns.values()]
        return _hash(b"\x00".join(parts))

    def logged(self, feeds: dict[str, np.ndarray], start: int, stop: int) -> bytes:
        return _json({name: values[start:stop] if values.dtype != object else values[start:stop].tolist()
                      for name, values in feeds.items()})


class SequenceInputs(ModelInputs):
    """One float input [batch, time, width]: every sequence's steps one after another in ``steps``,
    sequence ``i`` being ``steps[offsets[i]:offsets[i + 1]]``. ``time``: the file's time axis where it
    is fixed rather than free (None)."""

    kind = "sequences"

    def __init__(self, name: str, steps: np.ndarray, offsets: np.ndarray, *, time: int | None = None,
                 **ids: Any) -> None:
        super().__init__(rows=len(offsets) - 1, **ids)
        self.name, self.steps, self.offsets, self.time = name, steps, offsets, time

    def feeds(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` padded with NaN to the longest of them (to a fixed time axis, each
        sequence's first ``time`` steps: the trainer's truncation)."""
        lengths = np.diff(self.offsets[start:stop + 1])
        length = self.time or int(lengths.max())
        padded = np.full((stop - start, length, self.steps.shape[1]), np.nan, self.steps.dtype)
        first = self.offsets[start]
        sequence = np.repeat(np.arange(stop - start), lengths)
        step = np.arange(int(lengths.sum())) - np.repeat(self.offsets[start:stop] - first, lengths)
        kept = step < length
        padded[sequence[kept], step[kept]] = self.steps[first:self.offsets[stop]][kept]
        return {self.name: padded}

    def digest(self, start: int, stop: int) -> str:
        lengths = np.diff(self.offsets[start:stop + 1])
        return _hash(self.steps[self.offsets[start]:self.offsets[stop]].tobytes() + lengths.tobytes())

    def logged(self, feeds: dict[str, np.ndarray], start: int, stop: int) -> bytes:
        """Those sequences padded to the longest of them, as serving logs a request of them."""
        padded = feeds[self.name][start:stop]
        longest = int((~np.isnan(padded).all(axis=2)).sum(axis=1).max())
        return _json(np.ascontiguousarray(padded[:, :longest]))


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _json(values: Any) -> bytes:
    return orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)


# -- reading the dataset's rows as the version takes them ----------------------------------------


def read_inputs(frame: pd.DataFrame, model: ModelInfo, specs: list[Any], where: str,
                id_column: str | None) -> ModelInputs:
    """``frame`` (the dataset version) as ``model``'s ONNX inputs ``specs`` (``session.get_inputs()``)
    take it; InvalidInput naming the columns, rows or inputs that do not fit."""
    what = model.describe()
    ranks = [len(spec.shape) for spec in specs]
    if ranks == [2]:
        return _rows(frame, model, specs[0], where, _ids(frame, id_column, where))
    if ranks == [3]:
        return _sequences(frame, model, specs[0], where, id_column)
    if ranks and all(rank == 1 for rank in ranks):
        return _table(frame, model, specs, where, _ids(frame, id_column, where))
    shown = [f"{spec.name} {spec.type} {spec.shape}" for spec in specs[:10]]
    raise InvalidInput(f"{what} takes inputs {shown}; batch scoring takes rows [batch, features], a "
                       "table's columns [batch] or sequences [batch, time, width]")


def _ids(frame: pd.DataFrame, id_column: str | None, where: str) -> dict[str, Any]:
    if id_column is None:
        return {"ids": None, "id_column": None}
    if id_column == ROW:
        raise InvalidInput(f"id column may not be {ROW!r}, the output's own column")
    if id_column not in frame.columns:
        raise InvalidInput(f"id column {id_column!r} is not a column of {where}")
    return {"ids": frame[id_column].to_numpy(), "id_column": id_column}


def _missing(frame: pd.DataFrame, model: ModelInfo, columns: list[str], where: str) -> None:
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise InvalidInput(f"{where} lacks column(s) {missing} that {model.describe()} takes "
                           f"(its features: {model.features})")


def _float_type(spec: Any, model: ModelInfo) -> Any:
    dtype = _FLOATS.get(spec.type)
    if dtype is None:
        raise InvalidInput(f"{model.describe()}'s input {spec.name!r} takes {spec.type}; batch scoring "
                           "feeds numbers (float) from the dataset's columns, and strings to a table's")
    return dtype


def _rows(frame: pd.DataFrame, model: ModelInfo, spec: Any, where: str, ids: dict[str, Any]) -> RowInputs:
    """The features' columns as one float matrix (numbers only: a table's strings need a table's model)."""
    _missing(frame, model, model.features, where)
    dtype = _float_type(spec, model)
    not_numbers = [name for name in model.features if not pd.api.types.is_numeric_dtype(frame[name])]
    if not_numbers:
        raise InvalidInput(f"column(s) {not_numbers} of {where} are not numbers; {model.describe()} "
                           "takes numbers")
    width = spec.shape[-1]
    if isinstance(width, int) and width != len(model.features):
        raise InvalidInput(f"{model.describe()} takes {width} values per row, but its shipyard.features "
                           f"tag names {len(model.features)} columns")
    return RowInputs(spec.name, np.ascontiguousarray(frame[model.features].to_numpy(dtype=dtype)), **ids)


def _table(frame: pd.DataFrame, model: ModelInfo, specs: list[Any], where: str,
           ids: dict[str, Any]) -> TableInputs:
    """Each input's column, named as the input: strings, or float32 with NaN for null."""
    _missing(frame, model, [spec.name for spec in specs], where)
    columns = {}
    for spec in specs:
        series = frame[spec.name]
        if spec.type == _STRING:
            columns[spec.name] = category_strings(series)
        else:
            columns[spec.name] = numbers(series, spec.name, where).astype(_float_type(spec, model))
    return TableInputs(columns, **ids)


def category_strings(series: pd.Series) -> np.ndarray:
    """Each value as the string the graph compares (``str(value)``), ``""`` for null: as the trainer
    encoded its training rows (services/trainer/engines/preprocess.py) and serving feeds a request's."""
    mask = series.isna().to_numpy()
    pairs = zip(series.astype(object).tolist(), mask, strict=True)
    return np.array(["" if gone else str(value) for value, gone in pairs], dtype=object)


def numbers(series: pd.Series, name: str, where: str) -> np.ndarray:
    """A numeric column as float64, NaN for null; InvalidInput naming the first value that is no number
    (a boolean included) or beyond float32's range."""
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        converted = pd.to_numeric(series.astype(object).where(series.notna(), None), errors="coerce")
        wrong = series[converted.isna() & series.notna()]
        if len(wrong) or (pd.api.types.is_bool_dtype(series) and len(series)):
            row = wrong.index[0] if len(wrong) else series.index[0]
            raise InvalidInput(f"column {name!r} of {where} is numeric for the model but row {row} holds "
                               f"{series[row]!r}")
        series = converted
    values: np.ndarray = series.to_numpy(dtype=np.float64, na_value=np.nan)
    beyond = np.abs(values) > float(np.finfo(np.float32).max)
    if beyond.any():
        row = int(np.argmax(beyond))
        raise InvalidInput(f"column {name!r} of {where}: row {row} holds {values[row]!r}, beyond float32's "
                           "range")
    return values


# -- sequences ------------------------------------------------------------------------------------


def _sequences(frame: pd.DataFrame, model: ModelInfo, spec: Any, where: str,
               id_column: str | None) -> SequenceInputs:
    """The sequences as the shared reader reads them (a list column's cells, or long format's steps
    grouped by id and ordered by step); InvalidInput for one longer than the model reads."""
    layout = model.sequence
    if layout is None:
        raise InvalidInput(f"{model.describe()} takes sequences, but neither its {TAG_SEQUENCE} tag, its "
                           f"training run (data.sequence) nor its features {model.features[:10]} say which "
                           "columns hold them")
    long_format = layout.column is None
    if long_format:
        _missing(frame, model, [str(layout.id), str(layout.step), *(layout.features or ())], where)
        if id_column not in (None, layout.id):
            raise InvalidInput(f"{model.describe()} scores one sequence per {layout.id!r} (long format); the "
                               f"output is named by it, so the id column can only be {layout.id!r}, not "
                               f"{id_column!r}")
    else:
        _missing(frame, model, [str(layout.column)], where)
        named = _ids(frame, id_column, where)
    try:
        read = read_sequences(frame, layout, dtype=_float_type(spec, model))
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc.message}") from exc
    width = spec.shape[2]
    if isinstance(width, int) and width != len(read.features):
        raise InvalidInput(f"{model.describe()} takes steps of {width} value(s), but {where} has steps of "
                           f"{len(read.features)} ({read.features[:10]})")
    offsets = np.zeros(len(read.values) + 1, dtype=np.int64)
    np.cumsum([len(steps) for steps in read.values], out=offsets[1:])
    if long_format:  # an output row is a sequence, named by its id, in id order
        named = {"ids": read.ids, "id_column": layout.id}
    _refuse_longer(offsets, model, where, ids=named["ids"], by_id=long_format)
    return SequenceInputs(spec.name, np.concatenate(read.values), offsets, time=_time(spec), **named)


def _refuse_longer(offsets: np.ndarray, model: ModelInfo, where: str, *, ids: np.ndarray | None,
                   by_id: bool) -> None:
    """InvalidInput naming the first sequence of more steps than the model's ``sequence.max_length`` (its
    graph would read only the first ones, as if the rest were not there), as serving refuses it: by its
    id (long format), else by its row and the id column's value there."""
    longest = model.sequence.max_length if model.sequence is not None else None
    lengths = np.diff(offsets)
    longer = lengths > longest if longest is not None else np.zeros(len(lengths), dtype=bool)
    if not longer.any():
        return
    first = int(np.argmax(longer))
    named = f"row {first}" if not by_id else ""
    if ids is not None:
        named = f"{named} (id {_plain(ids[first])!r})" if named else f"id {_plain(ids[first])!r}"
    raise InvalidInput(f"{where}: the sequence of {named} has {int(lengths[first])} steps; "
                       f"{model.describe()} reads at most {longest} (its sequence.max_length), and "
                       f"{int(longer.sum())} sequence(s) are longer: shorten or split them before scoring")


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (a message shows ``1``, not ``np.int64(1)``)."""
    return value.item() if isinstance(value, np.generic) else value


def _time(spec: Any) -> int | None:
    """The file's time axis where it is fixed (an export that did not keep it free), else None."""
    return spec.shape[1] if isinstance(spec.shape[1], int) and spec.shape[1] > 0 else None
