"""JSON values to the arrays a version takes: per merged group where it can, else per request.

:func:`merge_json` converts the JSON values of several requests' one input with a few of Python's
builtins and one numpy call, when they are plain numbers for a floating-point input (the common
request of every JSON protocol); anything else, or a group whose values fail a check, is converted
request by request (:func:`to_array`), which names what is wrong with each (our protocol's rows:
:func:`parse_rows`).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from services.serving.core.requests import Input, JsonTensor
from services.serving.core.validation import array_from_json
from services.serving.runtimes.base import Signature, TensorSpec
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
    array = _checked_floats(values, 1 if first is not None else len(spec.shape), spec.dtype)
    if array is None:
        return None
    if first is not None:
        shape = (rows, *first[1:])
        if array.ndim != 1 or array.size != math.prod(shape):
            return None
        array = array.reshape(shape)
    if array.ndim != len(spec.shape) or (spec.shape[0] is not None and rows != spec.shape[0]):
        return None
    trailing = array.shape[1:]
    if trailing != spec.shape[1:] and any(
        size is not None and size != got for size, got in zip(spec.shape[1:], trailing, strict=True)
    ):
        return None
    return array


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


#: Up to this many values, a group's values are checked by Python's builtins; beyond, by numpy.
FEW_VALUES = 512


def _checked_floats(values: list[Any], depth: int, dtype: np.dtype[Any]) -> np.ndarray | None:
    """``values`` (lists nested ``depth`` deep) as a ``dtype`` array when every value is a float (no
    integer, which may exceed 64 bits, boolean or string), finite and within the dtype's range; else None.

    The types are checked by Python's builtins (C loops over the lists). The values, for a few
    (:data:`FEW_VALUES`, a lone request's), by one Euclidean norm (``math.hypot`` of the rows' norms),
    which is NaN or Inf when any value is and at most the dtype's largest only when every value is (a
    sum of huge but valid values may exceed it: those take the request-by-request way), then one numpy
    call: on a cold cache each numpy call costs several times its loop-timed cost. For more, by
    numpy's reductions over a float64 array, whose cost per value is then the lower.
    """
    largest = _FLOAT_MAX.get(dtype)
    if largest is None:
        largest = _FLOAT_MAX[dtype] = float(np.finfo(dtype).max)
    leaves: list[Any] = values if depth > 1 else [values]  # the innermost lists (rows: the request's own)
    for _ in range(depth - 2):
        if not all(type(item) is list for item in leaves):
            return None
        leaves = list(itertools.chain.from_iterable(leaves))
    if not all(type(leaf) is list and _FLOAT_TYPE_SET.issuperset(map(type, leaf)) for leaf in leaves):
        return None
    few = sum(map(len, leaves)) <= FEW_VALUES
    if few and not math.hypot(*itertools.starmap(math.hypot, leaves)) <= largest:  # NaN: False
        return None
    try:
        array = np.array(values, dtype=dtype if few else np.float64)
    except ValueError:  # ragged lists
        return None
    if not array.size:  # no values (a tensor of no steps): the request's own check says what is missing
        return None
    if few:
        return array
    low, high = np.minimum.reduce(array, axis=None), np.maximum.reduce(array, axis=None)
    if not -largest <= low <= high <= largest:
        return None  # a NaN fails every comparison
    return array.astype(dtype, copy=False)


def to_array(tensor: JsonTensor, spec: TensorSpec, *, max_rows: int, allow_non_finite: bool) -> np.ndarray:
    """One request's JSON value for ``spec`` as an array, or the refusal that names what is wrong."""
    if spec.nullable and takes_sequences(spec):  # ragged sequences, or a tensor padded with NaN (null)
        return sequence_rows(tensor.values, spec, max_rows=max_rows) if tensor.shape is None else (
            padded_tensor(tensor, spec))
    if tensor.rows:
        return parse_rows(tensor.values, spec=spec, max_rows=max_rows, allow_non_finite=allow_non_finite)
    if (spec.nullable and len(spec.shape) == 1) or spec.dtype.kind == "O" or (
            tensor.dtype is not None and tensor.dtype.kind == "O"):
        return column_array(tensor, spec)  # a table's column (strings, or numbers with nulls), or BYTES
    what = f"input {spec.name!r}"
    array = array_from_json(tensor.values, tensor.dtype or spec.dtype, what=what)
    if tensor.shape is not None:
        count = math.prod(tensor.shape)
        if array.size != count:
            raise InvalidInput(f"{what} has {array.size} values; shape {list(tensor.shape)} needs {count}")
        array = array.reshape(tensor.shape)
    return array


