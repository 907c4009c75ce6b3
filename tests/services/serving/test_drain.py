"""SIGTERM on a real serving process: not ready first, requests in flight answered, exit 0, all logged.

The model is genuinely slow: a chain of 1024x1024 MatMul+Tanh layers (the weights made in the
graph by ConstantOfShape, so the file stays a few KB), about a second per 1024-row request on
two cores. Requests are in flight when SIGTERM arrives because the test waits for serving's own
in-flight gauge to count them, not because of any timing.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import select

from shipyard_common.db import Database
from shipyard_common.records import PredictionRecord
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import IR_VERSION, ModelFactory, unique_name
from tests.services.serving.processes import serving_process
from tests.services.serving.support import metric
from tests.support import auth, free_port, wait_for

FEATURES = 16


def slow_model(*, width: int = 1024, layers: int = 160) -> bytes:
    """input [batch, 16] -> ``layers`` x tanh(h @ W) with W [width, width] -> score [batch, 1]."""

    def constant(name: str, value: float) -> Any:
        return helper.make_tensor(name, TensorProto.FLOAT, [1], [value])

    nodes = [
        helper.make_node("ConstantOfShape", ["w0_shape"], ["W0"], value=constant("v0", 1.0 / FEATURES)),
        helper.make_node("ConstantOfShape", ["w_shape"], ["W"], value=constant("v", 1.0 / width)),
        helper.make_node("MatMul", ["input", "W0"], ["h0"]),
    ]
    for index in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{index}", "W"], [f"m{index}"]))
        nodes.append(helper.make_node("Tanh", [f"m{index}"], [f"h{index + 1}"]))
    nodes.append(helper.make_node("ReduceSum", [f"h{layers}", "axes"], ["score"], keepdims=1))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        [
            numpy_helper.from_array(np.array([FEATURES, width], dtype=np.int64), "w0_shape"),
            numpy_helper.from_array(np.array([width, width], dtype=np.int64), "w_shape"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_sigterm_drains_then_exits_cleanly(
    isolated_platform: PlatformSettings, postgres_url: str, model_factory: ModelFactory, tmp_path: Path
) -> None:
    name = unique_name("drain")
    model_factory.register(name, slow_model())
    model_factory.set_production(name, "1")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    platform = isolated_platform.model_copy(update={"db_url": postgres_url, "serving_url": base})
    log_path = tmp_path / "serving.log"
    with serving_process(platform, port=port, log_path=log_path, drain_grace_s="1.5",
                         shutdown_timeout_s="120", reconcile_interval_s="300") as process:
        _drain_while_requests_are_in_flight(process, base, name, postgres_url, log_path)


def _drain_while_requests_are_in_flight(
    process: subprocess.Popen[bytes], base: str, name: str, db_url: str, log_path: Path
) -> None:
    def ready() -> bool:
        assert process.poll() is None, log_path.read_text()[-3000:]
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200

    wait_for(ready, timeout=180, what="serving ready")
    url = f"{base}/v1/models/{name}/predict"
    rows = np.random.default_rng(0).random((1024, FEATURES)).round(3).tolist()
    answers: dict[str, tuple[int, float]] = {}
    lock = threading.Lock()

    def send(request_id: str, inputs: list[list[float]]) -> None:
        response = httpx.post(url, json={"inputs": inputs}, timeout=180,
                              headers={**auth("viewer"), "X-Request-ID": request_id})
        with lock:
            answers[request_id] = (response.status_code, time.monotonic())

    slow = [uuid.uuid4().hex for _ in range(4)]
    threads = [threading.Thread(target=send, args=(rid, rows)) for rid in slow]
    for thread in threads:
        thread.start()
    wait_for(lambda: metric(base, "shipyard_prediction_in_flight", {"model": name}) == len(slow),
             timeout=60, interval=0.02, what="the slow requests in flight")
    with lock:
        assert not answers, "a slow request finished before SIGTERM: make the model slower"

    process.send_signal(signal.SIGTERM)
    terminated = time.monotonic()
    not_ready = wait_for(
        lambda: (r := httpx.get(f"{base}/readyz", timeout=5)).status_code == 503 and r, timeout=10,
        interval=0.02, what="readiness to turn 503",
    )
    assert process.poll() is None  # still running: not ready came first
    assert not_ready.json()["checks"]["service"] == "shutting down"
    assert httpx.get(f"{base}/v2/health/ready", timeout=5).status_code == 503
    # Still serving during the grace: a request sent now is answered too.
    late = uuid.uuid4().hex
    late_thread = threading.Thread(target=send, args=(late, rows[:1]))
    late_thread.start()

    # Until uvicorn stops accepting (the grace is over), watch the slow requests: some must still be
    # running then, or this test would not see uvicorn wait for them.
    in_flight_at_grace_end = _last_in_flight(base, name, until=terminated + 1.5)
    assert in_flight_at_grace_end > 0, "every slow request finished within the grace: make the model slower"

    for thread in [*threads, late_thread]:
        thread.join(180)
    assert process.wait(180) == 0, log_path.read_text()[-3000:]
    exited = time.monotonic()
    assert {rid: answers[rid][0] for rid in [*slow, late]} == dict.fromkeys([*slow, late], 200)
    # Those still running when the grace ended and uvicorn stopped accepting: it waited for them.
    last = max(at for _, at in answers.values())
    assert terminated + 1.5 < last <= exited
    log_text = log_path.read_text()
    assert "draining for 1.5s" in log_text and "Shutting down" in log_text

    database = Database(db_url)
    try:
        with database.session() as session:
            logged = session.scalars(
                select(PredictionRecord.request_id).where(PredictionRecord.model == name)
            ).all()
    finally:
        database.dispose()
    assert sorted(logged) == sorted([*slow, late])


def _last_in_flight(base: str, name: str, *, until: float) -> float:
    """The model's in-flight requests as last read before ``until`` or before the server stopped answering."""
    last = -1.0
    while time.monotonic() < until:
        try:
            last = metric(base, "shipyard_prediction_in_flight", {"model": name})
        except httpx.HTTPError:
            break  # no longer accepting: the grace is over
        time.sleep(0.02)
    return last
