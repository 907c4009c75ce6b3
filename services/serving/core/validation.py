"""Requests checked against the served version's signature, before any runtime sees them.

Every protocol decodes its body to named numpy arrays and hands them to :func:`validate_inputs`;
what gets through has every input the model takes, with its dtype and shape, a batch of at
most ``max_batch_rows`` rows and, unless ``allow_non_finite`` is set, no NaN or ±Inf. Each
refusal is an :class:`~shipyard_common.errors.InvalidInput` (400) whose message names the input
and what is wrong; a body over ``max_body_bytes`` is a :class:`PayloadTooLarge` (413).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from services.serving.runtimes.base import Signature, TensorSpec, dtype_name
from shipyard_common.errors import InvalidInput, PayloadTooLarge


def check_body_size(size: int | None, limit: int) -> None:
    if size is not None and size > limit:
        raise PayloadTooLarge(
            f"the request body is {size} bytes; at most {limit} are accepted "
            "(split the batch, or raise SHIPYARD_SERVING_MAX_BODY_BYTES)"
        )


def _kind_name(array: np.ndarray) -> str:
    return {"U": "strings", "S": "bytes", "O": "mixed or non-numeric values", "b": "booleans",
            "f": "fractional numbers", "c": "complex numbers"}.get(array.dtype.kind, array.dtype.name)


def _holds_bool(value: Any) -> bool:
    """Whether a JSON value (a number, or lists nested to any depth) holds a boolean anywhere.

    One C-level pass per list (the set of its items' types); only lists of lists go deeper.
    """
    if type(value) is bool:
        return True
    if type(value) is not list:
        return False
    pending = [value]
    while pending:
        items = pending.pop()
        kinds = set(map(type, items))
        if bool in kinds:
            return True
        if list in kinds:
            pending.extend(item for item in items if type(item) is list)
    return False


def array_from_json(value: Any, dtype: np.dtype[Any], *, what: str) -> np.ndarray:
    """A JSON value (nested lists of numbers, or one number) as an array of ``dtype``, checked.

    Strings are refused although numpy would parse them, and so are booleans for numeric inputs
    (numpy reads ``[true, 1.5]`` as ``[1.0, 1.5]``) and fractions for integer ones; a number beyond
    ``dtype``'s range is refused, not wrapped.
    """
    if dtype.kind != "b" and _holds_bool(value):
        raise InvalidInput(f"{what} holds booleans; the model takes {dtype.name} numbers")
    try:
        raw = np.asarray(value)
    except ValueError as exc:  # ragged nesting
        raise InvalidInput(f"{what} is not a rectangular array of numbers: {exc}") from exc
    if raw.dtype.kind == "O" and raw.size and all(isinstance(v, int) for v in raw.flat):
        raise InvalidInput(f"{what} holds an integer beyond 64 bits")
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}.get(dtype.kind, "")
    if raw.size and raw.dtype.kind not in allowed:
        raise InvalidInput(f"{what} holds {_kind_name(raw)}; the model takes {dtype.name}")
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise InvalidInput(f"{what} holds a number beyond the {dtype.name} range")
    with np.errstate(over="ignore", invalid="ignore"):
        array = raw.astype(dtype, copy=False)
    if dtype.kind == "f" and raw.dtype.kind in "iuf" and array.size:
        overflow = ~np.isfinite(array) & np.isfinite(raw)
        if overflow.any():
            index = tuple(int(i) for i in np.argwhere(overflow)[0])
            raise InvalidInput(
                f"{what} at {list(index)} is {raw[index].item()!r}, beyond the model's {dtype.name} range"
            )
    return array


def _check_shape(spec: TensorSpec, array: np.ndarray) -> None:
    if array.ndim != len(spec.shape):
        raise InvalidInput(
            f"input {spec.name!r} has shape {list(array.shape)}; the model takes {spec.describe()} "
            f"({len(spec.shape)} dimensions)"
        )
    for axis, (expected, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if expected is not None and expected != got:
            raise InvalidInput(
                f"input {spec.name!r} has shape {list(array.shape)}; the model takes {spec.describe()}: "
                f"dimension {axis} must be {expected}, not {got}"
            )


def validate_inputs(
    arrays: dict[str, np.ndarray], signature: Signature, *, max_batch_rows: int, allow_non_finite: bool
) -> dict[str, np.ndarray]:
    """``arrays`` checked against ``signature``; contiguous, ready for a runtime."""
    expected = signature.input_names
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise InvalidInput(f"unknown input(s) {unknown}; the model takes {expected}")
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise InvalidInput(f"input(s) {missing} missing; the model takes {expected}")
    checked: dict[str, np.ndarray] = {}
    batch: int | None = None
    for spec in signature.inputs:
        array = arrays[spec.name]
        # A string input's object array holds str only: convert.column_array and v2's BYTES decoding made it.
        if array.dtype != spec.dtype:
            raise InvalidInput(
                f"input {spec.name!r} is {dtype_name(array.dtype)}; the model takes {spec.describe()}"
            )
        _check_shape(spec, array)
        if spec.nullable and array.ndim == 3 and spec.dtype.kind == "f":  # a sequence model's padding
            check_padding(spec.name, array, max_length=signature.sequence_max_length)
        if spec.shape:
            rows = int(array.shape[0])
            if rows == 0:
                raise InvalidInput(f"input {spec.name!r} has no rows: send at least one")
            if rows > max_batch_rows:
                raise InvalidInput(
                    f"input {spec.name!r} has {rows} rows; at most {max_batch_rows} are accepted per request"
                )
            if batch is not None and rows != batch:
                raise InvalidInput(f"the inputs disagree on the batch size: {batch} and {rows} rows")
            batch = rows
        if spec.dtype.kind == "f" and not allow_non_finite and array.size and not np.isfinite(array).all():
            if spec.nullable and not np.isinf(array).any():  # NaN: a missing value the graph fills
                checked[spec.name] = np.ascontiguousarray(array)
                continue
            index = [int(i) for i in np.argwhere(~np.isfinite(array))[0]]
            raise InvalidInput(
                f"input {spec.name!r} at {index} is {array[tuple(index)]}; values must be finite "
                "(NaN and ±Inf are refused)"
            )
        checked[spec.name] = np.ascontiguousarray(array)
    return checked


def check_padding(name: str, array: np.ndarray, *, max_length: int | None) -> None:
    """A sequence input [batch, time, width] padded with NaN: each step all NaN (padding) or all numbers,
    padding only after a sequence's real steps, at least one real step per sequence, and at most
    ``max_length`` (the model's ``sequence.max_length``; the graph would drop the steps past it)."""
    if array.shape[1] == 0:
        raise InvalidInput(f"input {name!r} has no steps: each sequence needs at least one")
    missing = np.isnan(array)
    padding = missing.all(axis=2)
    mixed = missing.any(axis=2) & ~padding
    if mixed.any():
        row, step = (int(i) for i in np.argwhere(mixed)[0])
        raise InvalidInput(f"input {name!r} row {row}, step {step} mixes NaN and numbers; a padding step is "
                           "all NaN, a real one all numbers")
    empty = padding.all(axis=1)
    if empty.any():
        raise InvalidInput(f"input {name!r} row {int(np.argmax(empty))} is all padding: each sequence needs "
                           "at least one step")
    lengths = (~padding).sum(axis=1)
    early = ~padding & (np.arange(array.shape[1]) >= lengths[:, None])
    if early.any():
        row = int(np.argwhere(early)[0][0])
        raise InvalidInput(f"input {name!r} row {row} has padding (NaN steps) before a real step; padding "
                           "goes after a sequence's end")
    if max_length is not None and (lengths > max_length).any():
        row = int(np.argmax(lengths > max_length))
        raise InvalidInput(f"input {name!r} row {row} has {int(lengths[row])} steps; the model reads at most "
                           f"{max_length} (its sequence.max_length): send at most {max_length} per sequence")