def table_columns(inputs: Any, signature: Signature) -> dict[str, Input] | None:
    """A table's rows (lists in column order, or objects by column, a null or an absent key for a missing
    value) as one JSON column per input, or ``{column: values}`` as they are; None unless every input
    of ``signature`` is one column (shape [batch])."""
    names = signature.input_names
    if not names or any(len(spec.shape) != 1 for spec in signature.inputs):
        return None
    if isinstance(inputs, dict):
        return {key: JsonTensor(value) for key, value in inputs.items()}
    if not isinstance(inputs, list) or not inputs:
        raise ValidationFailed(f"inputs must be a non-empty list of rows: lists of {len(names)} values in "
                               f"the order {names[:20]}, or objects {{column: value}}")
    known = set(names)
    columns: list[list[Any]] = [[] for _ in names]
    for index, row in enumerate(inputs):
        if type(row) is dict:
            unknown = sorted(set(row) - known)
            if unknown:
                raise ValidationFailed(f"row {index} names unknown column(s) {unknown[:10]}; the model takes "
                                       f"{names[:50]}")
            row = [row.get(name) for name in names]
        if type(row) is not list or len(row) != len(names):
            raise ValidationFailed(f"row {index} must be an object {{column: value}} or a list of "
                                   f"{len(names)} values in the order {names[:20]}")
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return {name: JsonTensor(column) for name, column in zip(names, columns, strict=True)}


def column_array(tensor: JsonTensor, spec: TensorSpec) -> np.ndarray:
    """One table column's JSON values (flat, or one per row) as a 1-D array: str for a categorical column
    (null as "", numbers as their text), float with NaN for null for a numeric one; or the refusal."""
    what = f"input {spec.name!r}"
    if tensor.dtype is not None and tensor.dtype != spec.dtype:
        sent = "BYTES" if tensor.dtype.kind == "O" else tensor.dtype.name
        raise InvalidInput(f"{what}: datatype {sent!r} is not one serving takes for it; the model takes "
                           f"{spec.describe()}")
    values = tensor.values
    if type(values) is not list:
        raise InvalidInput(f"{what} must be a list of values, one per row")
    if all(type(v) is list and len(v) == 1 for v in values):  # [[v], [v], ...]: one per row
        values = [v[0] for v in values]
    text = spec.dtype.kind == "O"
    largest = 0.0 if text else float(np.finfo(spec.dtype).max)
    array = np.empty(len(values), dtype=spec.dtype)
    for index, value in enumerate(values):
        kind = type(value)
        if value is None:
            array[index] = "" if text else math.nan
        elif kind is str and text:
            array[index] = value
        elif kind in _NUMBER_TYPES and (text or kind is float or abs(value) < 2**63):
            if not text and math.isfinite(value) and abs(value) > largest:
                raise InvalidInput(
                    f"{what} row {index} is {value!r}, beyond the model's {spec.dtype.name} range")
            array[index] = str(value) if text else value
        elif kind is bool and text:
            array[index] = str(value)
        else:
            wanted = "a string, a number or null" if text else "a number or null"
            raise InvalidInput(
                f"{what} row {index} is {kind.__name__} {value!r:.50}; this column takes {wanted}")
    if tensor.shape is not None and math.prod(tensor.shape) != len(values):
        raise InvalidInput(f"{what} has {len(values)} values; shape {list(tensor.shape)} needs "
                           f"{math.prod(tensor.shape)}")
    return array


