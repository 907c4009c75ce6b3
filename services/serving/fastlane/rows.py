"""Our protocol's commonest request (rows of floats for a production version alone) in one pass.

For the fast lane (lane.py): :func:`predict_rows_now` answers one such request on the event loop,
:func:`predict_rows_merged` several that arrived together with one runtime call. The checks, log
records, metrics and answers are the data plane's (the same functions make them).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np
import orjson

from services.serving.batching.adaptive import BatchingRuntime
from services.serving.core.dataplane import DataPlane, Offload, log_record, loggable, run_logged
from services.serving.core.loaded import ServedModel
from services.serving.protocols.ours import answer_body, float_rows
from services.serving.runtimes.base import TensorSpec
from shipyard_common.errors import (
    ShipyardError,
)


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
    array = float_rows(inputs, spec.dtype, spec.shape[1], dots=dots)
    if array is None or not served.lease.acquire():
        return None
    try:
        counted = dataplane.metrics.version(name, served.version)
        in_flight = counted.in_flight
        in_flight.inc()
        try:
            outputs, _ = run_logged(dataplane, served, counted, {spec.name: array}, request_id=request_id,
                                     started=started, inline=True)
        except Offload:
            return None
        finally:
            in_flight.dec()
    finally:
        served.lease.release()
    first = outputs[served.signature.outputs[0].name]
    return orjson.dumps(answer_body(name, served.version, first)), served.version


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
    array = float_rows(rows, spec.dtype, spec.shape[1], dots=dots)
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
                records.append(log_record(served, request.request_id, array[start:end], loggable(first),
                                       latency_s * 1000, created))
                answers[index] = orjson.dumps(answer_body(name, version, first)), version
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
