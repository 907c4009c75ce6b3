"""Answering predictions, whatever the protocol: find the version, check the inputs, run, log.

Every protocol (ours, the Open Inference Protocol v2, TF Serving's REST API) decodes its
request to named arrays and calls :func:`infer`; what differs between them is only the codec.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import orjson

from services.serving.batching import BatchingRuntime
from services.serving.metrics import NO_VERSION, UNKNOWN_MODEL, ServingMetrics, VersionMetrics
from services.serving.models import LoadedModels, ModelState, ServedModel
from services.serving.prediction_log import PredictionLog
from services.serving.routing import (
    Router,
    ShadowMirror,
    hold,
    role_status,
    role_version_status,
    shadow_of,
)
from services.serving.runtimes.base import Runtime, Signature, TensorSpec
from services.serving.schemas import ModelStatusPublic, PredictResponse
from services.serving.settings import ServingSettings
from services.serving.validation import array_from_json, validate_inputs
from shipyard_common.errors import (
    InvalidInput,
    NotFound,
    ShipyardError,
    UpstreamError,
    ValidationFailed,
)
from shipyard_common.lineage import PRODUCTION

_NUMBER_TYPES = (int, float)
#: Response header naming the version that answered, on every protocol's predict route.
VERSION_HEADER = "X-Model-Version"


class _RequestIds:
    """Request ids of 32 hex digits: 16 random ones per process, then a count.

    Unique across processes and restarts without a random draw (or ``os.urandom`` call) per
    request; a forked child draws its own prefix.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._next = itertools.count(1).__next__

    def __call__(self) -> str:
        return f"{self._prefix}{self._next():016x}"


new_request_id = _RequestIds()
os.register_at_fork(after_in_child=new_request_id.reseed)


class Offload(Exception):  # noqa: N818 - a signal, not an error
    """An inline (event-loop) call found it would have to block: run the request in a thread instead.

    Raised before the model ran and before anything was counted or logged, so the request can
    simply be run again.
    """


@dataclass
class DataPlane:
    settings: ServingSettings
    models: LoadedModels
    prediction_log: PredictionLog
    metrics: ServingMetrics
    #: Which loaded version answers (canary split, labels, versions); copies to the shadow.
    router: Router = field(default_factory=Router)
    shadow: ShadowMirror = field(default_factory=ShadowMirror)


@dataclass(frozen=True)
class Inference:
    model: str
    version: str
    signature: Signature
    #: Every output the model answered, in the signature's order.
    outputs: dict[str, np.ndarray]


def resolve(
    dataplane: DataPlane, name: str, *, version: str | None = None, label: str | None = None,
    split: bool = False,
) -> ServedModel:
    """The loaded version that answers for ``name`` (and ``version`` or ``label``, if given).

    ``split``: a request naming neither goes to the canary with the model's canary weight.
    """
    return dataplane.router.resolve(dataplane.models, name, version=version, label=label, split=split)


def _mirror(
    dataplane: DataPlane, answered: ServedModel, arrays: dict[str, np.ndarray], request_id: str
) -> None:
    """A copy of the request for the model's shadow version, if it has one: never waited for."""
    shadow = shadow_of(dataplane.models, answered)
    if shadow is not None:
        dataplane.shadow.submit(shadow, lambda target: infer(
            dataplane=dataplane, served=target, arrays=arrays, request_id=request_id))


def count_error(dataplane: DataPlane, name: str, reason: str, *, version: str | None = None) -> None:
    """Count a refused or failed request; ``version`` defaults to the one serving ``name`` now."""
    # Only names and versions serving knows become label values: others would grow it forever.
    state = dataplane.models.state(name)
    if version is None and state is not None and state.served is not None:
        version = state.served.version
    if state is None or version is None:
        model = name if state is not None else UNKNOWN_MODEL
        dataplane.metrics.prediction_errors.labels(model, NO_VERSION, reason).inc()
        return
    dataplane.metrics.version(name, version).error(reason).inc()