def takes_sequences(spec: TensorSpec) -> bool:
    """Whether ``spec`` is a sequence model's input (the trainer's data.sequence): [batch, time, width]
    floats, ``nullable``: NaN steps are padding after each sequence's end, masked in the graph."""
    return spec.nullable and len(spec.shape) == 3 and spec.shape[2] is not None and spec.dtype.kind == "f"


def sequence_rows(inputs: Any, spec: TensorSpec, *, max_rows: int) -> np.ndarray:
    """Ragged sequences (each a list of steps: lists of the step width's numbers, or numbers when the
    width is 1) as one array padded with NaN to the longest, or the refusal naming the row and step."""
    if type(inputs) is not list or not inputs:
        raise InvalidInput("inputs must be a non-empty list of sequences, each a list of steps")
    if len(inputs) > max_rows:
        raise InvalidInput(f"inputs has {len(inputs)} sequences; at most {max_rows} are accepted per request")
    width = int(spec.shape[2])  # type: ignore[arg-type]
    sequences = [_sequence(sequence, index, width) for index, sequence in enumerate(inputs)]
    padded = np.full((len(sequences), max(map(len, sequences)), width), np.nan, dtype=spec.dtype)
    for index, steps in enumerate(sequences):
        padded[index, : len(steps)] = steps
    return padded


def _sequence(sequence: Any, index: int, width: int) -> np.ndarray:
    """One sequence as (steps, width) float64, finite and within float32's range; or its refusal."""
    if type(sequence) is not list:
        raise InvalidInput(f"row {index} is {type(sequence).__name__}, not a sequence (a list of steps)")
    if not sequence:
        raise InvalidInput(f"row {index} is an empty sequence: send at least one step")
    flat = width == 1 and _NUMBER_TYPE_SET.issuperset(map(type, sequence))
    if not flat:
        for step, values in enumerate(sequence):
            if type(values) is not list or len(values) != width:
                size = (f"{len(values)} value{'' if len(values) == 1 else 's'}" if type(values) is list
                        else type(values).__name__)
                raise InvalidInput(f"row {index}, step {step} has {size}; the model takes steps of {width} "
                                   f"number{'s' if width > 1 else ''}")
            if not _NUMBER_TYPE_SET.issuperset(map(type, values)):
                bad = next(v for v in values if type(v) not in _NUMBER_TYPES)
                raise InvalidInput(f"row {index}, step {step} holds {type(bad).__name__} {bad!r:.40}; steps "
                                   "hold numbers")
    try:
        steps = np.asarray(sequence, dtype=np.float64).reshape(len(sequence), width)
    except OverflowError:
        raise InvalidInput(f"row {index} holds a number beyond the model's float range") from None
    largest = float(np.finfo(np.float32).max)
    if not np.isfinite(steps).all() or np.abs(steps).max() > largest:
        raise InvalidInput(f"row {index} holds NaN, ±Inf or a number beyond float32's range; values must be "
                           "finite (serving pads shorter sequences itself)")
    return steps


def padded_tensor(tensor: JsonTensor, spec: TensorSpec) -> np.ndarray:
    """A rectangular [batch, time, width] JSON tensor (OIP v2) of a sequence input, null as NaN padding."""
    values = tensor.values
    if type(values) is list and None in values:  # flat data: null steps pad a shorter sequence
        values = [math.nan if value is None else value for value in values]
    what = f"input {spec.name!r}"
    array = array_from_json(values, tensor.dtype or spec.dtype, what=what)
    if tensor.shape is not None:
        count = math.prod(tensor.shape)
        if array.size != count:
            raise InvalidInput(f"{what} has {array.size} values; shape {list(tensor.shape)} needs {count}")
        array = array.reshape(tensor.shape)
    return array
