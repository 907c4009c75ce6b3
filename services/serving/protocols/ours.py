"""Our JSON protocol's codec: ``{"inputs": [[...], ...]}`` rows to the arrays a version takes, and
its answer body ``{"model", "model_version", "outputs"}``.

Rows of plain numbers are checked with a few C-level passes; anything off goes through a
value-by-value check that names the first offending value (a 422).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from services.serving.core.dataplane import DataPlane, Inference, count_error, infer, served_model
from services.serving.core.validation import array_from_json
from services.serving.runtimes.base import TensorSpec
from shipyard_common.errors import (
    InvalidInput,
    ValidationFailed,
)

_NUMBER_TYPES = (int, float)


# -- our JSON protocol: {"inputs": [[...], ...]} -------------------------------------------------


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
    if spec.dtype.kind == "f" and not allow_non_finite:
        fast = float_rows(inputs, spec.dtype, expected)
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


def float_rows(
    inputs: list[Any], dtype: np.dtype[Any], expected: int | None, *, dots: int = -1
) -> np.ndarray | None:
    """Rows of Python floats as ``dtype``, all finite and in its range; None: take the general path.

    The common request (fractional features, a floating-point model): converted to float64 in one
    numpy call (which cannot overflow), checked with two reductions (a NaN fails every comparison,
    ±Inf or a value beyond ``dtype``'s range fails the bounds), then cast. Anything else (integers,
    which may exceed 64 bits; bad values; ragged rows) goes the general way, which names the problem.

    ``dots`` (:func:`plain_numbers`): the count of ``.`` in the JSON the rows came from, when it
    holds no string but its ``inputs`` key, else -1. When the values number as many, each is a
    fraction (what orjson reads as a float), and no value's type is looked at.
    """
    if dots < 0 and not _all_floats(inputs, expected):
        return None
    try:
        wide = np.asarray(inputs, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):  # ragged, or not numbers
        return None
    if wide.ndim != 2 or not wide.size or (expected is not None and wide.shape[1] != expected):
        return None
    if dots >= 0 and wide.size != dots and not _all_floats(inputs, expected):
        return None  # some value has no ".": an integer, which the general path converts
    largest = _FLOAT_MAX.get(dtype)
    if largest is None:
        largest = _FLOAT_MAX[dtype] = float(np.finfo(dtype).max)
    if not (-largest <= np.minimum.reduce(wide, axis=None) and np.maximum.reduce(wide, axis=None) <= largest):
        return None
    return wide.astype(dtype)


def _all_floats(inputs: list[Any], expected: int | None) -> bool:
    return all(type(row) is list and (expected is None or len(row) == expected)
               and _FLOAT_TYPE_SET.issuperset(map(type, row)) for row in inputs)


def plain_numbers(body: bytes) -> int:
    """For a JSON body ``{"inputs": ...}`` with no string but that key: its count of ``.``; else -1.

    Outside strings, a ``.`` can only be a number's (one at most each). So when the values number
    as many as the body's dots, each has one: each is a fraction, none an integer, a boolean or
    ``null`` (which have none), and :func:`float_rows` need not look at their types.
    """
    if body.count(b'"') != 2:
        return -1
    return body.count(b".")


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


def predict_inference(
    *, dataplane: DataPlane, name: str, inputs: Any, request_id: str | None = None,
    started: float | None = None, inline: bool = False,
) -> Inference:
    """Our ``POST /v1/models/{name}/predict`` with ``inputs`` (the body's field): the answer's outputs.

    Raises the protocol's errors (422 for bad rows); the route and the fast lane shape them.
    """
    started = time.perf_counter() if started is None else started
    served = served_model(dataplane, name)
    settings = dataplane.settings
    signature = served.signature
    try:
        arrays: dict[str, np.ndarray]
        validated = False
        if isinstance(inputs, dict) and len(signature.inputs) > 1:
            specs = {spec.name: spec for spec in signature.inputs}
            unknown = sorted(set(inputs) - set(specs))
            if unknown:
                raise ValidationFailed(f"unknown input(s) {unknown}; the model takes {list(specs)}")
            arrays = {key: array_from_json(value, specs[key].dtype, what=f"input {key!r}")
                      for key, value in inputs.items()}
        else:
            if len(signature.inputs) != 1 or len(signature.inputs[0].shape) != 2:
                raise ValidationFailed(
                    f"this model takes {[s.describe() for s in signature.inputs]}; send "
                    '{"inputs": {name: array, ...}} or use the v2 protocol'
                )
            spec = signature.inputs[0]
            arrays = {spec.name: parse_rows(inputs, spec=spec, max_rows=settings.max_batch_rows,
                                            allow_non_finite=settings.allow_non_finite)}
            # parse_rows checked what validate_inputs would: dtype, shape, rows, finite values.
            validated = True
        return infer(dataplane=dataplane, served=served, arrays=arrays, request_id=request_id,
                     started=started, inline=inline, validated=validated)
    except InvalidInput as exc:
        # This protocol has answered bad rows with 422 since its first version.
        raise ValidationFailed(exc.message, details=exc.details) from exc
    except ValidationFailed:
        count_error(dataplane, name, "invalid_input")
        raise


def predict_body(inference: Inference) -> dict[str, Any]:
    """Our predict answer: the model, the version that answered, its first output per row."""
    return answer_body(inference.model, inference.version, next(iter(inference.outputs.values())))


def answer_body(model: str, version: str, first: np.ndarray) -> dict[str, Any]:
    return {"model": model, "model_version": version, "outputs": first.tolist()}
