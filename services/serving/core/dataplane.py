"""Answering predictions, whatever the protocol: find the version, check the inputs, run, log.

Every protocol (ours, the Open Inference Protocol v2 over HTTP and gRPC, TF Serving's REST API)
decodes its request to an :class:`~services.serving.core.requests.InferenceRequest` and calls
:func:`submit` (or awaits :func:`infer`); what differs between them is only the codec. The
version's :class:`~services.serving.batching.adaptive.Batcher` gathers the requests that can share
a runtime call, and :meth:`DataPlane.run_group` answers each group: one lease, the inputs converted
and checked (once for the group where it can, else request by request, so that a refusal is each
request's own), one runtime call, one log append and one metrics update, each request still
logged and counted on its own and given exactly its own rows. A merged call that fails is run
again request by request, so that a failure stays with the request that caused it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.serving.core.convert import merge_json, to_array
from services.serving.core.loaded import LoadedModels, ModelState, ServedModel
from services.serving.core.metrics import NO_VERSION, UNKNOWN_MODEL, ServingMetrics, VersionMetrics
from services.serving.core.requests import Inference, InferenceRequest, Input, JsonTensor, settle
from services.serving.core.routing import (
    Router,
    ShadowMirror,
    hold,
    shadow_of,
)
from services.serving.core.validation import validate_inputs
from services.serving.predlog.log import PredictionLog
from services.serving.runtimes.text import TextEncoder
from services.serving.settings import ServingSettings
from shipyard_common.errors import (
    InvalidInput,
    NotFound,
    ShipyardError,
    UpstreamError,
)
from shipyard_common.lineage import PRODUCTION

log = logging.getLogger("shipyard.serving.dataplane")

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
    #: Which loaded version answers (canary split, labels, versions); copies to the shadow.
    router: Router = field(default_factory=Router)
    shadow: ShadowMirror = field(default_factory=ShadowMirror)
    #: Where groups too costly for the event loop run (the app's predict pool).
    executor: Executor = field(default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="predict"))

    def run_group(self, jobs: Sequence[InferenceRequest], *, inline: bool) -> list[Any] | None:
        """The batcher's call (:class:`~services.serving.batching.adaptive.GroupRunner`)."""
        return answer_group(self, jobs if type(jobs) is list else list(jobs), inline=inline)


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


def model_state(dataplane: DataPlane, name: str) -> ModelState:
    state = dataplane.models.state(name)
    if state is None:
        raise NotFound(
            f"model {name!r} is not served: no registered model of that name has a '{PRODUCTION}' alias"
        )
    return state


# -- taking requests ------------------------------------------------------------------------------


def submit(dataplane: DataPlane, request: InferenceRequest) -> None:
    """Answer ``request`` through ``request.reply``: now, or with the requests merged with it.

    On the event loop the version's batcher decides (loop or pool, alone or merged); called from
    any other thread, the request runs at once, alone, in that thread.
    """
    found = merge_key(request.inputs, dataplane.settings.max_batch_rows)
    if found is not None:
        request.key, request.rows = found
    served = request.served
    dataplane.metrics.version(served.name, served.version).in_flight.inc()
    served.batcher.submit(request, dataplane)


async def infer(
    dataplane: DataPlane, *, served: ServedModel, inputs: dict[str, Input], request_id: str | None = None,
    started: float | None = None,
) -> Inference:
    """:func:`submit` for callers that await: the answer, or the error raised."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    submit(dataplane, InferenceRequest(served=served, inputs=inputs, reply=settle(future),
                                       request_id=request_id, started=started))
    result = await future
    if isinstance(result, BaseException):
        raise result
    return result  # type: ignore[no-any-return]


def merge_key(inputs: dict[str, Input], max_rows: int) -> tuple[Hashable, int] | None:
    """What a request must share with another to be merged with it (its input names), and its rows;
    None: never merged. Layouts and shapes are compared once the group's inputs are converted."""
    rows = -1
    for value in inputs.values():
        if type(value) is JsonTensor:
            count = value.batch
        elif isinstance(value, np.ndarray) and value.ndim:
            count = value.shape[0]
        else:
            return None
        if count != rows and rows >= 0:
            return None
        rows = count
    if not 0 < rows <= max_rows:
        return None
    return tuple(inputs), rows


# -- answering a group ----------------------------------------------------------------------------


