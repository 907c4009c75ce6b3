"""The three protocols over real HTTP: ours, Open Inference Protocol v2 (with tritonclient), TF Serving REST.

Versions are registered as the trainer registers them (a ``model/`` folder with onnx and
torchscript); one model is served with ONNX Runtime, the other with TorchScript.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.services.serving.model_folder import FolderVersion, expected, register_folder
from tests.services.serving.support import serving
from tests.support import auth, test_platform

ROWS = np.asarray([[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 2.0, -2.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
VIEWER = auth("viewer")
# tritonclient writes Inference-Header-Content-Length into the headers dict it is given: a copy each call.


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str, model_factory: ModelFactory
) -> Iterator[tuple[str, FolderVersion, FolderVersion]]:
    """A running serving app with an ONNX-served and a TorchScript-served model, shared by the module's
    tests (they only read: one start and two registrations instead of one per test)."""
    platform = test_platform(tmp_path_factory.mktemp("protocols") / "state", redis_url=redis_url,
                             mlflow_tracking_uri=mlflow_server)
    platform = platform.model_copy(update={"events_channel": f"test-events-{uuid.uuid4().hex[:10]}"})
    onnx = register_folder(model_factory, unique_name("v2-onnx"), seed=5, serve="onnx")
    script = register_folder(model_factory, unique_name("v2-ts"), seed=6, serve="torchscript")
    for version in (onnx, script):
        model_factory.set_production(version.name, version.version)
    with serving(platform, max_batch_rows=8, max_body_bytes=4096) as base:
        yield base, onnx, script


def client(base: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=base.removeprefix("http://"))


def triton_infer(
    base: str,
    name: str,
    rows: np.ndarray,
    *,
    binary_in: bool,
    binary_out: bool | None,
    version: str = "",
) -> triton.InferResult:
    infer_input = triton.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows, binary_data=binary_in)
    outputs = (
        None if binary_out is None else [triton.InferRequestedOutput("probabilities", binary_data=binary_out)]
    )
    return client(base).infer(
        name, [infer_input], outputs=outputs, model_version=version, headers=dict(VIEWER), request_id="req-1"
    )


def test_v2_health_metadata_and_infer_with_tritonclient(served: tuple) -> None:
    base, onnx, script = served
    triton_client = client(base)
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(onnx.name) and triton_client.is_model_ready(onnx.name, "1")
    assert not triton_client.is_model_ready(onnx.name, "7")
    assert not triton_client.is_model_ready(f"nope-{onnx.name}")

    for version, platform in ((onnx, "onnxruntime_onnx"), (script, "pytorch_libtorch")):
        metadata = triton_client.get_model_metadata(version.name, headers=dict(VIEWER))
        assert metadata == {
            "name": version.name,
            "versions": ["1"],
            "platform": platform,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
        }
        assert (
            triton_client.get_model_metadata(version.name, "1", headers=dict(VIEWER))["name"] == version.name
        )
        # Binary and JSON tensors both ways; no outputs named means every output, binary.
        for binary_in in (True, False):
            for binary_out in (True, False, None):
                result = triton_infer(
                    base,
                    version.name,
                    ROWS,
                    binary_in=binary_in,
                    binary_out=binary_out,
                    version="1" if binary_in else "",
                )
                answer = result.as_numpy("probabilities")
                assert answer is not None and answer.dtype == np.float32 and answer.shape == (3, 3)
                np.testing.assert_allclose(answer, expected(version.seed, ROWS), rtol=1e-5, atol=1e-6)
                response = result.get_response()
                assert response["model_name"] == version.name and response["model_version"] == "1"
                assert response["id"] == "req-1"
                is_binary = "binary_data_size" in response["outputs"][0].get("parameters", {})
                assert is_binary == (binary_out is not False)

    with pytest.raises(InferenceServerException) as refused:
        client(base).infer(
            onnx.name, [triton.InferInput("input", [1, 4], "FP32").set_data_from_numpy(ROWS[:1])]
        )
    assert refused.value.status() == "401" and "API token" in refused.value.message()
    with pytest.raises(InferenceServerException) as missing:
        triton_infer(base, onnx.name, ROWS, binary_in=True, binary_out=True, version="9")
    assert missing.value.status() == "404" and "version 9 is not loaded" in missing.value.message()


def post_v2(
    base: str,
    name: str,
    body: bytes | dict[str, Any],
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.post(
        f"{base}/v2/models/{name}/infer",
        content=content,
        headers={**VIEWER, "Content-Type": "application/json", **(headers or {})},
    )


def test_v2_json_and_binary_by_hand(served: tuple) -> None:
    base, onnx, _ = served
    nested = {
        "id": "x",
        "inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": ROWS.tolist()}],
        "outputs": [{"name": "probabilities"}],
    }
    response = post_v2(base, onnx.name, nested)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "x" and body["outputs"][0]["shape"] == [3, 3]
    assert body["outputs"][0]["datatype"] == "FP32"
    np.testing.assert_allclose(
        np.reshape(body["outputs"][0]["data"], (3, 3)), expected(onnx.seed, ROWS), rtol=1e-5, atol=1e-6
    )

    # Binary input, binary output asked globally: JSON header + raw little-endian float32.
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": ROWS.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    response = post_v2(
        base,
        onnx.name,
        header + ROWS.astype("<f4").tobytes(),
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    head = json.loads(response.content[:length])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 3 * 3 * 4
    answer = np.frombuffer(response.content[length:], dtype="<f4").reshape(3, 3)
    np.testing.assert_allclose(answer, expected(onnx.seed, ROWS), rtol=1e-5, atol=1e-6)


def good_v2(rows: Any = None) -> dict[str, Any]:
    data = ROWS.tolist() if rows is None else rows
    return {"inputs": [{"name": "input", "shape": list(np.shape(data)), "datatype": "FP32", "data": data}]}


V2_BAD: list[tuple[Any, int, str]] = [
    (b"not json", 400, "not valid JSON"),
    ({"inputs": []}, 400, "needs 'inputs'"),
    (
        {"inputs": [{"name": "other", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        400,
        "unknown input(s) ['other']",
    ),
    (
        {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
        400,
        "dimension 1 must be 4, not 3",
    ),
    (
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]},
        400,
        "has 3 values; shape [1, 4] needs 4",
    ),
    (
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]},
        400,
        "is int64; the model takes 'input' float32[?, 4]",
    ),
    (
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "BYTES", "data": ["a"] * 4}]},
        400,
        "datatype 'BYTES' is not one serving takes",
    ),
    (
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ["1", 2, 3, 4]}]},
        400,
        "holds strings",
    ),
    (
        b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, NaN, 3, 4]}]}',
        400,
        "at [0, 1] is nan; values must be finite",
    ),
    (good_v2([[1.0, 2.0, 3.0, 4.0]] * 9), 400, "has 9 rows; at most 8"),
    ({**good_v2(), "outputs": [{"name": "logits"}]}, 400, "unknown output(s) ['logits']"),
    (good_v2([[1.0, 2.0, 3.0, 4.0]] * 300), 413, "at most 4096 are accepted"),
]


def test_v2_bad_requests_get_a_clear_error_and_serving_stays_up(served: tuple) -> None:
    base, onnx, _ = served
    for body, status, message in V2_BAD:
        response = post_v2(base, onnx.name, body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert isinstance(error, str) and message in error, (message, error)
    # A binary input whose size disagrees with its shape.
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [3, 4], "datatype": "FP32", "parameters": {"binary_data_size": 8}}
            ]
        }
    ).encode()
    response = post_v2(
        base, onnx.name, header + b"\0" * 8, {"Inference-Header-Content-Length": str(len(header))}
    )
    assert response.status_code == 400 and "needs 48" in response.json()["error"]
    unauthorized = httpx.post(f"{base}/v2/models/{onnx.name}/infer", json=good_v2())
    assert unauthorized.status_code == 401 and isinstance(unauthorized.json()["error"], str)
    # Still answering.
    assert post_v2(base, onnx.name, good_v2()).status_code == 200


def test_tf_serving_rest_predict_and_status(served: tuple) -> None:
    base, onnx, script = served
    for version in (onnx, script):
        want = expected(version.seed, ROWS)
        for route in (":predict", "/versions/1:predict", "/labels/production:predict"):
            url = f"{base}/v1/models/{version.name}{route}"
            rows = httpx.post(url, json={"instances": ROWS.tolist()}, headers=VIEWER)
            assert rows.status_code == 200, rows.text
            np.testing.assert_allclose(rows.json()["predictions"], want, rtol=1e-5, atol=1e-6)
            columns = httpx.post(url, json={"inputs": ROWS.tolist()}, headers=VIEWER)
            np.testing.assert_allclose(columns.json()["outputs"], want, rtol=1e-5, atol=1e-6)
            named = httpx.post(
                url,
                json={"signature_name": "serving_default", "inputs": {"input": ROWS.tolist()}},
                headers=VIEWER,
            )
            np.testing.assert_allclose(named.json()["outputs"], want, rtol=1e-5, atol=1e-6)
            by_name = httpx.post(
                url, json={"instances": [{"input": row} for row in ROWS.tolist()]}, headers=VIEWER
            )
            np.testing.assert_allclose(by_name.json()["predictions"], want, rtol=1e-5, atol=1e-6)

    available = [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    status = httpx.get(f"{base}/v1/models/{onnx.name}", headers=VIEWER).json()
    assert status["model_version_status"] == available and status["format"] == "onnx"
    assert (
        httpx.get(f"{base}/v1/models/{script.name}", headers=VIEWER).json()["platform"] == "pytorch_libtorch"
    )
    assert httpx.get(f"{base}/v1/models/{onnx.name}/versions/1", headers=VIEWER).json() == {
        "model_version_status": available
    }
    assert httpx.get(f"{base}/v1/models/{onnx.name}/labels/production", headers=VIEWER).json() == {
        "model_version_status": available
    }

    url = f"{base}/v1/models/{onnx.name}"
    errors = [
        (f"{url}/versions/2:predict", {"instances": ROWS.tolist()}, 404, "version 2 is not loaded"),
        (f"{url}/labels/canary:predict", {"instances": ROWS.tolist()}, 404, "label 'canary'"),
        (f"{base}/v1/models/nope-{onnx.name}:predict", {"instances": ROWS.tolist()}, 404, "is not served"),
        (f"{url}:predict", {"instances": [[1.0, 2.0]]}, 400, "dimension 1 must be 4, not 2"),
        (f"{url}:predict", {"instances": ROWS.tolist(), "inputs": ROWS.tolist()}, 400, "exactly one of"),
        (f"{url}:predict", {"rows": ROWS.tolist()}, 400, "exactly one of"),
        (
            f"{url}:predict",
            {"instances": ROWS.tolist(), "signature_name": "other"},
            400,
            "'other' is not served",
        ),
        (f"{url}:predict", {"instances": [[1.0, 2.0, 3.0, 4.0]] * 9}, 400, "at most 8"),
        (f"{url}:predict", {"instances": [[1.0, 2.0, 3.0, 4.0]] * 300}, 413, "at most 4096"),
    ]
    for target, body, status_code, message in errors:
        response = httpx.post(target, json=body, headers=VIEWER)
        assert response.status_code == status_code, (target, body, response.text)
        assert message in response.json()["error"], (message, response.text)
    response = httpx.get(f"{url}/versions/2", headers=VIEWER)
    assert response.status_code == 404 and "version 2 is not loaded" in response.json()["error"]
    assert httpx.post(f"{url}:predict", json={"instances": ROWS.tolist()}).status_code == 401
    assert httpx.post(f"{url}:predict", json={"instances": ROWS.tolist()}, headers=VIEWER).status_code == 200


def test_our_json_protocol_serves_torchscript_and_refuses_large_bodies(served: tuple) -> None:
    base, _, script = served
    url = f"{base}/v1/models/{script.name}/predict"
    response = httpx.post(url, json={"inputs": ROWS.tolist()}, headers=VIEWER)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["outputs"], expected(script.seed, ROWS), rtol=1e-5, atol=1e-6)
    too_large = httpx.post(url, json={"inputs": [[1.0, 2.0, 3.0, 4.0]] * 300}, headers=VIEWER)
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "payload_too_large"

    # A chunked body (no Content-Length) is counted as it arrives.
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": ['
        for _ in range(300):
            yield b"[1.0, 2.0, 3.0, 4.0],"
        yield b"[1.0, 2.0, 3.0, 4.0]]}"

    chunked = httpx.post(url, content=chunks(), headers={**VIEWER, "Content-Type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert httpx.post(url, json={"inputs": ROWS.tolist()}, headers=VIEWER).status_code == 200


def test_tf_serving_metadata_and_the_methods_a_predict_signature_lacks(served: tuple) -> None:
    base, onnx, _ = served
    url = f"{base}/v1/models/{onnx.name}"
    for route in ("/metadata", "/versions/1/metadata", "/labels/production/metadata"):
        response = httpx.get(f"{url}{route}", headers=VIEWER)
        assert response.status_code == 200, response.text
        found = response.json()
        assert found["model_spec"] == {"name": onnx.name, "signature_name": "", "version": "1"}
        definition = found["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert definition["method_name"] == "tensorflow/serving/predict"
        assert definition["inputs"]["input"]["dtype"] == "DT_FLOAT"
        assert [dim["size"] for dim in definition["inputs"]["input"]["tensor_shape"]["dim"]] == ["-1", "4"]
        assert list(definition["outputs"]) == ["probabilities"]
    assert httpx.get(f"{url}/metadata").status_code == 401
    missing = httpx.get(f"{url}/versions/2/metadata", headers=VIEWER)
    assert missing.status_code == 404 and "version 2" in missing.json()["error"]
    for method in ("classify", "regress"):
        for route in (f":{method}", f"/versions/1:{method}", f"/labels/production:{method}"):
            response = httpx.post(f"{url}{route}", json={"examples": [{"x": 1.0}]}, headers=VIEWER)
            assert response.status_code == 400, (route, response.text)
            error = response.json()["error"]
            assert f"no {method} signature" in error and ":predict" in error
        assert httpx.post(f"{url}:{method}", json={"examples": []}).status_code == 401


def deep(levels: int) -> str:
    return "[" * levels + "1.0" + "]" * levels


def test_every_protocol_refuses_booleans_and_deep_json_in_its_own_shape(served: tuple) -> None:
    base, onnx, _ = served
    json_headers = {**VIEWER, "Content-Type": "application/json"}
    bad_row = [True, 1.0, 2.0, 3.0]  # numpy would read it as [1.0, 1.0, 2.0, 3.0]
    v2_bool = good_v2([bad_row])
    v2_bool["inputs"][0]["data"] = bad_row
    cases = [  # (url, body, status, how the error reads)
        (f"{base}/v1/models/{onnx.name}/predict", json.dumps({"inputs": [bad_row]}), 422, "ours"),
        (f"{base}/v2/models/{onnx.name}/infer", json.dumps(v2_bool), 400, "flat"),
        (f"{base}/v1/models/{onnx.name}:predict", json.dumps({"instances": [bad_row]}), 400, "flat"),
        (f"{base}/v1/models/{onnx.name}:predict", json.dumps({"inputs": [[1.0, 2.0, False, 4.0]]}), 400,
         "flat"),
        (f"{base}/v1/models/{onnx.name}/predict", '{"inputs": ' + deep(1500) + "}", 422, "ours"),
        (f"{base}/v2/models/{onnx.name}/infer",
         '{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ' + deep(1500) + "}]}",
         400, "flat"),
        (f"{base}/v1/models/{onnx.name}:predict", '{"instances": ' + deep(1500) + "}", 400, "flat"),
    ]
    for url, body, status, shape in cases:
        response = httpx.post(url, content=body, headers=json_headers)
        assert response.status_code == status, (url, body[:80], response.text)
        error = response.json()["error"]
        message = error["message"] if shape == "ours" else error
        assert isinstance(message, str), response.text  # tritonclient and TF clients print a string
        assert "bool" in message or "nested too deeply" in message, message
    # Serving is still up and answers as before.
    good = httpx.post(f"{base}/v1/models/{onnx.name}:predict", json={"instances": ROWS.tolist()},
                      headers=VIEWER)
    assert good.status_code == 200


def test_unknown_v2_routes_and_wrong_methods_answer_in_each_protocols_shape(served: tuple) -> None:
    base, onnx, _ = served
    # tritonclient's error printing needs v2's {"error": "..."}; the repository API is not served.
    with pytest.raises(InferenceServerException) as raised:
        client(base).get_model_repository_index(headers=dict(VIEWER))
    assert "no Open Inference Protocol route POST /v2/repository/index" in str(raised.value)
    wrong = httpx.get(f"{base}/v2/models/{onnx.name}/infer", headers=VIEWER)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json() == {"error": f"/v2/models/{onnx.name}/infer does not take GET; it takes POST"}
    unknown = httpx.get(f"{base}/v2/nothing/here", headers=VIEWER)
    assert unknown.status_code == 404 and isinstance(unknown.json()["error"], str)
    # Elsewhere the platform's shape, and the 405 still names what the route takes.
    ours = httpx.get(f"{base}/v1/models/{onnx.name}/predict", headers=VIEWER)
    assert ours.status_code == 405 and ours.headers["allow"] == "POST"
    assert ours.json()["error"]["code"] == "method_not_allowed"


def test_a_body_declared_as_another_format_is_a_415_in_each_protocols_shape(served: tuple) -> None:
    base, onnx, _ = served
    v2_url, tf_url = f"{base}/v2/models/{onnx.name}/infer", f"{base}/v1/models/{onnx.name}:predict"
    v2_body, tf_body = json.dumps(good_v2(ROWS.tolist())), json.dumps({"instances": ROWS.tolist()})
    for url, body in ((v2_url, v2_body), (tf_url, tf_body)):
        for media in ("application/xml", "multipart/form-data; boundary=x", "image/png"):
            refused = httpx.post(url, content=body, headers={**VIEWER, "Content-Type": media})
            assert refused.status_code == 415, (url, media, refused.text)
            message = refused.json()["error"]  # the protocol's {"error": "..."}
            assert isinstance(message, str) and media.split(";")[0] in message
            assert "application/json" in message
        # JSON, with or without a charset; curl -d's form type and none at all, as TF Serving's examples send.
        for media in ("application/json", "application/json; charset=utf-8",
                      "application/x-www-form-urlencoded", None):
            headers = {**VIEWER, **({"Content-Type": media} if media else {})}
            assert httpx.post(url, content=body, headers=headers).status_code == 200, (url, media)
    # Binary tensors may say what they are; JSON may not claim to be bytes.
    raw = ROWS.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(ROWS.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    binary = {**VIEWER, "Inference-Header-Content-Length": str(len(header))}
    answer = httpx.post(v2_url, content=header + raw,
                        headers={**binary, "Content-Type": "application/octet-stream"})
    assert answer.status_code == 200, answer.text
    assert httpx.post(v2_url, content=v2_body,
                      headers={**VIEWER, "Content-Type": "application/octet-stream"}).status_code == 415
