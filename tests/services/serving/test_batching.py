"""Adaptive batching: concurrent requests merged into one runtime call, each caller getting its own rows.

The unit tests drive :class:`Batcher` with a recording runtime whose calls wait at a gate the test
opens, so which requests are queued together is decided by the test, never by timing: in the
thread pool (a costly model) and on the event loop (a cheap one, whose requests of one loop
iteration merge). The last test serves a real model over HTTP with batching on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.serving.batching.adaptive import Batcher, shape_key
from services.serving.batching.callcost import MIN_SAMPLES
from services.serving.core.follower import make_batcher
from services.serving.core.leases import Lease, retire_runtime
from services.serving.core.metrics import ServingMetrics
from services.serving.runtimes.base import Signature, TensorSpec
from services.serving.runtimes.loader import LoadedRuntime
from services.serving.settings import BatchingOverride, ServingSettings
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, run_directly, unique_name
from tests.services.serving.support import metric, serving
from tests.support import auth, wait_for

POISON = -1.0


def spec(name: str, *shape: int | None) -> TensorSpec:
    return TensorSpec(name=name, dtype=np.dtype("float32"), shape=tuple(shape))


SIGNATURE = Signature(
    inputs=(spec("x", None, None),), outputs=(spec("echo", None, None), spec("total", None))
)


class RecordingRuntime:
    """Answers ``echo`` (the rows themselves) and ``total`` (each row's sum): both identify the row.

    Every call waits until ``gate`` is open and records its row count; a row holding ``POISON``
    makes the whole call fail, as a value the model cannot take would.
    """

    format = "onnx"
    platform = "onnxruntime_onnx"
    signature = SIGNATURE

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[int] = []
        self.entered = 0
        self.lock = threading.Lock()
        self.closed = False

    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            self.entered += 1
        assert self.gate.wait(60), "the test never opened the gate"
        x = arrays["x"]
        with self.lock:
            self.batches.append(int(x.shape[0]))
        if (x == POISON).any():
            raise RuntimeError("poisoned row")
        return {"echo": x.copy(), "total": x.sum(axis=1)}

    def close(self) -> None:
        self.closed = True


@dataclass
class Request:
    """A request as the batcher holds it: its arrays, and the batcher (for :func:`outputs_only`)."""

    arrays: dict[str, np.ndarray]
    batcher: Batcher

    def shape(self) -> tuple[Hashable, int] | None:
        return shape_key(self.arrays)


def outputs_only(requests: list[Request], on_loop: bool) -> list[Any]:
    """The data plane's group handle reduced to its runtime call: each request's outputs or error."""
    return list(requests[0].batcher.outputs([request.arrays for request in requests]))


def ask(batcher: Batcher, rows: np.ndarray, pool: ThreadPoolExecutor) -> Coroutine[Any, Any, Any]:
    return batcher.run(Request({"x": rows}, batcher), handle=outputs_only, pool=pool)


def rows_for(caller: int, count: int, width: int = 2) -> np.ndarray:
    """Rows only ``caller`` sends: caller * 1000 + row index, then column offsets."""
    base = np.arange(count, dtype=np.float32)[:, None] + caller * 1000
    return base + np.arange(width, dtype=np.float32)[None, :] / 10


def check_own_rows(sent: np.ndarray, answer: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(answer["echo"], sent)
    np.testing.assert_allclose(answer["total"], sent.sum(axis=1), rtol=1e-6)


@contextmanager
def batcher(
    max_batch_size: int = 8, max_wait_s: float = 30.0, *, runtime: RecordingRuntime | None = None,
    on_loop: bool = False,
) -> Iterator[tuple[Batcher, RecordingRuntime]]:
    """A batcher whose calls run in a thread pool (a costly model), or on the loop (``on_loop``: cheap)."""
    inner = runtime or RecordingRuntime()
    made = Batcher(inner, max_batch_size=max_batch_size, max_wait_s=max_wait_s)
    if on_loop:
        made.cost.samples, made.cost.mean_s = MIN_SAMPLES, 0.0
        assert made.cost.cheap
    else:
        made.cost.remote = True  # never cheap: every call in the pool
    try:
        yield made, inner
    finally:
        inner.gate.set()


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def run_concurrently(batcher: Batcher, inner: RecordingRuntime, requests: list[np.ndarray]) -> list[Any]:
    """Send ``requests`` at once while the version is held busy; the answers (or errors), in order.

    The first request runs at once and waits at the closed gate; the others are sent then, and
    the gate opens only when all of them are queued, so they cannot help but be batched.
    """

    async def scenario(pool: ThreadPoolExecutor) -> list[Any]:
        inner.gate.clear()
        tasks = [asyncio.ensure_future(ask(batcher, requests[0], pool))]
        await eventually(lambda: inner.entered == 1, "the first request running")
        tasks += [asyncio.ensure_future(ask(batcher, rows, pool)) for rows in requests[1:]]
        await eventually(lambda: batcher.queued >= len(requests) - 1, "every request queued")
        inner.gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return asyncio.run(scenario(pool))


def test_concurrent_callers_share_runtime_calls_and_each_gets_its_own_rows() -> None:
    with batcher(max_batch_size=8) as (runtime, inner):
        requests = [rows_for(caller, 1 + caller % 3) for caller in range(40)]
        results = run_concurrently(runtime, inner, requests)
        for sent, answer in zip(requests, results, strict=True):
            check_own_rows(sent, answer)
        assert runtime.calls == len(inner.batches) < len(requests) / 2, inner.batches
        # No call beyond max_batch_size rows, and every row answered exactly once.
        assert max(inner.batches) <= 8 and sum(inner.batches) == sum(len(r) for r in requests)
        assert max(inner.batches) > 3  # merged: no single request has more than 3 rows


def test_a_request_larger_than_the_batch_runs_alone_and_unsplit() -> None:
    with batcher(max_batch_size=4) as (runtime, inner):
        requests = [rows_for(0, 1), rows_for(1, 9), rows_for(2, 2), rows_for(3, 2)]
        results = run_concurrently(runtime, inner, requests)
        for sent, answer in zip(requests, results, strict=True):
            check_own_rows(sent, answer)
        assert 9 in inner.batches and all(rows <= 4 for rows in inner.batches if rows != 9)


def test_requests_of_other_shapes_never_share_a_call() -> None:
    with batcher(max_batch_size=64) as (runtime, inner):
        requests = [rows_for(caller, 2, width=2 + caller % 2) for caller in range(10)]
        results = run_concurrently(runtime, inner, requests)
        for sent, answer in zip(requests, results, strict=True):
            check_own_rows(sent, answer)  # np.concatenate of widths 2 and 3 would have failed
        assert runtime.calls < len(requests)


def test_a_runtime_error_fails_only_the_request_that_caused_it() -> None:
    with batcher(max_batch_size=64) as (runtime, inner):
        requests = [rows_for(caller, 2) for caller in range(12)]
        requests[5] = np.asarray([[1.0, POISON]], dtype=np.float32)
        results = run_concurrently(runtime, inner, requests)
        assert isinstance(results[5], RuntimeError) and "poisoned" in str(results[5])
        for index, (sent, answer) in enumerate(zip(requests, results, strict=True)):
            if index != 5:
                check_own_rows(sent, answer)
        # The first ran alone; the merged call of the other 11 failed, then each of them ran alone.
        assert sorted(inner.batches) == sorted([2, 2 * 10 + 1, 1] + [2] * 10)


def test_an_idle_runtime_runs_a_request_at_once() -> None:
    # A 30 s wait that is never waited: nothing else is running, so nothing is worth waiting for.
    async def one_by_one(runtime: Batcher, pool: ThreadPoolExecutor) -> None:
        for caller in range(20):
            check_own_rows(rows_for(caller, 1), await ask(runtime, rows_for(caller, 1), pool))

    with batcher(max_batch_size=64, max_wait_s=30) as (runtime, _inner), ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        asyncio.run(one_by_one(runtime, pool))
        assert time.monotonic() - started < 10
        assert runtime.calls == 20 and runtime.queued == 0


def test_a_request_that_waited_its_longest_runs_beside_the_running_call() -> None:
    with batcher(max_batch_size=64, max_wait_s=0.05) as (runtime, inner), ThreadPoolExecutor(4) as pool:
        inner.gate.clear()

        async def scenario() -> list[Any]:
            first = asyncio.ensure_future(ask(runtime, rows_for(0, 1), pool))
            await eventually(lambda: inner.entered == 1, "the first request running")
            second = asyncio.ensure_future(ask(runtime, rows_for(1, 2), pool))
            # Not waiting for the first call to end: after 50 ms it runs beside it.
            await eventually(lambda: inner.entered == 2, "the second request running beside the first")
            inner.gate.set()
            return list(await asyncio.gather(first, second))

        first, second = asyncio.run(scenario())
        check_own_rows(rows_for(0, 1), first)
        check_own_rows(rows_for(1, 2), second)
        assert runtime.queued == 1 and sorted(inner.batches) == [1, 2]


def test_a_retired_version_is_closed_only_once_its_queued_requests_are_answered() -> None:
    inner = RecordingRuntime()
    lease = Lease()
    requests = [rows_for(caller, 1) for caller in range(10)]
    with batcher(max_batch_size=4, runtime=inner) as (runtime, _), ThreadPoolExecutor(4) as pool:

        async def request(rows: np.ndarray) -> dict[str, np.ndarray]:
            assert lease.acquire()  # as the data plane holds the version while it waits here
            try:
                return await ask(runtime, rows, pool)
            finally:
                lease.release()

        async def scenario() -> list[Any]:
            inner.gate.clear()
            tasks = [asyncio.ensure_future(request(rows)) for rows in requests]
            await eventually(lambda: runtime.queued >= len(requests) - 1, "every request queued")
            retire_runtime(inner, lease, grace_s=0)  # type: ignore[arg-type]
            await asyncio.sleep(0.2)
            assert not inner.closed  # waits for the queued requests
            inner.gate.set()
            return list(await asyncio.gather(*tasks))

        for sent, answer in zip(requests, asyncio.run(scenario()), strict=True):
            check_own_rows(sent, answer)
    wait_for(lambda: inner.closed, timeout=30, what="the runtime closed")


class Unsplittable(RecordingRuntime):
    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        answer = super().predict(arrays)
        return {"echo": answer["echo"], "total": np.asarray([answer["total"].sum()])}


def test_outputs_that_do_not_follow_the_batch_stop_merging() -> None:
    with batcher(max_batch_size=16, runtime=Unsplittable()) as (runtime, inner):
        requests = [rows_for(caller, 1) for caller in range(6)]
        results = run_concurrently(runtime, inner, requests)
        for sent, answer in zip(requests, results, strict=True):
            np.testing.assert_allclose(answer["total"], [sent.sum()])  # each ran alone after all
        assert runtime.calls > len(requests) - 1 and not runtime.merges


def on_the_loop(runtime: Batcher, batches: list[list[np.ndarray]]) -> list[list[Any]]:
    """Each batch's requests sent in one event-loop iteration, one batch after the other."""

    async def scenario(pool: ThreadPoolExecutor) -> list[list[Any]]:
        return [list(await asyncio.gather(*(ask(runtime, rows, pool) for rows in batch),
                                          return_exceptions=True)) for batch in batches]

    with ThreadPoolExecutor(1) as pool:
        return asyncio.run(scenario(pool))


def test_cheap_requests_of_one_loop_iteration_share_one_call_on_the_loop() -> None:
    with batcher(on_loop=True) as (runtime, inner):
        first = [rows_for(caller, count) for caller, count in ((1, 2), (2, 1), (3, 3), (4, 1))]
        busy = [rows_for(caller, count) for caller, count in ((5, 1), (6, 2))]
        poisoned = [rows_for(7, 1), np.asarray([[POISON, 1.0]], dtype=np.float32), rows_for(8, 2)]
        answers = on_the_loop(runtime, [first, busy, poisoned])
        for sent, answer in zip(first + busy, answers[0] + answers[1], strict=True):
            check_own_rows(sent, answer)
        # Idle: the first request ran at once, the three behind it at the iteration's end, together;
        # busy since: every request of an iteration waits for its end, then they share a call.
        assert inner.batches[:3] == [2, 5, 3]
        # A merged call that fails: each runs alone, and only the poisoned one fails.
        assert isinstance(answers[2][1], RuntimeError)
        check_own_rows(poisoned[0], answers[2][0])
        check_own_rows(poisoned[2], answers[2][2])
        assert inner.batches[3:] == [4, 1, 1, 2] and runtime.merges


def test_cheap_outputs_that_do_not_split_stop_merging() -> None:
    with batcher(on_loop=True, runtime=Unsplittable()) as (runtime, _inner):
        requests = [rows_for(caller, 1 + caller % 2) for caller in range(4)]
        (answers,) = on_the_loop(runtime, [requests])
        for sent, answer in zip(requests, answers, strict=True):
            np.testing.assert_allclose(answer["total"], [sent.sum()])
        assert not runtime.merges


def loaded(signature: Signature = SIGNATURE) -> LoadedRuntime:
    return LoadedRuntime(runtime=RecordingRuntime(), signature=signature)


def test_policy_per_model_and_models_without_a_free_batch_dimension() -> None:
    settings = ServingSettings(
        max_batch_size=32, max_batch_wait_ms=3,
        batching_overrides={"small": BatchingOverride(max_batch_size=4),
                            "off": BatchingOverride(batching=False)},
    )
    assert settings.batching_for("small").max_batch_size == 4
    assert settings.batching_for("small").max_wait_s == pytest.approx(0.003)
    assert settings.batching_for("other").max_batch_size == 32
    metrics = ServingMetrics(CollectorRegistry())

    def make(name: str, signature: Signature = SIGNATURE, **changes: Any) -> Batcher:
        return make_batcher(loaded(signature), name=name, version="1",
                            policy=settings.model_copy(update=changes).batching_for(name), metrics=metrics)

    small = make("small")
    assert small.merges and small.max_batch_size == 4 and small.max_wait_s == pytest.approx(0.003)
    assert small.runtime.signature == SIGNATURE
    assert not make("off").merges
    assert not make("other", batching=False).merges
    fixed = Signature(inputs=(spec("x", 1, 4),), outputs=(spec("y", 1, 2),))
    assert not make("other", fixed).merges


def test_settings_read_overrides_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = '{"m": {"max_batch_size": 8, "batching": true}}'
    monkeypatch.setenv("SHIPYARD_SERVING_BATCHING_OVERRIDES", overrides)
    monkeypatch.setenv("SHIPYARD_SERVING_MAX_BATCH_WAIT_MS", "7")
    policy = ServingSettings().batching_for("m")
    assert policy.enabled and policy.max_batch_size == 8 and policy.max_wait_s == pytest.approx(0.007)


def test_serving_with_batching_answers_concurrent_requests_each_with_its_own_rows(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    version = model_factory.register_classifier(unique_name("batch"), seed=3)
    model_factory.set_production(version.name, version.version)
    callers, per_caller = 8, 12

    def client(base: str, caller: int) -> Callable[[], None]:
        def run() -> None:
            with httpx.Client(timeout=60) as http:
                for index in range(per_caller):
                    rows = rows_for(caller * 100 + index, 1 + index % 3, width=4).tolist()
                    response = http.post(f"{base}/v1/models/{version.name}/predict", json={"inputs": rows},
                                         headers=auth("viewer"))
                    assert response.status_code == 200, response.text
                    expected = run_directly(version.model_bytes, rows)
                    np.testing.assert_allclose(response.json()["outputs"], expected, rtol=1e-5)
        return run

    with serving(isolated_platform, max_batch_size=16, max_batch_wait_ms=5) as base:
        with ThreadPoolExecutor(max_workers=callers) as pool:
            for future in [pool.submit(client(base, caller)) for caller in range(callers)]:
                future.result(timeout=120)
        labels = {"model": version.name, "version": "1"}
        answered = callers * per_caller
        assert metric(base, "shipyard_predictions_total", labels) == answered
        # Every request ran in exactly one runtime call (warm-up runs are not requests).
        assert metric(base, "shipyard_batch_requests_sum", labels) == answered
        calls = metric(base, "shipyard_batch_requests_count", labels)
        assert calls is not None and 1 <= calls <= answered
        rows = sum(1 + index % 3 for index in range(per_caller)) * callers
        assert metric(base, "shipyard_batch_rows_sum", labels) == rows
