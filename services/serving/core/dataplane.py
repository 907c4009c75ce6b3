"""Answering predictions, whatever the protocol: one call, :func:`infer`.

Every protocol (ours, the Open Inference Protocol v2 in JSON or binary tensors, TF Serving's REST
API) turns its request into an :class:`InferenceRequest` (the model, version or label, and how to
decode its body against the answering version's signature) and awaits :func:`infer`, which picks
the version (canary split, labels, versions), decodes and checks the inputs, runs the model through
the version's batcher (merged with concurrent requests of any protocol), logs the exchange, counts
it and copies it to the shadow version. Every refusal is counted here, once; the protocol only
words it in its own error shape.

On the event loop: the model runs there when its calls are cheap, else in ``pool`` (batching/);
the prediction log's append, which waits when the log is full, then waits in ``pool`` too.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from services.serving.core.loaded import LoadedModels, ModelState, ServedModel
from services.serving.core.metrics import NO_VERSION, UNKNOWN_MODEL, ServingMetrics
from services.serving.core.routing import (
    Router,
    ShadowMirror,
    hold,
    shadow_of,
)
from services.serving.core.validation import validate_inputs
from services.serving.predlog.log import PredictionLog
from services.serving.runtimes.base import Signature
from services.serving.settings import ServingSettings
from shipyard_common.errors import (
    InvalidInput,
    NotFound,
    ShipyardError,
    UpstreamError,
    ValidationFailed,
)
from shipyard_common.lineage import PRODUCTION

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


@dataclass
class DataPlane:
    settings: ServingSettings
    models: LoadedModels
    prediction_log: PredictionLog
    metrics: ServingMetrics
    #: Runs the costly model calls and the log's waits for room, off the event loop.
    pool: Executor
    #: Which loaded version answers (canary split, labels, versions); copies to the shadow.
    router: Router = field(default_factory=Router)
    shadow: ShadowMirror = field(default_factory=ShadowMirror)


Arrays = dict[str, np.ndarray]


class Decoded(NamedTuple):
    """A request's inputs, decoded against the answering version's signature."""

    arrays: Arrays
    #: Whether the codec already checked them against that signature (our rows are: not twice).
    checked: bool = False
    #: An id the body carries (v2's ``id``), used before the request's own.
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """One prediction request, whatever its protocol."""

    model: str
    #: The codec's reading of the body for a version's signature; raises InvalidInput or
    #: ValidationFailed (counted as ``invalid_input``) when the body does not fit it.
    decode: Callable[[Signature], Decoded]
    version: str | None = None
    label: str | None = None
    request_id: str | None = None
    #: ``time.perf_counter()`` when the request came in: its logged latency starts there.
    started: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Inference:
    model: str
    version: str
    signature: Signature
    #: Every output the model answered, in the signature's order.
    outputs: dict[str, np.ndarray]
    request_id: str


def resolve(
    dataplane: DataPlane, name: str, *, version: str | None = None, label: str | None = None,
    split: bool = False,
) -> ServedModel:
    """The loaded version that answers for ``name`` (and ``version`` or ``label``, if given).

    ``split``: a request naming neither goes to the canary with the model's canary weight.
    """
    return dataplane.router.resolve(dataplane.models, name, version=version, label=label, split=split)


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


async def infer(dataplane: DataPlane, request: InferenceRequest) -> Inference:
    """The one data-plane call: see the module docstring. Raises ShipyardError for the protocol to word."""
    name = request.model
    try:
        served = resolve(dataplane, name, version=request.version, label=request.label, split=True)
    except ShipyardError as exc:
        count_error(dataplane, name, exc.code)
        raise
    try:
        decoded = request.decode(served.signature)
    except (InvalidInput, ValidationFailed):
        count_error(dataplane, name, "invalid_input")
        raise
    return await run(dataplane, served, decoded.arrays, request_id=decoded.request_id or request.request_id,
                     started=request.started, checked=decoded.checked)


async def run(
    dataplane: DataPlane, served: ServedModel, arrays: Arrays, *, request_id: str | None, started: float,
    checked: bool = False,
) -> Inference:
    """Check ``arrays`` against ``served``'s signature, run them, log, count and mirror the exchange.

    Runs holding the version's lease (:func:`~services.serving.core.routing.hold`: a version retired
    meanwhile is replaced by its successor), counted in its model's in-flight gauge. ``checked``:
    the codec checked them against ``served`` already (not again, unless another version answers).
    """
    chosen = served
    served = hold(dataplane.models, dataplane.router, served)
    try:
        counted = dataplane.metrics.version(served.name, served.version)  # cached: no .labels() here
        counted.in_flight.inc()
        try:
            inputs = arrays if checked and served is chosen else _validated(dataplane, served, arrays)
            outputs = await _outputs(dataplane, served, inputs)
            record = log_record(served, request_id, _logged_inputs(inputs),
                                loggable(next(iter(outputs.values()))),
                                (time.perf_counter() - started) * 1000, time.time())
            await _append(dataplane, record)
            counted.requests.inc()
            counted.rows.inc(int(next(iter(inputs.values())).shape[0]) if inputs else 0)
            counted.latency.observe(record["latency_ms"] / 1000)
        finally:
            counted.in_flight.dec()
    finally:
        served.lease.release()
    _mirror(dataplane, served, inputs, record["request_id"])
    return Inference(model=served.name, version=served.version, signature=served.signature, outputs=outputs,
                     request_id=record["request_id"])


def _validated(dataplane: DataPlane, served: ServedModel, arrays: Arrays) -> Arrays:
    settings = dataplane.settings
    try:
        return validate_inputs(arrays, served.signature, max_batch_rows=settings.max_batch_rows,
                               allow_non_finite=settings.allow_non_finite)
    except InvalidInput:
        count_error(dataplane, served.name, "invalid_input", version=served.version)
        raise


async def _outputs(dataplane: DataPlane, served: ServedModel, inputs: Arrays) -> Arrays:
    """The version's outputs for checked ``inputs``, in its signature's order; a failure is the model's."""
    try:
        answered = await served.batcher.run(inputs, pool=dataplane.pool)
        return {spec.name: np.asarray(answered[spec.name]) for spec in served.signature.outputs}
    except Exception as exc:  # inputs passed the checks, so this is the model's own failure
        count_error(dataplane, served.name, "runtime_error", version=served.version)
        raise UpstreamError(
            f"model {served.name!r} version {served.version} failed on this input: {exc}"
        ) from exc


