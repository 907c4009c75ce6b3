"""Adaptive batching: concurrent requests merged into one runtime call, each caller getting its own rows.

The unit tests submit requests to a real data plane (its batcher, checks, log and metrics) on an
event loop, with a recording runtime whose calls wait at a gate the test opens, so which requests
wait together is decided by the test, never by timing. The last test serves a real model over HTTP
with batching on.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.serving.api import ours as ours_api
from services.serving.api import tfserving as tfserving_api
from services.serving.api import v2 as v2_api
from services.serving.api.http import ProtocolResponse
from services.serving.core.dataplane import DataPlane, infer, submit
from services.serving.core.leases import retire_runtime
from services.serving.core.loaded import LoadedModels, ServedModel
from services.serving.core.metrics import ServingMetrics
from services.serving.core.requests import Inference, InferenceRequest
from services.serving.runtimes.base import Signature, TensorSpec
from services.serving.settings import BatchingOverride, BatchingPolicy, ServingSettings
from shipyard_common.errors import UpstreamError
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, run_directly, unique_name
from tests.services.serving.support import metric, serving
from tests.services.serving.test_codecs import MemoryLog
from tests.support import auth

POISON = -1.0


def spec(name: str, *shape: int | None) -> TensorSpec:
    return TensorSpec(name=name, dtype=np.dtype("float32"), shape=tuple(shape))


SIGNATURE = Signature(
    inputs=(spec("x", None, None),), outputs=(spec("echo", None, None), spec("total", None))
)


class RecordingRuntime:
    """Answers ``echo`` (the rows themselves) and ``total`` (each row's sum): both identify the row.

    Every call waits until ``gate`` is open and records its row count and thread; a row holding
    ``POISON`` makes the whole call fail, as a value the model cannot take would.
    """

    format = "onnx"
    platform = "onnxruntime_onnx"
    signature = SIGNATURE

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[int] = []
        self.threads: set[int] = set()
        self.entered = 0
        self.lock = threading.Lock()
        self.closed = threading.Event()

    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            self.entered += 1
        assert self.gate.wait(60), "the test never opened the gate"
        x = arrays["x"]
        with self.lock:
            self.batches.append(int(x.shape[0]))
            self.threads.add(threading.get_ident())
        if (x == POISON).any():
            raise RuntimeError("poisoned row")
        return {"echo": x.copy(), "total": x.sum(axis=1)}

    def close(self) -> None:
        self.closed.set()


def rows_for(caller: int, count: int, width: int = 2) -> np.ndarray:
    """Rows only ``caller`` sends: caller * 1000 + row index, then column offsets."""
    base = np.arange(count, dtype=np.float32)[:, None] + caller * 1000
    return base + np.arange(width, dtype=np.float32)[None, :] / 10


def check_own_rows(sent: np.ndarray, answer: Any) -> None:
    assert isinstance(answer, Inference), answer
    np.testing.assert_array_equal(answer.outputs["echo"], sent)
    np.testing.assert_allclose(answer.outputs["total"], sent.sum(axis=1), rtol=1e-6)


def served_model(runtime: Any, *, version: str = "1", max_batch_size: int = 8, max_wait_s: float = 30.0,
                 cheap: bool = False, signature: Signature = SIGNATURE) -> ServedModel:
    served = ServedModel(name="m", version=version, runtime=runtime, signature=signature,
                         loaded_at=datetime.now(UTC),
                         batching=BatchingPolicy(enabled=True, max_batch_size=max_batch_size,
                                                 max_wait_s=max_wait_s))
    for _ in range(5):  # measured: cheap calls run on the event loop, costly ones in the pool
        served.cost.observe(0.00001 if cheap else 0.5)
    return served


def plane_for(served: ServedModel) -> DataPlane:
    metrics = ServingMetrics(CollectorRegistry())
    models = LoadedModels(metrics)
    models.set_target(served.name, served.version)
    models.install(served)
    models.reconciled.set()
    log: Any = MemoryLog()
    return DataPlane(settings=ServingSettings(max_batch_rows=64), models=models, prediction_log=log,
                     metrics=metrics)


async def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def run_concurrently(plane: DataPlane, inner: RecordingRuntime, requests: list[np.ndarray]) -> list[Any]:
    """Submit ``requests`` while the runtime is held busy; the answers (or errors), in order.

    The first request runs at once and waits at the closed gate; the others are submitted then,
    and the gate opens only when all of them wait, so they cannot help but be batched.
    """
    served = plane.models.served("m")
    results: list[Any] = [None] * len(requests)

    def send(index: int) -> None:
        def reply(result: Any) -> None:
            results[index] = result
        submit(plane, InferenceRequest(served=served, inputs={"x": requests[index]}, reply=reply))

    async def main() -> None:
        inner.gate.clear()
        send(0)
        await until(lambda: inner.entered == 1, "the first request running")
        for index in range(1, len(requests)):
            send(index)
        await asyncio.sleep(0.05)
        inner.gate.set()
        await until(lambda: all(result is not None for result in results), "every answer", timeout=60)

    asyncio.run(main())
    return results


def test_concurrent_callers_share_runtime_calls_and_each_gets_its_own_rows() -> None:
    inner = RecordingRuntime()
    plane = plane_for(served_model(inner, max_batch_size=8))
    requests = [rows_for(caller, 1 + caller % 3) for caller in range(40)]
    results = run_concurrently(plane, inner, requests)
    for sent, answer in zip(requests, results, strict=True):
        check_own_rows(sent, answer)
    assert len(inner.batches) < len(requests) / 2, inner.batches
    # No call beyond max_batch_size rows, and every row answered exactly once.
    assert max(inner.batches) <= 8 and sum(inner.batches) == sum(len(r) for r in requests)
    assert max(inner.batches) > 3  # merged: no single request has more than 3 rows
    # Each request logged on its own: its rows, its outputs.
    records = plane.prediction_log.records  # type: ignore[attr-defined]
    assert len(records) == len(requests)
    for record in records:
        caller = int(record["inputs"][0][0] // 1000)
        np.testing.assert_array_equal(record["inputs"], requests[caller])


def test_a_request_larger_than_the_batch_runs_alone_and_unsplit() -> None:
    inner = RecordingRuntime()
    plane = plane_for(served_model(inner, max_batch_size=4))
    requests = [rows_for(0, 1), rows_for(1, 9), rows_for(2, 2), rows_for(3, 2)]
    results = run_concurrently(plane, inner, requests)
    for sent, answer in zip(requests, results, strict=True):
        check_own_rows(sent, answer)
    assert 9 in inner.batches and all(rows <= 4 for rows in inner.batches if rows != 9)


def test_requests_of_other_shapes_never_share_a_call() -> None:
    inner = RecordingRuntime()
    plane = plane_for(served_model(inner, max_batch_size=64))
    requests = [rows_for(caller, 2, width=2 + caller % 2) for caller in range(10)]
    results = run_concurrently(plane, inner, requests)
    for sent, answer in zip(requests, results, strict=True):
        check_own_rows(sent, answer)  # np.concatenate of widths 2 and 3 would have failed
    assert len(inner.batches) < len(requests)


def test_a_runtime_error_fails_only_the_request_that_caused_it() -> None:
    inner = RecordingRuntime()
    plane = plane_for(served_model(inner, max_batch_size=64))
    requests = [rows_for(caller, 2) for caller in range(12)]
    requests[5] = np.asarray([[1.0, POISON]], dtype=np.float32)
    results = run_concurrently(plane, inner, requests)
    assert isinstance(results[5], UpstreamError) and "poisoned" in results[5].message
    for index, (sent, answer) in enumerate(zip(requests, results, strict=True)):
        if index != 5:
            check_own_rows(sent, answer)
    # The first ran alone; the merged call of the other 11 failed, then each of them ran alone.
    assert sorted(inner.batches) == sorted([2, 2 * 10 + 1, 1] + [2] * 10)
    assert len(plane.prediction_log.records) == 11  # type: ignore[attr-defined]  # not the refused one


def test_an_idle_version_runs_a_request_at_once() -> None:
    # A 30 s wait that is never waited: nothing else is running, so nothing is worth waiting for.
    inner = RecordingRuntime()
    served = served_model(inner, max_batch_size=64, max_wait_s=30)
    plane = plane_for(served)

    async def main() -> None:
        for caller in range(20):
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            submit(plane, InferenceRequest(served=served, inputs={"x": rows_for(caller, 1)},
                                           reply=future.set_result))
            check_own_rows(rows_for(caller, 1), await asyncio.wait_for(future, 10))

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 10
    assert len(inner.batches) == 20 and served.batcher.merged == 0 and served.batcher.pooled == 20


def test_requests_waiting_for_a_retired_version_are_answered_by_its_successor() -> None:
    old, new = RecordingRuntime(), RecordingRuntime()
    first = served_model(old, max_batch_size=64)
    plane = plane_for(first)
    requests = [rows_for(caller, 1) for caller in range(10)]

    def swap() -> None:  # while the first request runs on the old version and nine wait
        plane.models.install(served_model(new, version="2", max_batch_size=64))
        retire_runtime(first.runtime, first.lease, grace_s=0)  # no grace: new requests are turned away

    old.gate.clear()
    results: list[Any] = [None] * len(requests)

    async def main() -> None:
        for index, rows in enumerate(requests):
            def reply(result: Any, index: int = index) -> None:
                results[index] = result
            submit(plane, InferenceRequest(served=first, inputs={"x": rows}, reply=reply))
            if index == 0:
                await until(lambda: old.entered == 1, "the first request running")
        swap()
        await until(lambda: first.lease._retired, "the old version retiring")
        old.gate.set()
        await until(lambda: all(result is not None for result in results), "every answer", timeout=60)

    asyncio.run(main())
    for sent, answer in zip(requests, results, strict=True):
        check_own_rows(sent, answer)
    assert results[0].version == "1" and {answer.version for answer in results[1:]} == {"2"}
    assert old.closed.wait(30) and not new.closed.is_set()  # closed once its last request was done


def test_outputs_that_do_not_follow_the_batch_stop_merging() -> None:
    class Pooled(RecordingRuntime):
        def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            answer = super().predict(arrays)
            return {"echo": answer["echo"], "total": np.asarray([answer["total"].sum()])}

    inner = Pooled()
    served = served_model(inner, max_batch_size=16)
    requests = [rows_for(caller, 1) for caller in range(6)]
    results = run_concurrently(plane_for(served), inner, requests)
    for sent, answer in zip(requests, results, strict=True):
        np.testing.assert_allclose(answer.outputs["total"], [sent.sum()])  # each ran alone after all
    assert len(inner.batches) > len(requests) - 1 and not served.batcher.merges


def test_cheap_requests_read_in_one_loop_iteration_share_a_call_on_the_loop() -> None:
    inner = RecordingRuntime()
    served = served_model(inner, max_batch_size=64, cheap=True)
    plane = plane_for(served)
    requests = [rows_for(caller, 1 + caller % 2) for caller in range(12)]
    results: list[Any] = [None] * len(requests)

    def burst(indexes: range) -> None:  # what one loop iteration's reads submit
        for index in indexes:
            def reply(result: Any, index: int = index) -> None:
                results[index] = result
            submit(plane, InferenceRequest(served=served, inputs={"x": requests[index]}, reply=reply))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(burst, range(6))
        await until(lambda: all(result is not None for result in results[:6]), "the first burst")
        loop.call_soon(burst, range(6, 12))
        await until(lambda: all(result is not None for result in results), "the second burst")
        return threading.get_ident()  # type: ignore[return-value]

    loop_thread = asyncio.run(main())
    for sent, answer in zip(requests, results, strict=True):
        check_own_rows(sent, answer)
    # Idle: the first answered at once, the other five together; busy since: all six together.
    rows = [len(r) for r in requests]
    assert inner.batches == [rows[0], sum(rows[1:6]), sum(rows[6:])]
    assert inner.threads == {loop_thread} and served.batcher.pooled == 0


def test_every_protocols_requests_share_one_call() -> None:
    inner = RecordingRuntime()
    served = served_model(inner, max_batch_size=64, cheap=True,
                          signature=Signature(inputs=(spec("x", None, 2),),
                                              outputs=(spec("echo", None, 2), spec("total", None))))
    plane = plane_for(served)
    answers: list[ProtocolResponse] = []
    rows = rows_for(7, 1).tolist()
    raw = np.asarray(rows, dtype="<f4").tobytes()
    binary = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()

    def burst() -> None:
        started = time.perf_counter()
        for _ in range(2):
            ours_api.predict(plane, name="m", inputs=rows, request_id=None, started=started,
                             reply=answers.append)
            v2_api.infer(plane, name="m", version=None, started=started, reply=answers.append,
                         header_length=None, request_id=None,
                         body=json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                                                      "data": rows[0]}]}).encode())
            v2_api.infer(plane, name="m", version=None, body=binary + raw, started=started,
                         header_length=str(len(binary)), request_id=None, reply=answers.append)
            tfserving_api.predict(plane, name="m", version=None, label=None, request_id=None, started=started,
                                  body=json.dumps({"instances": rows}).encode(), reply=answers.append)

    async def main() -> None:
        asyncio.get_running_loop().call_soon(burst)
        await until(lambda: len(answers) == 8, "every answer")

    asyncio.run(main())
    assert [status for status, _, _ in answers] == [200] * 8, answers
    # The first answered at once (idle); the other seven, of four protocols, in one call.
    assert inner.batches == [1, 7] and served.batcher.merged == 7


def test_policy_per_model_and_models_without_a_free_batch_dimension() -> None:
    settings = ServingSettings(
        max_batch_size=32, max_batch_wait_ms=3,
        batching_overrides={"small": BatchingOverride(max_batch_size=4),
                            "off": BatchingOverride(batching=False)},
    )
    assert settings.batching_for("small").max_batch_size == 4
    assert settings.batching_for("small").max_wait_s == pytest.approx(0.003)
    assert settings.batching_for("other").max_batch_size == 32

    def batcher(name: str, signature: Signature = SIGNATURE, **changes: Any) -> Any:
        return ServedModel(name=name, version="1", runtime=RecordingRuntime(),  # type: ignore[arg-type]
                           signature=signature, loaded_at=datetime.now(UTC),
                           batching=settings.model_copy(update=changes).batching_for(name)).batcher

    small = batcher("small")
    assert small.merges and small.max_batch_size == 4 and small.max_wait_s == pytest.approx(0.003)
    assert not batcher("off").merges
    assert not batcher("other", batching=False).merges
    fixed = Signature(inputs=(spec("x", 1, 4),), outputs=(spec("y", 1, 2),))
    assert not batcher("other", fixed).merges


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


def test_a_caller_that_left_is_not_answered_and_the_others_are(caplog: pytest.LogCaptureFixture) -> None:
    inner = RecordingRuntime()
    served = served_model(inner, max_batch_size=64)
    plane = plane_for(served)

    async def main() -> list[Any]:
        inner.gate.clear()
        calls = [asyncio.ensure_future(infer(plane, served=served, inputs={"x": rows_for(caller, 1)}))
                 for caller in range(4)]
        await until(lambda: inner.entered == 1, "the first request running")
        calls[1].cancel()  # a client that went away while its request waited
        await asyncio.sleep(0.05)
        inner.gate.set()
        return await asyncio.gather(*calls, return_exceptions=True)

    with caplog.at_level("WARNING", logger="shipyard.serving.batching"):
        results = asyncio.run(main())
    assert isinstance(results[1], asyncio.CancelledError)
    for caller in (0, 2, 3):
        check_own_rows(rows_for(caller, 1), results[caller])
    assert not [r for r in caller_records(caplog) if "could not deliver" in r]
    assert len(plane.prediction_log.records) == 4  # type: ignore[attr-defined]  # it ran, and was logged


def caller_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]
