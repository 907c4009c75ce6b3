"""The fast lane (services/serving/fastlane/lane.py) answers every predict route as FastAPI's routes do.

Two apps serve the same registered models, one with the fast lane and one without
(``fast_lane=False``: FastAPI's routes answer); each request, good or refused, goes to both over
real HTTP and the answers must agree: status, the headers that matter and the body. The fast
lane's app is warmed up first, so that its cheap model runs inline on the event loop; a second
pass compares a fast lane that runs every call in its thread pool.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np

from services.serving.fastlane.uvicorn_protocol import find_fast_lane
from tests.services.serving.support import ROWS, VIEWER
from tests.support import wait_for

JSON = {"Content-Type": "application/json"}
COMPARED_HEADERS = ("content-type", "x-model-version", "inference-header-content-length")


def v2_binary_body(rows: np.ndarray, request_id: str) -> tuple[bytes, dict[str, str]]:
    raw = rows.astype("<f4").tobytes()
    header = json.dumps({
        "id": request_id,
        "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


#: Cases the HTTP protocol leaves to the ASGI app: FastAPI's own 422s, and the app's body limit.
ASGI_ANSWERED = frozenset({
    "ours, no content type", "ours, not JSON", "ours, not JSON and no token", "ours, text/plain",
    "ours, long request id", "ours, no inputs", "ours, a list body", "ours, too large", "v2, too large",
})


def cases(name: str) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(what, path, body, headers): every protocol, answered and refused."""
    ours = f"/v1/models/{name}/predict"
    v2 = f"/v2/models/{name}/infer"
    tensor = {"name": "input", "shape": [3, 4], "datatype": "FP32", "data": ROWS}
    binary, binary_headers = v2_binary_body(np.asarray(ROWS, dtype=np.float32), "bin-1")
    dumps = json.dumps
    ok = {**VIEWER, **JSON}
    return [
        ("ours", ours, dumps({"inputs": ROWS}).encode(), {**VIEWER, **JSON}),
        ("ours, no content type", ours, dumps({"inputs": ROWS}).encode(), VIEWER),
        ("ours, request id", ours, dumps({"inputs": ROWS}).encode(), {**ok, "X-Request-ID": "r-1"}),
        ("ours, integers", ours, dumps({"inputs": [[1, 2, 3, 4]]}).encode(), {**VIEWER, **JSON}),
        ("ours, no token", ours, dumps({"inputs": ROWS}).encode(), JSON),
        ("ours, unknown token", ours, dumps({"inputs": ROWS}).encode(),
         {**JSON, "Authorization": "Bearer not-a-token"}),
        ("ours, x-api-token", ours, dumps({"inputs": ROWS}).encode(),
         {**JSON, "X-API-Token": VIEWER["Authorization"].split()[-1]}),
        ("ours, unknown model", f"/v1/models/nope-{name}/predict", dumps({"inputs": ROWS}).encode(),
         {**VIEWER, **JSON}),
        ("ours, a string", ours, dumps({"inputs": [[0.1, "a", 0.3, 0.4]]}).encode(), {**VIEWER, **JSON}),
        ("ours, a boolean", ours, dumps({"inputs": [[0.1, True, 0.3, 0.4]]}).encode(), {**VIEWER, **JSON}),
        ("ours, NaN", ours, b'{"inputs": [[0.1, NaN, 0.3, 0.4]]}', {**VIEWER, **JSON}),
        ("ours, short row", ours, dumps({"inputs": [[0.1, 0.2]]}).encode(), {**VIEWER, **JSON}),
        ("ours, a bare row", ours, dumps({"inputs": [0.1, 0.2, 0.3, 0.4]}).encode(), {**VIEWER, **JSON}),
        ("ours, too many rows", ours, dumps({"inputs": ROWS * 3}).encode(), {**VIEWER, **JSON}),
        ("ours, beyond float32", ours, dumps({"inputs": [[1e39, 0, 0, 0]]}).encode(), {**VIEWER, **JSON}),
        ("ours, no inputs", ours, dumps({"rows": ROWS}).encode(), {**VIEWER, **JSON}),
        ("ours, a list body", ours, dumps([ROWS]).encode(), {**VIEWER, **JSON}),
        ("ours, not JSON", ours, b"{nope", {**VIEWER, **JSON}),
        ("ours, not JSON and no token", ours, b"{nope", JSON),
        ("ours, text/plain", ours, dumps({"inputs": ROWS}).encode(),
         {**VIEWER, "Content-Type": "text/plain"}),
        ("ours, long request id", ours, dumps({"inputs": ROWS}).encode(),
         {**VIEWER, **JSON, "X-Request-ID": "x" * 65}),
        ("ours, too large", ours, dumps({"inputs": [[0.1, 0.2, 0.3, 0.4]] * 300}).encode(), ok),
        ("v2", v2, dumps({"id": "j-1", "inputs": [tensor]}).encode(), {**VIEWER, **JSON}),
        ("v2 version", f"/v2/models/{name}/versions/1/infer",
         dumps({"id": "j-2", "inputs": [tensor]}).encode(), ok),
        ("v2 binary", v2, binary, {**VIEWER, **binary_headers}),
        ("v2, no token", v2, dumps({"id": "j-3", "inputs": [tensor]}).encode(), JSON),
        ("v2, unknown model", f"/v2/models/nope-{name}/infer",
         dumps({"id": "j", "inputs": [tensor]}).encode(), ok),
        ("v2, unknown version", f"/v2/models/{name}/versions/9/infer",
         dumps({"id": "j", "inputs": [tensor]}).encode(), {**VIEWER, **JSON}),
        ("v2, bad datatype", v2, dumps({"id": "j", "inputs": [{**tensor, "datatype": "FP99"}]}).encode(),
         {**VIEWER, **JSON}),
        ("v2, compressed", v2, dumps({"id": "j", "inputs": [tensor]}).encode(),
         {**VIEWER, **JSON, "Content-Encoding": "gzip"}),
        ("v2, not JSON", v2, b"{nope", {**VIEWER, **JSON}),
        ("v2, too large", v2, dumps({"id": "j", "inputs": [{**tensor, "data": ROWS * 100}]}).encode(),
         {**VIEWER, **JSON}),
        ("tf rows", f"/v1/models/{name}:predict", dumps({"instances": ROWS}).encode(), {**VIEWER, **JSON}),
        ("tf columns", f"/v1/models/{name}:predict", dumps({"inputs": ROWS}).encode(), {**VIEWER, **JSON}),
        ("tf version", f"/v1/models/{name}/versions/1:predict", dumps({"instances": ROWS}).encode(),
         {**VIEWER, **JSON}),
        ("tf label", f"/v1/models/{name}/labels/production:predict", dumps({"instances": ROWS}).encode(),
         {**VIEWER, **JSON}),
        ("tf, unknown label", f"/v1/models/{name}/labels/canary:predict", dumps({"instances": ROWS}).encode(),
         {**VIEWER, **JSON}),
        ("tf, no token", f"/v1/models/{name}:predict", dumps({"instances": ROWS}).encode(), JSON),
        ("tf, signature", f"/v1/models/{name}:predict",
         dumps({"instances": ROWS, "signature_name": "other"}).encode(), {**VIEWER, **JSON}),
        ("tf, a string", f"/v1/models/{name}:predict", dumps({"instances": [[0, "a", 0, 0]]}).encode(),
         {**VIEWER, **JSON}),
    ]


