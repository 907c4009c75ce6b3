"""Our JSON protocol's codec: ``{"inputs": [[...], ...]}`` rows to the arrays a version takes, and
its answer body ``{"model", "model_version", "outputs"}``.

Rows of plain numbers are checked with a few C-level passes; anything off goes through a
value-by-value check that names the first offending value (a 422).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from services.serving.core.dataplane import Decoded, Inference, InferenceRequest, Rows
from services.serving.core.validation import array_from_json
from services.serving.runtimes.base import Signature, TensorSpec
from services.serving.settings import ServingSettings
from shipyard_common.errors import (
    InvalidInput,
    ValidationFailed,
)

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


def float_rows(inputs: list[Any], dtype: np.dtype[Any], expected: int | None) -> np.ndarray | None:
    """Rows of Python floats as ``dtype``, all finite and in its range; None: take the general path.

    The common request (fractional features, a floating-point model): converted to float64 in one
    numpy call (which cannot overflow), checked with two reductions (a NaN fails every comparison,
    ±Inf or a value beyond ``dtype``'s range fails the bounds), then cast. Anything else (integers,
    which may exceed 64 bits; bad values; ragged rows) goes the general way, which names the problem.
    """
    if not _all_floats(inputs, expected):
        return None
    return _float_array(inputs, dtype, expected)


def _float_array(inputs: list[Any], dtype: np.dtype[Any], expected: int | None) -> np.ndarray | None:
    """:func:`float_rows` for rows already known to be lists of Python floats."""
    try:
        wide = np.asarray(inputs, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):  # ragged, or not numbers
        return None
    if wide.ndim != 2 or not wide.size or (expected is not None and wide.shape[1] != expected):
        return None
    largest = _FLOAT_MAX.get(dtype)
    if largest is None:
        largest = _FLOAT_MAX[dtype] = float(np.finfo(dtype).max)
    if not (-largest <= np.minimum.reduce(wide, axis=None) and np.maximum.reduce(wide, axis=None) <= largest):
        return None
    return wide.astype(dtype)


_CONVERTERS: dict[np.dtype[Any], Callable[[list[Any]], np.ndarray | None]] = {}


def _converter(dtype: np.dtype[Any]) -> Callable[[list[Any]], np.ndarray | None]:
    """Rows of floats (of one width, already checked) as ``dtype``: :class:`Rows`'s ``convert``."""
    found = _CONVERTERS.get(dtype)
    if found is None:
        found = _CONVERTERS[dtype] = functools.partial(_float_array, dtype=dtype, expected=None)
    return found


def _all_floats(inputs: list[Any], expected: int | None) -> bool:
    return all(type(row) is list and (expected is None or len(row) == expected)
               and _FLOAT_TYPE_SET.issuperset(map(type, row)) for row in inputs)


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


def inference_request(
    *, settings: ServingSettings, name: str, inputs: Any, request_id: str | None = None,
    started: float | None = None,
) -> InferenceRequest:
    """Our ``POST /v1/models/{name}/predict`` with ``inputs`` (the body's field), for the data plane.

    Rows (a list of lists of numbers) for a model with one 2-D input, or ``{name: array}`` for a
    model with several. Bad rows are 422s here; wrap the data plane's call in :func:`as_422`.
    """

    def decode(signature: Signature) -> Decoded:
        if isinstance(inputs, dict) and len(signature.inputs) > 1:
            specs = {spec.name: spec for spec in signature.inputs}
            unknown = sorted(set(inputs) - set(specs))
            if unknown:
                raise ValidationFailed(f"unknown input(s) {unknown}; the model takes {list(specs)}")
            return Decoded({key: array_from_json(value, specs[key].dtype, what=f"input {key!r}")
                            for key, value in inputs.items()})
        if len(signature.inputs) != 1 or len(signature.inputs[0].shape) != 2:
            raise ValidationFailed(
                f"this model takes {[s.describe() for s in signature.inputs]}; send "
                '{"inputs": {name: array, ...}} or use the v2 protocol'
            )
        spec = signature.inputs[0]

        def alone() -> dict[str, np.ndarray]:
            # parse_rows checks what validate_inputs would: dtype, shape, rows, finite values.
            return {spec.name: parse_rows(inputs, spec=spec, max_rows=settings.max_batch_rows,
                                          allow_non_finite=settings.allow_non_finite)}

        width = spec.shape[1]
        if (
            spec.shape[0] is None and width is not None and spec.dtype.kind == "f"
            and not settings.allow_non_finite and type(inputs) is list
            and 0 < len(inputs) <= settings.max_batch_rows and _all_floats(inputs, width)
        ):
            # Rows of floats of the right width: made an array with the rows they share a call with.
            return Decoded({}, checked=True, rows=Rows(spec.name, inputs, width, _converter(spec.dtype), alone))
        return Decoded(alone(), checked=True)

    return InferenceRequest(model=name, decode=decode, request_id=request_id,
                            started=time.perf_counter() if started is None else started)


def as_422(exc: InvalidInput) -> ValidationFailed:
    """This protocol has answered bad inputs with 422 since its first version (v2 and TF: 400)."""
    return ValidationFailed(exc.message, details=exc.details)


def predict_body(inference: Inference) -> dict[str, Any]:
    """Our predict answer: the model, the version that answered, its first output per row."""
    return answer_body(inference.model, inference.version, next(iter(inference.outputs.values())))


def answer_body(model: str, version: str, first: np.ndarray) -> dict[str, Any]:
    return {"model": model, "model_version": version, "outputs": first.tolist()}