def answer_group(dataplane: DataPlane, jobs: list[InferenceRequest], *, inline: bool) -> list[Any] | None:
    """Each job's :class:`Inference` or refusal, in order; all are requests for one version.

    Holds the version's lease (or its successor's, :func:`~services.serving.core.routing.hold`)
    for the whole group. ``inline`` (the event loop, which must not block): room in the prediction
    log is reserved first; a full log returns None with nothing run, logged or counted, and the
    batcher runs the group in the pool, where the append may wait.
    """
    log_ = dataplane.prediction_log
    if inline and not log_.try_reserve(len(jobs)):
        return None
    first = jobs[0].served
    first_counted = dataplane.metrics.version(first.name, first.version)
    results: list[Any] = [None] * len(jobs)
    logged = 0
    try:
        served = hold(dataplane.models, dataplane.router, first)
        try:
            counted = first_counted if served is first else dataplane.metrics.version(served.name,
                                                                                       served.version)
            for part in _checked_parts(dataplane, served, jobs, results):
                logged += _run_part(dataplane, served, counted, jobs, part, results, reserved=inline)
        finally:
            served.lease.release()
    except Exception as exc:  # the version is gone (hold), or a bug: every job still gets an answer
        results = [exc if result is None else result for result in results]
    finally:
        # Counted in flight since they were submitted; no longer once answered.
        first_counted.in_flight.dec(len(jobs))
        if inline and logged < len(jobs):
            log_.release(len(jobs) - logged)
    return results


Block = tuple[list[int], list[int], dict[str, np.ndarray]]


def _checked_parts(
    dataplane: DataPlane, served: ServedModel, jobs: list[InferenceRequest], results: list[Any]
) -> list[Block]:
    """The jobs' inputs converted and checked, as parts that can share a call: (indexes, rows, arrays).

    JSON values of a one-input version are converted once per layout (:func:`merge_json`), the
    rest (and any layout whose values fail a check) job by job, each refusal put in ``results``;
    then the blocks of equal dtype and shape are merged, in arrival order.
    """
    blocks: list[Block] = []
    alone = list(range(len(jobs)))
    if len(served.signature.inputs) == 1 and len(jobs) == 1:  # the lone request: no layouts to sort
        spec, job = served.signature.inputs[0], jobs[0]
        value = job.inputs.get(spec.name)
        if type(value) is JsonTensor and job.rows and len(job.inputs) == 1:
            merged = merge_json([value], spec, max_rows=dataplane.settings.max_batch_rows,
                                allow_non_finite=dataplane.settings.allow_non_finite)
            if merged is not None:
                return [([0], [job.rows], {spec.name: merged})]
    elif len(served.signature.inputs) == 1 and served.batcher.merges:
        blocks, alone = _json_blocks(dataplane, served, jobs)
    for index in alone:
        try:
            arrays = _check_alone(dataplane, served, jobs[index])
        except ShipyardError as exc:
            count_error(dataplane, served.name, "invalid_input", version=served.version)
            results[index] = exc
            continue
        blocks.append(([index], [_rows(arrays)], arrays))
    if len(blocks) < 2 or not served.batcher.merges:
        return blocks
    parts: dict[Hashable, list[Block]] = {}
    for block in blocks:
        key = tuple((name, value.dtype.str, value.shape[1:]) for name, value in block[2].items())
        parts.setdefault(key, []).append(block)
    return [_merged(found) for found in parts.values()]


def _json_blocks(
    dataplane: DataPlane, served: ServedModel, jobs: list[InferenceRequest]
) -> tuple[list[Block], list[int]]:
    """Blocks of jobs whose one input was converted and checked together (one per layout: JSON rows,
    flat JSON of one shape, arrays of one dtype and shape), and the other jobs."""
    spec = served.signature.inputs[0]
    layouts: dict[Hashable, list[int]] = {}
    alone: list[int] = []
    for index, job in enumerate(jobs):
        value = job.inputs.get(spec.name)
        if not job.rows or len(job.inputs) != 1:
            alone.append(index)
            continue
        if type(value) is JsonTensor:
            layout: Hashable = None if value.shape is None else (value.shape[1:], value.dtype)
        else:
            layout = ("array", value.dtype.str, value.shape[1:])  # type: ignore[union-attr,index]
        found = layouts.get(layout)
        if found is None:
            layouts[layout] = [index]
        else:
            found.append(index)
    blocks: list[Block] = []
    for layout, indexes in layouts.items():
        values: list[Any] = [jobs[i].inputs[spec.name] for i in indexes]
        is_array = type(layout) is tuple and layout[0] == "array"
        merged = _merge_layout(dataplane, served, values, arrays=is_array)
        if merged is None:
            alone += indexes
        else:
            blocks.append((indexes, [jobs[i].rows for i in indexes], {spec.name: merged}))
    return blocks, alone