def served_model(
    dataplane: DataPlane, name: str, *, version: str | None = None, label: str | None = None
) -> ServedModel:
    try:
        return resolve(dataplane, name, version=version, label=label, split=True)
    except ShipyardError as exc:
        count_error(dataplane, name, exc.code)
        raise


_ORJSON_KINDS = frozenset("iuf")


def _loggable(value: np.ndarray) -> Any:
    """``value`` as the prediction log may hold it: the array itself where orjson writes it directly.

    orjson serializes C-contiguous numeric arrays natively (no Python list of floats per request);
    anything else (small types such as float16 included, which not every orjson takes) becomes a list.
    """
    if value.flags.c_contiguous and value.dtype.kind in _ORJSON_KINDS and value.dtype.itemsize >= 4:
        return value
    return value.tolist()


def infer(
    *,
    dataplane: DataPlane,
    served: ServedModel,
    arrays: dict[str, np.ndarray],
    request_id: str | None = None,
    started: float | None = None,
    inline: bool = False,
    validated: bool = False,
) -> Inference:
    """Check ``arrays`` against ``served``'s signature, run it, log the exchange.

    Runs holding the version's lease (:func:`~services.serving.routing.hold`: a version retired
    meanwhile is replaced by its successor), counted in its model's in-flight gauge.

    ``inline``: the caller is the event loop, which must not block: the model call is never
    queued for a merged call, and room in the prediction log is reserved before the model runs:
    a full log raises :class:`Offload` (nothing run, logged or counted yet) so that the caller runs
    the request again in a thread, where it may wait.

    ``validated``: the protocol's parser already checked ``arrays`` against ``served``'s signature
    (:func:`parse_rows`), so they are not checked twice, unless another version ends up answering.
    """
    started = time.perf_counter() if started is None else started
    chosen = served
    served = hold(dataplane.models, dataplane.router, served)
    try:
        counted = dataplane.metrics.version(served.name, served.version)  # cached: no .labels() here
        in_flight = counted.in_flight
        in_flight.inc()
        try:
            return _infer_held(dataplane, served, counted, arrays, request_id=request_id, started=started,
                               inline=inline, validated=validated and served is chosen)
        finally:
            in_flight.dec()
    finally:
        served.lease.release()


def _infer_held(
    dataplane: DataPlane, served: ServedModel, counted: VersionMetrics, arrays: dict[str, np.ndarray], *,
    request_id: str | None, started: float, inline: bool, validated: bool,
) -> Inference:
    name = served.name
    settings = dataplane.settings
    if validated:
        checked = arrays
    else:
        try:
            checked = validate_inputs(
                arrays, served.signature, max_batch_rows=settings.max_batch_rows,
                allow_non_finite=settings.allow_non_finite,
            )
        except InvalidInput:
            count_error(dataplane, name, "invalid_input", version=served.version)
            raise
    outputs, record = _run_logged(dataplane, served, counted, checked, request_id=request_id, started=started,
                                  inline=inline)
    _mirror(dataplane, served, checked, record["request_id"])
    return Inference(model=name, version=served.version, signature=served.signature, outputs=outputs)