def answer(base: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    response = httpx.post(f"{base}{path}", content=body, headers=headers, timeout=30)
    kept = {key: response.headers[key] for key in COMPARED_HEADERS if key in response.headers}
    if response.headers.get("content-type") == "application/json":
        return response.status_code, kept, response.json()
    return response.status_code, kept, response.content


def compare_all(fast_base: str, plain_base: str, name: str) -> set[int]:
    statuses = set()
    for what, path, body, headers in cases(name):
        fast = answer(fast_base, path, body, headers)
        plain = answer(plain_base, path, body, headers)
        assert fast == plain, what
        statuses.add(fast[0])
    return statuses


def test_fast_lane_answers_as_the_routes_do(apps: tuple[Any, str, str, str]) -> None:
    fast_app, fast_base, plain_base, name = apps
    # Cheap calls run inline once a few have been measured.
    for _ in range(8):
        response = httpx.post(f"{fast_base}/v1/models/{name}/predict", json={"inputs": ROWS}, headers=VIEWER)
        response.raise_for_status()
    served = fast_app.state.dataplane.models.state(name).served
    assert served.cost.cheap
    lane = find_fast_lane(fast_app)
    before = lane.protocol_answers
    statuses = compare_all(fast_base, plain_base, name)
    assert statuses >= {200, 400, 401, 404, 413, 422}
    # Answered inside the HTTP protocol, but for those FastAPI must refuse and the bodies over the
    # size limit, which went the ASGI way.
    assert lane.protocol_answers - before == len(cases(name)) - len(ASGI_ANSWERED)

    # The same with every call in the thread pool (a model too costly for the loop).
    served.cost.samples = 0
    assert not served.cost.cheap
    served.cost.remote = True  # keeps it from turning cheap again during the pass
    before, pooled = lane.protocol_answers, served.batcher.pooled
    compare_all(fast_base, plain_base, name)
    # Still answered inside the HTTP protocol, the model calls made in the predict pool.
    assert lane.protocol_answers - before == len(cases(name)) - len(ASGI_ANSWERED)
    assert served.batcher.pooled - pooled >= 5  # ours, v2 JSON and binary, TF: each answered


def test_fast_lane_logs_and_counts_like_the_routes(apps: tuple[Any, str, str, str]) -> None:
    fast_app, fast_base, _, name = apps
    plane = fast_app.state.dataplane
    for index in range(10):
        response = httpx.post(f"{fast_base}/v1/models/{name}/predict", json={"inputs": ROWS},
                              headers={**VIEWER, "X-Request-ID": f"fl-{index}"})
        assert response.status_code == 200
    wait_for(lambda: plane.prediction_log.written >= 10, timeout=10, what="the log written")
    text = httpx.get(f"{fast_base}/metrics").text
    assert f'shipyard_predictions_total{{model="{name}",version="1"}} 10.0' in text
    # Answered in front of the app's middleware, yet counted in its request metrics, by route template.
    assert ('shipyard_http_requests_total{method="POST",route="/v1/models/{name}/predict",'
            'service="serving",status="200"} 10.0') in text

    def chunks() -> Iterator[bytes]:  # no Content-Length: the app's body limit reads it
        yield json.dumps({"inputs": ROWS}).encode()

    chunked = httpx.post(f"{fast_base}/v1/models/{name}/predict", content=chunks(),
                         headers={**VIEWER, "Content-Type": "application/json"})
    assert chunked.status_code == 200 and len(chunked.json()["outputs"]) == len(ROWS)
