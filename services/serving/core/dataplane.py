"""Answering predictions, whatever the protocol: find the version, check the inputs, run, log.

Every protocol (ours, the Open Inference Protocol v2, TF Serving's REST API) decodes its
request to named arrays and calls :func:`infer`; what differs between them is only the codec.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.serving.batching.adaptive import BatchingRuntime
from services.serving.core.loaded import LoadedModels, ModelState, ServedModel
from services.serving.core.metrics import NO_VERSION, UNKNOWN_MODEL, ServingMetrics, VersionMetrics
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


class Offload(Exception):
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


def loggable(value: np.ndarray) -> Any:
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
    outputs, record = run_logged(dataplane, served, counted, checked, request_id=request_id, started=started,
                                  inline=inline)
    _mirror(dataplane, served, checked, record["request_id"])
    return Inference(model=name, version=served.version, signature=served.signature, outputs=outputs)


def run_logged(
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
        inputs_logged = loggable(next(iter(checked.values())))
    else:
        inputs_logged = {key: loggable(value) for key, value in checked.items()}
    record = log_record(served, request_id, inputs_logged, loggable(next(iter(outputs.values()))), latency_ms,
                     time.time())
    return outputs, record


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
