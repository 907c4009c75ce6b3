"""JSON values to the arrays a version takes: per merged group where it can, else per request.

:func:`merge_json` converts the JSON values of several requests' one input with one numpy call and
two reductions, when they are plain numbers for a floating-point input (the common request of every
JSON protocol); anything else, or a group whose values fail a check, is converted request by
request (:func:`to_array`), which names what is wrong with each (our protocol's rows:
:func:`parse_rows`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from services.serving.core.requests import JsonTensor
from services.serving.core.validation import array_from_json
from services.serving.runtimes.base import TensorSpec
from shipyard_common.errors import InvalidInput, ValidationFailed

_NUMBER_TYPES = (int, float)


_NUMBER_TYPE_SET = frozenset(_NUMBER_TYPES)
_FLOAT_TYPE_SET = frozenset({float})
_FLOAT_MAX: dict[np.dtype[Any], float] = {}


def parse_rows(inputs: Any, *, spec: TensorSpec, max_rows: int, allow_non_finite: bool = False) -> np.ndarray:
    """``inputs`` (rows of numbers) as the array ``spec`` takes, or a 422 that says what is wrong."""
    if not isinstance(inputs, list):
        raise ValidationFailed(
            f"inputs must be a list of rows (a list of lists of numbers), not {type(inputs).__name__}"
        )
    if not inputs:
        raise ValidationFailed("inputs is empty: send at least one row")
    if len(inputs) > max_rows:
        raise ValidationFailed(f"inputs has {len(inputs)} rows; at most {max_rows} are accepted per request")
    batch_size = spec.shape[0]
    if batch_size is not None and len(inputs) != batch_size:
        raise ValidationFailed(
            f"inputs has {len(inputs)} rows; this model takes exactly {batch_size} per request"
        )
    expected = spec.shape[1]
    fast = merge_json([JsonTensor(inputs)], spec, max_rows=max_rows, allow_non_finite=allow_non_finite)
    if fast is not None:
        return fast
    # The common case checked per row in C (types via set(map(type, row))), the values by numpy;
    # anything off goes through the value-by-value check, which names the first offending value.
    well_formed = all(
        type(row) is list and (expected is None or len(row) == expected)
        and _NUMBER_TYPE_SET.issuperset(map(type, row))
        for row in inputs
    )
    raw: Any = inputs
    if well_formed:
        try:
            raw = np.asarray(inputs)
        except ValueError:  # ragged rows (no fixed feature count): the check below says so
            well_formed = False
        else:
            # One C reduction: a NaN or Inf anywhere makes the sum non-finite (so may an overflow,
            # which the value-by-value check then clears).
            finite = allow_non_finite or raw.dtype.kind != "f" or math.isfinite(np.add.reduce(raw, axis=None))
            if not finite:
                well_formed = False
    if not well_formed:
        _check_rows_one_by_one(inputs, expected=expected, allow_non_finite=allow_non_finite)
        raw = inputs
    try:
        return array_from_json(raw, spec.dtype, what="inputs")
    except InvalidInput as exc:
        raise ValidationFailed(exc.message) from exc


def _check_rows_one_by_one(inputs: list[Any], *, expected: int | None, allow_non_finite: bool) -> None:
    for index, row in enumerate(inputs):
        if not isinstance(row, list):
            hint = "; wrap a single row in a list: [[...]]" if type(row) in _NUMBER_TYPES else ""
            raise ValidationFailed(
                f"row {index} is {type(row).__name__}, not a list of {expected} numbers{hint}"
            )
        if expected is not None and len(row) != expected:
            raise ValidationFailed(f"row {index} has length {len(row)}; the model takes {expected} features")
        # bool is an int to Python and a string is a number to numpy; neither is a feature value.
        for column, value in enumerate(row):
            if type(value) not in _NUMBER_TYPES:
                raise ValidationFailed(
                    f"row {index}, feature {column} is {type(value).__name__} {value!r}; features are numbers"
                )
            if type(value) is float and not math.isfinite(value) and not allow_non_finite:
                raise ValidationFailed(f"row {index}, feature {column} is {value}; features must be finite")


def merge_json(
    tensors: list[JsonTensor], spec: TensorSpec, *, max_rows: int, allow_non_finite: bool
) -> np.ndarray | None:
    """Several requests' JSON values for ``spec`` as one checked array, their rows in order.

    Only for a floating-point input whose values are fractions (never booleans or strings), all
    finite and within the dtype's range, in the same layout (nested rows, or flat with equal
    shapes beyond the first dimension). None: convert each request alone (:func:`to_array`).
    """
    if spec.dtype.kind != "f" or allow_non_finite:
        return None
    found = _values(tensors, spec, max_rows)
    if found is None:
        return None
    values, rows = found
    first = tensors[0].shape
    if not _fractions(values, 1 if first is not None else len(spec.shape)):
        return None
    try:
        wide = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):  # ragged, or too large for any float
        return None
    if first is not None:
        shape = (rows, *first[1:])
        if wide.ndim != 1 or wide.size != math.prod(shape):
            return None
        wide = wide.reshape(shape)
    if wide.ndim != len(spec.shape) or (spec.shape[0] is not None and rows != spec.shape[0]):
        return None
    trailing = wide.shape[1:]
    if trailing != spec.shape[1:] and any(
        size is not None and size != got for size, got in zip(spec.shape[1:], trailing, strict=True)
    ):
        return None
    return _in_range(wide, spec.dtype)


def _values(tensors: list[JsonTensor], spec: TensorSpec, max_rows: int) -> tuple[list[Any], int] | None:
    """Every tensor's values in one list, and their rows; None unless all share one layout."""
    first = tensors[0].shape
    if len(tensors) == 1:  # alone: its own list, not a copy
        tensor = tensors[0]
        if type(tensor.values) is not list or (tensor.dtype is not None and tensor.dtype != spec.dtype):
            return None
        count = len(tensor.values) if first is None else (first[0] if first else 0)
        return (tensor.values, count) if 0 < count <= max_rows else None
    values: list[Any] = []
    rows = 0
    for tensor in tensors:
        shape = tensor.shape
        if type(tensor.values) is not list or (shape is None) != (first is None):
            return None
        if tensor.dtype is not None and tensor.dtype != spec.dtype:
            return None
        if shape is not None and (not shape or shape[1:] != first[1:]):  # type: ignore[index]
            return None
        count = shape[0] if shape is not None else len(tensor.values)
        if not 0 < count <= max_rows:
            return None
        values += tensor.values
        rows += count
    return values, rows