async def _append(dataplane: DataPlane, record: dict[str, Any]) -> None:
    """Log ``record``: at once when there is room, else waiting for room in the pool (nothing is dropped)."""
    prediction_log = dataplane.prediction_log
    if prediction_log.try_reserve():
        prediction_log.append(record, reserved=True)
        return
    await asyncio.get_running_loop().run_in_executor(dataplane.pool, prediction_log.append, record)


def _mirror(dataplane: DataPlane, answered: ServedModel, inputs: Arrays, request_id: str) -> None:
    """A copy of the request for the model's shadow version, if it has one: never waited for."""
    shadow = shadow_of(dataplane.models, answered)
    if shadow is not None:
        dataplane.shadow.submit(shadow, lambda target: run(
            dataplane, target, inputs, request_id=request_id, started=time.perf_counter()))


_ORJSON_KINDS = frozenset("iuf")


def loggable(value: np.ndarray) -> Any:
    """``value`` as the prediction log may hold it: the array itself where orjson writes it directly.

    orjson serializes C-contiguous numeric arrays natively (no Python list of floats per request);
    anything else (small types such as float16 included, which not every orjson takes) becomes a list.
    """
    if value.flags.c_contiguous and value.dtype.kind in _ORJSON_KINDS and value.dtype.itemsize >= 4:
        return value
    return value.tolist()


def _logged_inputs(inputs: Arrays) -> Any:
    if len(inputs) == 1:
        return loggable(next(iter(inputs.values())))
    return {key: loggable(value) for key, value in inputs.items()}


def log_record(
    served: ServedModel, request_id: str | None, inputs: Any, outputs: Any, latency_ms: float, created: float
) -> dict[str, Any]:
    """A prediction log record; ``created``: when it was answered (seconds since the epoch, read as
    UTC when written), not when the shipper got to it."""
    return {
        "request_id": request_id or new_request_id(),  # the shadow's row shares it
        "model": served.name,
        "version": served.version,
        "role": served.alias,
        "inputs": inputs,
        "outputs": outputs,
        "latency_ms": latency_ms,
        "created_at": created,
    }


def model_state(dataplane: DataPlane, name: str) -> ModelState:
    state = dataplane.models.state(name)
    if state is None:
        raise NotFound(
            f"model {name!r} is not served: no registered model of that name has a '{PRODUCTION}' alias"
        )
    return state
