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
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from services.serving.batching.adaptive import shape_key
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


class Rows(NamedTuple):
    """Rows for a version's one 2-D input, checked but not yet made an array.

    The requests that share a call convert their rows together, in one ``convert`` of all of
    them (one numpy conversion and check per group instead of one per request). ``convert``
    answers None when some value is off (a NaN, a value out of range); then each request is
    decoded alone with ``alone``, which raises the worded refusal for the request that holds it.
    """

    input: str
    rows: list[Any]
    width: int
    convert: Callable[[list[Any]], np.ndarray | None]
    alone: Callable[[], Arrays]


class Decoded(NamedTuple):
    """A request's inputs, decoded against the answering version's signature."""

    arrays: Arrays
    #: Whether the codec already checked them against that signature (our rows are: not twice).
    checked: bool = False
    #: An id the body carries (v2's ``id``), used before the request's own.
    request_id: str | None = None
    #: Rows converted with those of the requests that share the call (``arrays`` is then empty).
    rows: Rows | None = None


class InferenceRequest(NamedTuple):
    """One prediction request, whatever its protocol."""

    model: str
    #: The codec's reading of the body for a version's signature; raises InvalidInput or
    #: ValidationFailed (counted as ``invalid_input``) when the body does not fit it.
    decode: Callable[[Signature], Decoded]
    #: ``time.perf_counter()`` when the request came in: its logged latency starts there.
    started: float
    version: str | None = None
    label: str | None = None
    request_id: str | None = None


class Inference(NamedTuple):
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
                     started=request.started, checked=decoded.checked, rows=decoded.rows)


class Offload(Exception):
    """A group on the event loop found the prediction log full: its requests run again in the pool.

    Raised before the model ran and before anything was logged or counted for them, so each
    request simply runs again, alone, in a thread, where the log's append may wait for room.
    """


@dataclass(eq=False, slots=True)
class _Job:
    """One request as the version's batcher holds it (batching/adaptive.py's ``Item``)."""

    dataplane: DataPlane
    served: ServedModel
    arrays: Arrays
    request_id: str | None
    started: float
    #: The codec checked ``arrays`` against ``served``'s signature already.
    checked: bool
    #: Rows still to be converted, with those of the requests that share the call.
    rows: Rows | None = None

    def shape(self) -> tuple[Hashable, int] | None:
        """What another request must share to be merged with this one, and its row count."""
        rows = self.rows
        if rows is not None:
            return (rows.input, rows.width, "rows"), len(rows.rows)
        return shape_key(self.arrays)


class _Answered(NamedTuple):
    inference: Inference
    #: The version that answered and the checked inputs it took: what a shadow copy needs.
    served: ServedModel
    inputs: Arrays


async def run(
    dataplane: DataPlane, served: ServedModel, arrays: Arrays, *, request_id: str | None, started: float,
    checked: bool = False, rows: Rows | None = None,
) -> Inference:
    """Check ``arrays`` against ``served``'s signature, run them, log, count and mirror the exchange.

    Through the version's batcher, which answers concurrent requests in groups (:func:`answer_group`).
    ``checked``: the codec checked them against ``served`` already (not again, unless another version
    answers).
    """
    job = _Job(dataplane, served, arrays, request_id, started, checked, rows)
    try:
        answered = await served.batcher.run(job, handle=answer_group, pool=dataplane.pool)
    except Offload:
        loop = asyncio.get_running_loop()
        answers = await loop.run_in_executor(dataplane.pool, answer_group, [job], False)
        answer = answers[0]
        if isinstance(answer, BaseException):
            raise answer from None
        answered = answer
    _mirror(dataplane, answered)
    return answered.inference


def answer_group(jobs: list[_Job], on_loop: bool) -> list[_Answered | BaseException]:
    """Answer requests for one version together: one lease, one runtime call, one log append.

    Each request is still checked, logged (its own record) and counted as if alone, and a failure
    stays with its request. Held under the version's lease (:func:`~..routing.hold`: a version
    retired meanwhile is replaced by its successor), counted in its in-flight gauge. ``on_loop``:
    called on the event loop, which must not wait for room in a full log (:class:`Offload`).
    """
    first = jobs[0]
    dataplane = first.dataplane
    try:
        served = hold(dataplane.models, dataplane.router, first.served)
    except ShipyardError as exc:  # unloaded while the requests were on their way
        return [exc] * len(jobs)
    try:
        counted = dataplane.metrics.version(served.name, served.version)  # cached: no .labels() here
        counted.in_flight.inc(len(jobs))
        try:
            return _answer_held(dataplane, served, counted, jobs, on_loop=on_loop,
                                replaced=served is not first.served)
        finally:
            counted.in_flight.dec(len(jobs))
    finally:
        served.lease.release()


