"""Adaptive batching: concurrent requests merged into one runtime call, each caller getting its own rows.

The unit tests drive :class:`BatchingRuntime` with a recording runtime whose calls wait at a gate
the test opens, so which requests are queued together is decided by the test, never by timing.
The last test serves a real model over HTTP with batching on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.serving.batching.adaptive import BatchingRuntime
from services.serving.core.follower import with_batching
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


def rows_for(caller: int, count: int, width: int = 2) -> np.ndarray:
    """Rows only ``caller`` sends: caller * 1000 + row index, then column offsets."""
    base = np.arange(count, dtype=np.float32)[:, None] + caller * 1000
    return base + np.arange(width, dtype=np.float32)[None, :] / 10


def check_own_rows(sent: np.ndarray, answer: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(answer["echo"], sent)
    np.testing.assert_allclose(answer["total"], sent.sum(axis=1), rtol=1e-6)


@contextmanager
def batcher(
    max_batch_size: int = 8, max_wait_s: float = 30.0
) -> Iterator[tuple[BatchingRuntime, RecordingRuntime]]:
    inner = RecordingRuntime()
    runtime = BatchingRuntime(inner, max_batch_size=max_batch_size, max_wait_s=max_wait_s, name="test")
    try:
        yield runtime, inner
    finally:
        inner.gate.set()
        runtime.close(timeout=30)


def run_concurrently(
    runtime: BatchingRuntime, inner: RecordingRuntime, requests: list[np.ndarray]
) -> list[Any]:
    """Send ``requests`` at once while the runtime is held busy; the answers (or errors), in order.

    The first request runs at once and waits at the closed gate; the others are sent then, and
    the gate opens only when all of them are queued, so they cannot help but be batched.
    """
    inner.gate.clear()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        futures = [pool.submit(runtime.predict, {"x": requests[0]})]
        wait_for(lambda: inner.entered == 1, timeout=30, what="the first request running")
        futures += [pool.submit(runtime.predict, {"x": rows}) for rows in requests[1:]]
        wait_for(lambda: runtime.queued >= len(requests) - 1, timeout=30, what="every request queued")
        inner.gate.set()
        results: list[Any] = []
        for future in futures:
            try:
                results.append(future.result(timeout=60))
            except Exception as exc:
                results.append(exc)
    return results


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
    with batcher(max_batch_size=64, max_wait_s=30) as (runtime, _inner):
        started = time.monotonic()
        for caller in range(20):
            check_own_rows(rows_for(caller, 1), runtime.predict({"x": rows_for(caller, 1)}))
        assert time.monotonic() - started < 10
        assert runtime.calls == 20 and runtime.queued == 0


def test_close_answers_every_queued_request_then_closes_the_runtime() -> None:
    inner = RecordingRuntime()
    runtime = BatchingRuntime(inner, max_batch_size=4, max_wait_s=30, name="test")
    inner.gate.clear()
    requests = [rows_for(caller, 1) for caller in range(10)]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        futures = [pool.submit(runtime.predict, {"x": rows}) for rows in requests]
        wait_for(lambda: runtime.queued >= len(requests) - 1, timeout=30, what="every request queued")
        closing = threading.Thread(target=runtime.close)
        closing.start()
        time.sleep(0.2)
        assert closing.is_alive() and not inner.closed  # waits for the queued requests
        inner.gate.set()
        for sent, future in zip(requests, futures, strict=True):
            check_own_rows(sent, future.result(timeout=60))
        closing.join(60)
    assert not closing.is_alive() and inner.closed
    assert not runtime._worker.is_alive()
    # After close, a straggler (a request that resolved the version just before a swap) still runs.
    check_own_rows(rows_for(99, 1), runtime.predict({"x": rows_for(99, 1)}))


def test_outputs_that_do_not_follow_the_batch_stop_merging() -> None:
    class Pooled(RecordingRuntime):
        def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            answer = super().predict(arrays)
            return {"echo": answer["echo"], "total": np.asarray([answer["total"].sum()])}

    inner = Pooled()
    runtime = BatchingRuntime(inner, max_batch_size=16, max_wait_s=30, name="test")
    try:
        requests = [rows_for(caller, 1) for caller in range(6)]
        results = run_concurrently(runtime, inner, requests)  # type: ignore[arg-type]
        for sent, answer in zip(requests, results, strict=True):
            np.testing.assert_allclose(answer["total"], [sent.sum()])  # each ran alone after all
        assert runtime.calls > len(requests) - 1 and not runtime._merging
    finally:
        inner.gate.set()
        runtime.close()


def test_rows_merged_by_the_caller_run_in_one_call_and_split_back() -> None:
    with batcher() as (runtime, inner):
        requests = [rows_for(caller, count) for caller, count in ((1, 2), (2, 1), (3, 3))]
        answers = runtime.predict_merged_now({"x": np.concatenate(requests)}, [2, 1, 3])
        assert answers is not None and inner.batches == [6] and runtime.inline_calls == 1
        for sent, answer in zip(requests, answers, strict=True):
            check_own_rows(sent, answer)
        with pytest.raises(RuntimeError, match="poisoned"):  # the caller then runs each alone
            runtime.predict_merged_now({"x": np.full((2, 2), POISON, dtype=np.float32)}, [1, 1])
        assert runtime.merges


def test_rows_merged_by_the_caller_whose_outputs_do_not_split_stop_merging() -> None:
    class Pooled(RecordingRuntime):
        def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            answer = super().predict(arrays)
            return {"echo": answer["echo"], "total": np.asarray([answer["total"].sum()])}

    runtime = BatchingRuntime(Pooled(), max_batch_size=16, max_wait_s=30, name="test")
    try:
        assert runtime.predict_merged_now({"x": rows_for(1, 3)}, [1, 2]) is None
        assert not runtime.merges
    finally:
        runtime.close()


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

    def wrap(name: str, signature: Signature = SIGNATURE, **changes: Any) -> Any:
        result = with_batching(loaded(signature), name=name, version="1",
                               policy=settings.model_copy(update=changes).batching_for(name), metrics=metrics)
        if isinstance(result.runtime, BatchingRuntime):
            result.runtime.close()
        return result.runtime

    small = wrap("small")
    assert isinstance(small, BatchingRuntime) and small.max_batch_size == 4
    assert small.signature == SIGNATURE and small.format == "onnx"
    assert not isinstance(wrap("off"), BatchingRuntime)
    assert not isinstance(wrap("other", batching=False), BatchingRuntime)
    fixed = Signature(inputs=(spec("x", 1, 4),), outputs=(spec("y", 1, 2),))
    assert not isinstance(wrap("other", fixed), BatchingRuntime)


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