def _run_logged(
    dataplane: DataPlane, served: ServedModel, counted: VersionMetrics, checked: dict[str, np.ndarray], *,
    request_id: str | None, started: float, inline: bool,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run checked inputs on ``served``, log and count the exchange: its outputs and log record.

    ``inline`` (the event loop): room in the log is reserved before the model runs; a full log
    raises :class:`Offload` with nothing run, logged or counted.
    """
    prediction_log = dataplane.prediction_log
    if inline and not prediction_log.try_reserve():
        raise Offload
    try:
        outputs, record = _run(dataplane, served, checked, request_id=request_id, started=started,
                               inline=inline)
    except BaseException:
        if inline:
            prediction_log.release()  # the record never took its place
        raise
    # Waits while the log is full (not inline: room is already held): nothing answered is dropped.
    prediction_log.append(record, reserved=inline)
    counted.requests.inc()
    counted.rows.inc(int(next(iter(checked.values())).shape[0]) if checked else 0)
    counted.latency.observe(record["latency_ms"] / 1000)
    return outputs, record


def _run(
    dataplane: DataPlane, served: ServedModel, checked: dict[str, np.ndarray], *,
    request_id: str | None, started: float, inline: bool,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run ``checked`` through ``served``: its outputs, and the prediction log's record of the exchange."""
    name = served.name
    try:
        runtime = served.runtime
        if isinstance(runtime, BatchingRuntime):  # measures its own calls' cost
            answered = runtime.predict_now(checked) if inline else runtime.predict(checked)
        else:
            answered = served.own_cost.timed(runtime.predict, checked)
        outputs = {spec.name: np.asarray(answered[spec.name]) for spec in served.signature.outputs}
    except Exception as exc:  # inputs passed the checks, so this is the model's own failure
        count_error(dataplane, name, "runtime_error", version=served.version)
        raise UpstreamError(f"model {name!r} version {served.version} failed on this input: {exc}") from exc
    latency_ms = (time.perf_counter() - started) * 1000
    inputs_logged: Any
    if len(checked) == 1:
        inputs_logged = _loggable(next(iter(checked.values())))
    else:
        inputs_logged = {key: _loggable(value) for key, value in checked.items()}
    record = _record(served, request_id, inputs_logged, _loggable(next(iter(outputs.values()))), latency_ms,
                     time.time())
    return outputs, record


def _record(
    served: ServedModel, request_id: str | None, inputs: Any, outputs: Any, latency_ms: float, created: float
) -> dict[str, Any]:
    """A prediction log record; ``created``: when it was answered (seconds since the epoch, read as
    UTC when written), not when the shipper got to it."""
    return {
        "request_id": request_id or new_request_id(),  # the shadow's row shares it
        "model": served.name,
        "version": served.version,
        "role": served.role,
        "inputs": inputs,
        "outputs": outputs,
        "latency_ms": latency_ms,
        "created_at": created,
    }


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
        fast = _float_rows(inputs, spec.dtype, expected)
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


def _float_rows(
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
    ``null`` (which have none), and :func:`_float_rows` need not look at their types.
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


def _rows_version(dataplane: DataPlane, name: str) -> tuple[ServedModel, TensorSpec] | None:
    """``name``'s production version and its rows input, when it answers alone (no canary, no
    shadow), takes rows of fractional numbers and its calls are cheap (and NaN/Inf are refused)."""
    state = dataplane.models.state(name)
    if state is None or state.canary.served is not None or state.shadow.served is not None:
        return None
    served = state.served
    if served is None or served.rows_input is None or not served.cost.cheap:
        return None
    if dataplane.settings.allow_non_finite:
        return None
    return served, served.rows_input


def predict_rows_now(
    *, dataplane: DataPlane, name: str, inputs: Any, request_id: str | None, started: float, dots: int = -1,
) -> tuple[bytes, str] | None:
    """Our protocol's commonest request answered in one pass on the event loop: (body, version).

    The case: rows of fractional numbers for a model served by its production version alone (no
    canary, no shadow), whose version takes such rows (:attr:`ServedModel.rows_input`) and whose
    calls are cheap. The checks, the log record, the metrics and the answer are those of
    :func:`predict_inference` (the same functions do them), without its layers, which cost more
    than such a model's call. None: not that case, or the version is being replaced or the log is
    full; nothing was run, logged or counted then, and the caller takes the general path, which
    also words every refusal.
    """
    found = _rows_version(dataplane, name)
    if found is None or type(inputs) is not list or not 0 < len(inputs) <= dataplane.settings.max_batch_rows:
        return None
    served, spec = found
    array = _float_rows(inputs, spec.dtype, spec.shape[1], dots=dots)
    if array is None or not served.lease.acquire():
        return None
    try:
        counted = dataplane.metrics.version(name, served.version)
        in_flight = counted.in_flight
        in_flight.inc()
        try:
            outputs, _ = _run_logged(dataplane, served, counted, {spec.name: array}, request_id=request_id,
                                     started=started, inline=True)
        except Offload:
            return None
        finally:
            in_flight.dec()
    finally:
        served.lease.release()
    first = outputs[served.signature.outputs[0].name]
    return orjson.dumps(_answer_body(name, served.version, first)), served.version


class RowsRequest(NamedTuple):
    """One request of our protocol, as :func:`predict_rows_merged` takes it: the body's ``inputs``."""

    inputs: Any
    request_id: str | None
    #: ``time.perf_counter()`` when the request came in (its logged latency starts there).
    started: float
    #: :func:`plain_numbers` of its body (-1: not known to hold only numbers).
    dots: int = -1


def predict_rows_merged(
    *, dataplane: DataPlane, name: str, requests: list[RowsRequest]
) -> list[tuple[bytes, str] | None]:
    """Several of :func:`predict_rows_now`'s requests for ``name`` answered by merged runtime calls.

    For the event loop, which gathers the cheap requests that arrived together (fastlane.py): one
    runtime call for all their rows costs little more than one for a single row, where a call per
    request would cost each its own. Each request is still checked, logged (its own record: its
    rows, outputs, latency and id) and counted as if alone, and gets exactly its own rows back.
    Calls hold at most the version's merged-batch size of rows.

    Answers in the requests' order; None for a request this did not answer (not that case, or a
    request whose rows are not plain numbers, or a merged call that failed): nothing was run,
    logged or counted for it, and the caller answers it alone (:func:`predict_rows_now`, else the
    general path), which words every refusal and keeps failures with their request.
    """
    answers: list[tuple[bytes, str] | None] = [None] * len(requests)
    found = _rows_version(dataplane, name)
    if found is None:
        return answers
    served, spec = found
    runtime = served.runtime
    if not isinstance(runtime, BatchingRuntime) or not runtime.merges:
        return answers
    max_rows = dataplane.settings.max_batch_rows
    limit = runtime.max_batch_size
    chunk: list[int] = []
    chunk_rows = 0
    for index, request in enumerate(requests):
        inputs = request.inputs
        if type(inputs) is not list or not 0 < len(inputs) <= max_rows:
            continue
        if chunk and chunk_rows + len(inputs) > limit:
            _answer_merged(dataplane, served, runtime, spec, requests, chunk, answers)
            chunk, chunk_rows = [], 0
        chunk.append(index)
        chunk_rows += len(inputs)
    _answer_merged(dataplane, served, runtime, spec, requests, chunk, answers)
    return answers


def _answer_merged(
    dataplane: DataPlane, served: ServedModel, runtime: BatchingRuntime, spec: TensorSpec,
    requests: list[RowsRequest], chunk: list[int], answers: list[tuple[bytes, str] | None],
) -> None:
    """One merged call for the requests at ``chunk``'s indexes, their answers put in ``answers``."""
    if len(chunk) < 2:
        return  # alone: the caller's single-request path
    rows: list[Any] = []
    counts: list[int] = []
    dots = 0
    for index in chunk:
        request = requests[index]
        rows += request.inputs
        counts.append(len(request.inputs))
        dots = -1 if dots < 0 or request.dots < 0 else dots + request.dots
    array = _float_rows(rows, spec.dtype, spec.shape[1], dots=dots)
    if array is None:
        return  # some request's rows are not plain numbers: each alone, so that its refusal is its own
    prediction_log = dataplane.prediction_log
    if not served.lease.acquire():
        return
    try:
        if not prediction_log.try_reserve(len(chunk)):
            return
        name, version = served.name, served.version
        counted = dataplane.metrics.version(name, version)
        in_flight = counted.in_flight
        in_flight.inc(len(chunk))
        try:
            try:
                split = runtime.predict_merged_now({spec.name: array}, counts)
            except Exception:
                split = None  # each alone: a failure stays with the request that caused it
            if split is None:
                prediction_log.release(len(chunk))
                return
            output = served.signature.outputs[0].name
            records: list[dict[str, Any]] = []
            latencies: list[float] = []
            answered = time.perf_counter()
            created = time.time()
            start = 0
            for index, count, outputs in zip(chunk, counts, split, strict=True):
                request = requests[index]
                end = start + count
                first = np.asarray(outputs[output])
                latency_s = answered - request.started
                latencies.append(latency_s)
                records.append(_record(served, request.request_id, array[start:end], _loggable(first),
                                       latency_s * 1000, created))
                answers[index] = orjson.dumps(_answer_body(name, version, first)), version
                start = end
            try:
                prediction_log.append_reserved(records)
            except ShipyardError:  # shutting down: each alone gets the log's refusal (none answered unlogged)
                for index in chunk:
                    answers[index] = None
                return
            counted.requests.inc(len(chunk))
            counted.rows.inc(start)
            observe = counted.latency.observe
            for latency_s in latencies:
                observe(latency_s)
        finally:
            in_flight.dec(len(chunk))
    finally:
        served.lease.release()


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


def _runtime_threads(runtime: Runtime) -> int | None:
    inner = runtime.runtime if isinstance(runtime, BatchingRuntime) else runtime
    threads = getattr(inner, "threads", None)
    return threads if isinstance(threads, int) else None


def predict_body(inference: Inference) -> dict[str, Any]:
    """Our predict answer: the model, the version that answered, its first output per row."""
    return _answer_body(inference.model, inference.version, next(iter(inference.outputs.values())))


def _answer_body(model: str, version: str, first: np.ndarray) -> dict[str, Any]:
    return {"model": model, "model_version": version, "outputs": first.tolist()}


def predict(
    *, dataplane: DataPlane, name: str, inputs: Any, request_id: str | None = None
) -> PredictResponse:
    inference = predict_inference(dataplane=dataplane, name=name, inputs=inputs, request_id=request_id)
    return PredictResponse(**predict_body(inference))


# -- status ---------------------------------------------------------------------------------------


def version_status(state: ModelState) -> list[dict[str, Any]]:
    """TF Serving's ``model_version_status`` for one model."""
    found: list[dict[str, Any]] = []
    if state.served is not None:
        found.append({"version": state.served.version, "state": "AVAILABLE",
                      "status": {"error_code": "OK", "error_message": ""}})
    target = state.target_version
    if target is not None and (state.served is None or state.served.version != target):
        if state.error and state.failed_version == target:
            found.append({"version": target, "state": "END",
                          "status": {"error_code": "UNKNOWN", "error_message": state.error}})
        else:
            found.append({"version": target, "state": "LOADING",
                          "status": {"error_code": "OK", "error_message": ""}})
    found.extend(role_version_status(state, {entry["version"] for entry in found}))  # canary, shadow
    return found


def _status_public(state: ModelState) -> ModelStatusPublic:
    served = state.served
    signature = served.signature if served else None
    first_input = signature.inputs[0] if signature else None
    return ModelStatusPublic(
        name=state.name,
        version=served.version if served else None,
        status=state.status,
        target_version=state.target_version,
        error=state.error,
        failed_version=state.failed_version,
        loaded_at=served.loaded_at if served else None,
        format=served.runtime.format if served else None,
        platform=served.runtime.platform if served else None,
        runtime_threads=_runtime_threads(served.runtime) if served else None,
        input_name=first_input.name if first_input else None,
        output_name=signature.outputs[0].name if signature else None,
        n_features=(
            first_input.shape[1] if first_input is not None and len(first_input.shape) == 2 else None
        ),
        inputs=[s.to_json() for s in signature.inputs] if signature else None,
        outputs=[s.to_json() for s in signature.outputs] if signature else None,
        model_version_status=version_status(state),
        **role_status(state),
    )


def model_state(dataplane: DataPlane, name: str) -> ModelState:
    state = dataplane.models.state(name)
    if state is None:
        raise NotFound(
            f"model {name!r} is not served: no registered model of that name has a '{PRODUCTION}' alias"
        )
    return state


def list_models(*, dataplane: DataPlane) -> list[ModelStatusPublic]:
    return [_status_public(state) for state in dataplane.models.states()]


def get_model(*, dataplane: DataPlane, name: str) -> ModelStatusPublic:
    return _status_public(model_state(dataplane, name))