def _answer_held(
    dataplane: DataPlane, served: ServedModel, counted: VersionMetrics, jobs: list[_Job], *, on_loop: bool,
    replaced: bool,
) -> list[_Answered | BaseException]:
    answers: list[_Answered | BaseException | None] = [None] * len(jobs)
    runnable, merged = _checked(dataplane, served, jobs, answers, replaced=replaced)
    if runnable:
        prediction_log = dataplane.prediction_log
        reserved = prediction_log.try_reserve(len(runnable))
        if not reserved and on_loop:
            for index, _ in runnable:
                answers[index] = Offload()
        else:
            outputs = served.batcher.outputs([inputs for _, inputs in runnable], merged=merged)
            records = _answered(dataplane, served, jobs, runnable, outputs, answers)
            if reserved and len(records) < len(runnable):
                prediction_log.release(len(runnable) - len(records))
            if records:
                _append(prediction_log, records, reserved=reserved)
                _count(counted, records, [inputs for index, inputs in runnable
                                          if isinstance(answers[index], _Answered)])
    return [answer if answer is not None else RuntimeError("not answered") for answer in answers]


def _checked(
    dataplane: DataPlane, served: ServedModel, jobs: list[_Job],
    answers: list[_Answered | BaseException | None], *, replaced: bool,
) -> tuple[list[tuple[int, Arrays]], Arrays | None]:
    """The jobs' inputs checked against ``served`` (by index), and all of them in one array when they
    were converted together (:class:`Rows`); a refusal goes to ``answers``."""
    rows = jobs[0].rows
    if rows is not None and not replaced:
        together = rows.convert([row for job in jobs if job.rows is not None for row in job.rows.rows])
        if together is not None:
            runnable: list[tuple[int, Arrays]] = []
            start = 0
            for index, job in enumerate(jobs):
                end = start + len(job.rows.rows) if job.rows is not None else start
                runnable.append((index, {rows.input: together[start:end]}))
                start = end
            return runnable, {rows.input: together}
    runnable = []
    for index, job in enumerate(jobs):
        try:
            arrays = job.arrays if job.rows is None else job.rows.alone()
        except (InvalidInput, ValidationFailed) as exc:
            count_error(dataplane, served.name, "invalid_input", version=served.version)
            answers[index] = exc
            continue
        if job.checked and not replaced:
            runnable.append((index, arrays))
            continue
        try:
            runnable.append((index, _validated(dataplane, served, arrays)))
        except InvalidInput as exc:  # counted by _validated
            answers[index] = exc
    return runnable, None


def _answered(
    dataplane: DataPlane, served: ServedModel, jobs: list[_Job], runnable: list[tuple[int, Arrays]],
    outputs: list[Arrays | Exception], answers: list[_Answered | BaseException | None],
) -> list[dict[str, Any]]:
    """Each run request's answer (into ``answers``) and its log record (returned, in order)."""
    records: list[dict[str, Any]] = []
    answered_at, created = time.perf_counter(), time.time()
    for (index, inputs), output in zip(runnable, outputs, strict=True):
        try:
            found = _ordered(served, output)
        except Exception as exc:  # inputs passed the checks, so this is the model's own failure
            count_error(dataplane, served.name, "runtime_error", version=served.version)
            answers[index] = UpstreamError(
                f"model {served.name!r} version {served.version} failed on this input: {exc}")
            continue
        job = jobs[index]
        record = log_record(served, job.request_id, _logged_inputs(inputs),
                            loggable(next(iter(found.values()))), (answered_at - job.started) * 1000, created)
        records.append(record)
        inference = Inference(model=served.name, version=served.version, signature=served.signature,
                              outputs=found, request_id=record["request_id"])
        answers[index] = _Answered(inference, served, inputs)
    return records


def _ordered(served: ServedModel, output: Arrays | Exception) -> Arrays:
    """A runtime call's outputs in the signature's order (raises the call's error, or a missing output's)."""
    if isinstance(output, Exception):
        raise output
    return {spec.name: np.asarray(output[spec.name]) for spec in served.signature.outputs}


def _append(prediction_log: PredictionLog, records: list[dict[str, Any]], *, reserved: bool) -> None:
    """Log ``records`` into room reserved, else (in the pool) waiting for room: nothing is dropped."""
    if reserved:
        prediction_log.append_reserved(records)
        return
    for record in records:
        prediction_log.append(record)


def _count(counted: VersionMetrics, records: list[dict[str, Any]], inputs: list[Arrays]) -> None:
    counted.requests.inc(len(records))
    counted.rows.inc(sum(int(next(iter(arrays.values())).shape[0]) if arrays else 0 for arrays in inputs))
    observe = counted.latency.observe
    for record in records:
        observe(record["latency_ms"] / 1000)


def _validated(dataplane: DataPlane, served: ServedModel, arrays: Arrays) -> Arrays:
    settings = dataplane.settings
    try:
        return validate_inputs(arrays, served.signature, max_batch_rows=settings.max_batch_rows,
                               allow_non_finite=settings.allow_non_finite)
    except InvalidInput:
        count_error(dataplane, served.name, "invalid_input", version=served.version)
        raise


def _mirror(dataplane: DataPlane, answered: _Answered) -> None:
    """A copy of the request for the model's shadow version, if it has one: never waited for."""
    shadow = shadow_of(dataplane.models, answered.served)
    if shadow is not None:
        inputs, request_id = answered.inputs, answered.inference.request_id
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