def _merge_layout(
    dataplane: DataPlane, served: ServedModel, values: list[Any], *, arrays: bool
) -> np.ndarray | None:
    """One layout's values of the version's one input as one checked array; None: check each alone."""
    settings = dataplane.settings
    spec = served.signature.inputs[0]
    if not arrays:
        return merge_json(values, spec, max_rows=settings.max_batch_rows,
                          allow_non_finite=settings.allow_non_finite)
    merged = values[0] if len(values) == 1 else np.concatenate(values)
    try:  # the rows limit is each request's, checked when it was taken (merge_key)
        return validate_inputs({spec.name: merged}, served.signature, max_batch_rows=max(
            settings.max_batch_rows, len(merged)), allow_non_finite=settings.allow_non_finite)[spec.name]
    except ShipyardError:
        return None


def _rows(arrays: dict[str, np.ndarray]) -> int:
    first = next(iter(arrays.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 0


def _merged(blocks: list[Block]) -> Block:
    if len(blocks) == 1:
        return blocks[0]
    names = list(blocks[0][2])
    return ([i for block in blocks for i in block[0]], [r for block in blocks for r in block[1]],
            {name: np.concatenate([block[2][name] for block in blocks]) for name in names})


def _check_alone(dataplane: DataPlane, served: ServedModel, job: InferenceRequest) -> dict[str, np.ndarray]:
    """One job's inputs as checked arrays for ``served``, or the refusal that names what is wrong."""
    settings = dataplane.settings
    specs = {spec.name: spec for spec in served.signature.inputs}
    arrays: dict[str, np.ndarray] = {}
    inputs = job.inputs if served.text is None else tokenized(served.text, job)
    for name, value in inputs.items():
        if type(value) is JsonTensor:
            spec = specs.get(name)
            # An input the version does not take: validate_inputs names it with the others.
            arrays[name] = np.zeros(0) if spec is None else to_array(
                value, spec, max_rows=settings.max_batch_rows, allow_non_finite=settings.allow_non_finite)
        else:
            arrays[name] = value  # type: ignore[assignment]
    return validate_inputs(arrays, served.signature, max_batch_rows=settings.max_batch_rows,
                           allow_non_finite=settings.allow_non_finite)


def tokenized(text: TextEncoder, job: InferenceRequest) -> dict[str, Input]:
    """``job``'s inputs with its raw text (a list of strings, under the model's input or ``text``) as
    the token ids the version's tokenizer makes of it; ``job.truncated`` says which texts were cut."""
    name = text.input if text.input in job.inputs else TEXT_INPUT
    texts = _texts(job.inputs.get(name))
    if texts is None:
        return job.inputs
    ids, job.truncated = text.encode(texts)
    return {**{key: value for key, value in job.inputs.items() if key != name}, text.input: ids}


#: What a text model's raw text may also be called in a request (OIP v2's input name, for example).
TEXT_INPUT = "text"


def _texts(value: Input | None) -> list[str] | None:
    """``value`` as a list of texts, if it is one (JSON strings, or an array of str); None otherwise."""
    if isinstance(value, JsonTensor):
        if type(value.values) is not list or (value.shape is not None and len(value.shape) > 1):
            return None
        values: list[Any] = value.values
    elif isinstance(value, np.ndarray) and value.dtype.kind == "O" and value.ndim == 1:
        values = value.tolist()
    else:
        return None
    strings = sum(type(item) is str for item in values)
    if strings and strings < len(values):
        raise InvalidInput("the text model's input mixes texts with other values: send a list of strings")
    return values if strings else None


def _slices(arrays: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Each job's rows of the merged ``arrays``."""
    found = []
    start = 0
    for count in rows:
        end = start + count
        found.append({name: value[start:end] for name, value in arrays.items()})
        start = end
    return found


def _run_part(
    dataplane: DataPlane, served: ServedModel, counted: VersionMetrics, jobs: list[InferenceRequest],
    part: tuple[list[int], list[int], dict[str, np.ndarray]], results: list[Any], *, reserved: bool,
) -> int:
    """One runtime call for the jobs of ``part`` (their inputs merged), the count answered and logged;
    a merged call that fails, or whose outputs do not follow the batch, is run again job by job."""
    indexes, rows, arrays = part
    try:
        outputs = _call(served, counted, arrays, len(indexes))
        pieces = _split(outputs, rows) if len(indexes) > 1 else [outputs]
    except Exception as exc:
        if len(indexes) > 1:
            if isinstance(exc, UnsplittableOutput):
                served.batcher.merges = False
                log.warning("%s; requests for %s version %s are no longer merged", exc, served.name,
                            served.version)
            else:
                log.info("a merged call of %d requests failed (%s); running each alone", len(indexes), exc)
            return sum(
                _run_part(dataplane, served, counted, jobs, ([index], [count], alone), results,
                          reserved=reserved)
                for index, count, alone in zip(indexes, rows, _slices(arrays, rows), strict=True))
        count_error(dataplane, served.name, "runtime_error", version=served.version)
        results[indexes[0]] = UpstreamError(
            f"model {served.name!r} version {served.version} failed on this input: {exc}")
        return 0
    return _answer(dataplane, served, counted, jobs, part, pieces, results, reserved=reserved)


def _call(served: ServedModel, counted: VersionMetrics, arrays: dict[str, np.ndarray],
          requests: int) -> dict[str, np.ndarray]:
    """One runtime call, its cost measured (loop or pool) and its batch counted."""
    counted.batch_requests.observe(requests)
    counted.batch_rows.observe(_rows(arrays))
    answered = served.cost.timed(served.runtime.predict, arrays)
    return {name: np.asarray(answered[name]) for name in served.signature.output_names}


class UnsplittableOutput(Exception):
    """A merged call answered an output whose first dimension is not the batch."""


def _split(outputs: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    total = sum(rows)
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != total:
            raise UnsplittableOutput(
                f"output {name!r} has shape {list(value.shape)} for a merged call of {total} rows")
    return _slices(outputs, rows)


def _answer(
    dataplane: DataPlane, served: ServedModel, counted: VersionMetrics, jobs: list[InferenceRequest],
    part: tuple[list[int], list[int], dict[str, np.ndarray]], pieces: list[dict[str, np.ndarray]],
    results: list[Any], *, reserved: bool,
) -> int:
    """Log, count and answer a part's jobs (one record each), copy them to the shadow: the count answered."""
    indexes, rows, arrays = part
    answered, created = time.perf_counter(), time.time()
    first_output = served.signature.outputs[0].name
    single = next(iter(arrays.values())) if len(arrays) == 1 else None
    shadow = shadow_of(dataplane.models, served)
    model, version, role = served.name, served.version, served.alias
    records: list[dict[str, Any]] = []
    latencies: list[float] = []
    copies: list[tuple[str, dict[str, np.ndarray]]] = []
    start = 0
    for position, index in enumerate(indexes):
        job, end = jobs[index], start + rows[position]
        request_id = job.request_id or new_request_id()  # the shadow's row shares it
        if single is not None:
            logged: Any = loggable(single[start:end])
        else:
            logged = {name: loggable(value[start:end]) for name, value in arrays.items()}
        latency_s = answered - job.started
        latencies.append(latency_s)
        # A row of the predictions table; created_at: when it was answered (seconds since the epoch,
        # read as UTC when written), not when the shipper got to it.
        records.append({"request_id": request_id, "model": model, "version": version, "role": role,
                        "inputs": logged, "outputs": loggable(pieces[position][first_output]),
                        "latency_ms": latency_s * 1000, "created_at": created})
        if shadow is not None:
            copies.append((request_id, {name: value[start:end] for name, value in arrays.items()}))
        start = end
    prediction_log = dataplane.prediction_log
    try:
        if reserved:
            prediction_log.append_reserved(records)
        else:
            for record in records:  # waits for room while the log is full
                prediction_log.append(record)
    except ShipyardError as exc:  # shutting down: refused, so nothing answered goes unlogged
        for index in indexes:
            results[index] = exc
        return 0
    counted.requests.inc(len(indexes))
    counted.rows.inc(start)
    observe = counted.latency.observe
    for latency_s in latencies:
        observe(latency_s)
    signature = served.signature
    for position, index in enumerate(indexes):
        results[index] = Inference(model, version, signature, pieces[position], jobs[index].truncated)
    if shadow is not None:
        _mirror(dataplane, shadow, copies)
    return len(indexes)


def _mirror(
    dataplane: DataPlane, shadow: ServedModel, copies: list[tuple[str, dict[str, np.ndarray]]]
) -> None:
    """Copies of the answered requests for the model's shadow version: run in its pool, never waited for."""

    def run(target: ServedModel) -> None:
        jobs = [InferenceRequest(served=target, inputs=dict(inputs), reply=_ignore, request_id=request_id)
                for request_id, inputs in copies]
        dataplane.metrics.version(target.name, target.version).in_flight.inc(len(jobs))
        for result in answer_group(dataplane, jobs, inline=False) or []:
            if isinstance(result, Exception):
                raise result

    dataplane.shadow.submit(shadow, run, count=len(copies))


def _ignore(result: Any) -> None:
    """A shadow copy's answer: never returned (its row is in the prediction log)."""