def _fractions(values: list[Any], depth: int) -> bool:
    """Whether ``values`` is lists nested ``depth`` deep holding floats only (integers, which may
    exceed 64 bits, take the request-by-request way, which refuses those)."""
    if depth == 2:  # rows of values: the common case, one C-level type pass per row
        return all(type(row) is list and _FLOAT_TYPE_SET.issuperset(map(type, row)) for row in values)
    if depth <= 1:
        return _FLOAT_TYPE_SET.issuperset(map(type, values))
    return all(type(item) is list and _fractions(item, depth - 1) for item in values)


def _in_range(wide: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray | None:
    """``wide`` (float64) as ``dtype`` when every value is finite and within its range; else None."""
    largest = _FLOAT_MAX.get(dtype)
    if largest is None:
        largest = _FLOAT_MAX[dtype] = float(np.finfo(dtype).max)
    if not wide.size or not (
        -largest <= np.minimum.reduce(wide, axis=None) and np.maximum.reduce(wide, axis=None) <= largest
    ):
        return None  # a NaN fails both comparisons
    return wide.astype(dtype)


def to_array(tensor: JsonTensor, spec: TensorSpec, *, max_rows: int, allow_non_finite: bool) -> np.ndarray:
    """One request's JSON value for ``spec`` as an array, or the refusal that names what is wrong."""
    if tensor.rows:
        return parse_rows(tensor.values, spec=spec, max_rows=max_rows, allow_non_finite=allow_non_finite)
    what = f"input {spec.name!r}"
    array = array_from_json(tensor.values, tensor.dtype or spec.dtype, what=what)
    if tensor.shape is not None:
        count = math.prod(tensor.shape)
        if array.size != count:
            raise InvalidInput(f"{what} has {array.size} values; shape {list(tensor.shape)} needs {count}")
        array = array.reshape(tensor.shape)
    return array
