"""The Open Inference Protocol v2 over gRPC, driven by ``tritonclient.grpc`` as against Triton.

One serving app for the module (its gRPC port on), with one model served by ONNX Runtime:
version 1 is production, version 2 its canary at weight 1, so that a request naming no version
shows the routed default (the canary) and one naming "1" reaches production. Answers are checked
against the HTTP v2 route's (``tritonclient.http``) for the same rows, and in the prediction log.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from sqlalchemy import select
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from shipyard_common.db import Database
from shipyard_common.lineage import CANARY, TAG_CANARY_WEIGHT
from shipyard_common.records import PredictionRecord
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.services.serving.model_folder import FolderVersion, expected, register_folder
from tests.services.serving.support import NO_RECONCILE, metric, model_status, serving
from tests.support import free_port, test_platform, token_of, wait_for

ROWS = np.asarray([[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 2.0, -2.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
TOKEN = token_of("viewer")
# gRPC metadata keys are lower case.
VIEWER = {"authorization": f"Bearer {TOKEN}"}


@dataclass(frozen=True)
class Served:
    base: str
    grpc_url: str
    name: str
    production: FolderVersion
    canary: FolderVersion
    platform: PlatformSettings

    def client(self) -> tgrpc.InferenceServerClient:
        return tgrpc.InferenceServerClient(url=self.grpc_url)

    def seed(self, version: str) -> int:
        return self.production.seed if version == self.production.version else self.canary.seed


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str, model_factory: ModelFactory
) -> Iterator[Served]:
    platform = test_platform(
        tmp_path_factory.mktemp("grpc") / "state", redis_url=redis_url, mlflow_tracking_uri=mlflow_server,
        events_channel=f"test-events-{uuid.uuid4().hex[:10]}",
    )
    name = unique_name("grpc")
    production = register_folder(model_factory, name, seed=21, serve="onnx")
    canary = register_folder(model_factory, name, seed=22, serve="onnx")
    model_factory.set_production(name, production.version)
    model_factory.client.set_registered_model_alias(name, CANARY, canary.version)
    model_factory.client.set_registered_model_tag(name, TAG_CANARY_WEIGHT, "1.0")
    port = free_port()
    with serving(platform, grpc_port=port, max_batch_rows=8, max_body_bytes=4096,
                 prediction_log_flush_s=0.1, reconcile_interval_s=NO_RECONCILE) as base:
        wait_for(lambda: (model_status(base, name)["canary"] or {}).get("status") == "serving", timeout=60,
                 what="the canary served")
        yield Served(base, f"127.0.0.1:{port}", name, production, canary, platform)


def grpc_infer(
    served: Served, rows: np.ndarray, *, version: str = "", request_id: str = "", datatype: str = "FP32",
    outputs: list[str] | None = None, headers: dict[str, str] | None = None, name: str | None = None,
) -> tgrpc.InferResult:
    infer_input = tgrpc.InferInput("input", list(rows.shape), datatype)
    infer_input.set_data_from_numpy(rows)
    requested = None if outputs is None else [tgrpc.InferRequestedOutput(o) for o in outputs]
    return served.client().infer(
        name or served.name, [infer_input], model_version=version, outputs=requested, request_id=request_id,
        headers=VIEWER if headers is None else headers,
    )


def http_infer(served: Served, rows: np.ndarray, version: str) -> thttp.InferResult:
    infer_input = thttp.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows, binary_data=True)
    client = thttp.InferenceServerClient(url=served.base.removeprefix("http://"))
    return client.infer(served.name, [infer_input], model_version=version,
                        headers={"Authorization": f"Bearer {TOKEN}"})


def refused(status: str, words: str, call: Callable[..., object], *args: object,
            **kwargs: object) -> InferenceServerException:
    """The error ``call`` raises, checked: gRPC status ``status``, a message holding ``words``."""
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)
    error = raised.value
    assert error.status() == f"StatusCode.{status}" and words in error.message(), error
    return error


def test_health_and_metadata(served: Served) -> None:
    client = served.client()
    assert client.is_server_live(headers=VIEWER) and client.is_server_ready(headers=VIEWER)
    assert client.is_model_ready(served.name, headers=VIEWER)
    for version in ("1", "2"):  # production and the loaded canary
        assert client.is_model_ready(served.name, version, headers=VIEWER)
    assert not client.is_model_ready(served.name, "7", headers=VIEWER)
    assert not client.is_model_ready(f"nope-{served.name}", headers=VIEWER)

    server = client.get_server_metadata(headers=VIEWER)
    assert server.name == "shipyard-serving" and server.version
    metadata = client.get_model_metadata(served.name, headers=VIEWER)
    assert metadata.name == served.name and list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    described = [[(t.name, t.datatype, list(t.shape)) for t in tensors]
                 for tensors in (metadata.inputs, metadata.outputs)]
    assert described == [[("input", "FP32", [-1, 4])], [("probabilities", "FP32", [-1, 3])]]
    assert list(client.get_model_metadata(served.name, "2", headers=VIEWER).versions) == ["2"]
    # As JSON (MessageToJson), as tritonclient users often ask for it.
    assert client.get_model_metadata(served.name, headers=VIEWER, as_json=True)["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": ["-1", "4"]}
    ]


def test_infer_answers_as_the_http_v2_route_and_is_logged(served: Served) -> None:
    request_ids = {}
    for version, answering in (("", served.canary.version), ("1", "1"), ("2", "2")):
        request_id = f"grpc-{uuid.uuid4().hex}"
        result = grpc_infer(served, ROWS, version=version, request_id=request_id)
        response = result.get_response()
        # The version that answered (the canary for no version, at weight 1) and the request's id.
        assert response.model_name == served.name and response.model_version == answering
        assert response.id == request_id
        assert response.raw_output_contents  # raw outputs, as Triton answers by default
        answer = result.as_numpy("probabilities")
        assert answer is not None and answer.dtype == np.float32 and answer.shape == (3, 3)
        over_http = http_infer(served, ROWS, version)
        assert over_http.get_response()["model_version"] == answering
        np.testing.assert_array_equal(answer, over_http.as_numpy("probabilities"))
        np.testing.assert_allclose(answer, expected(served.seed(answering), ROWS), rtol=1e-5, atol=1e-6)
        request_ids[request_id] = answering

    # Requested outputs: only those named, in that order.
    named = grpc_infer(served, ROWS[:1], outputs=["probabilities"], version="1").get_response()
    assert [o.name for o in named.outputs] == ["probabilities"] and len(named.raw_output_contents) == 1
    # No id given: serving makes one (the prediction log's), as over HTTP.
    assert grpc_infer(served, ROWS[:1]).get_response().id

    database = Database(served.platform.database_url)
    try:
        def logged() -> list[PredictionRecord]:
            with database.session() as session:
                found = session.scalars(select(PredictionRecord).where(
                    PredictionRecord.request_id.in_(list(request_ids)))).all()
            return list(found) if len(found) == len(request_ids) else []

        rows = wait_for(logged, timeout=30, what="the gRPC requests in the prediction log")
    finally:
        database.dispose()
    for row in rows:
        answering = request_ids[row.request_id]
        assert row.model == served.name and row.version == answering
        assert row.role == ("canary" if answering == served.canary.version else "production")
        np.testing.assert_allclose(row.inputs, ROWS, rtol=1e-6)
        np.testing.assert_allclose(row.outputs, expected(served.seed(answering), ROWS), rtol=1e-5, atol=1e-6)


def test_typed_contents_and_metadata_auth_by_hand(served: Served) -> None:
    """The typed ``contents`` field instead of raw bytes, an ``x-api-token``, an ``x-request-id``."""
    request = service_pb2.ModelInferRequest(model_name=served.name, model_version="1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(ROWS.shape))
    tensor.contents.fp32_contents.extend(ROWS.ravel().tolist())
    with grpc.insecure_channel(served.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, metadata=(("x-api-token", TOKEN), ("x-request-id", "by-hand-1")))
        assert response.model_version == "1" and response.id == "by-hand-1"
        assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
            ("probabilities", "FP32", [3, 3])]
        answer = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 3)
        np.testing.assert_allclose(answer, expected(served.production.seed, ROWS), rtol=1e-5, atol=1e-6)

        # Values in another datatype's field, and raw bytes of the wrong size.
        wrong = service_pb2.ModelInferRequest(model_name=served.name)
        wrong_input = wrong.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        wrong_input.contents.int_contents.extend([1, 2, 3, 4])
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(wrong, metadata=tuple(VIEWER.items()))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "takes its values in contents.fp32_contents" in refused.value.details()
        short = service_pb2.ModelInferRequest(model_name=served.name, raw_input_contents=[b"\0" * 12])
        short.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(short, metadata=tuple(VIEWER.items()))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_input_contents holds 12 bytes; shape [1, 4] of FP32 needs 16" in refused.value.details()


def invalid_inputs(served: Served) -> float:
    """Refused inputs counted for the model, over its versions."""
    return sum(metric(served.base, "shipyard_prediction_errors_total",
                      {"model": served.name, "version": version, "reason": "invalid_input"}) or 0.0
               for version in (served.production.version, served.canary.version))


def test_refusals_map_to_grpc_status_codes(served: Served) -> None:
    invalid_before = invalid_inputs(served)

    invalid = "INVALID_ARGUMENT"
    wide = np.zeros((2, 5), np.float32)
    wide_error = refused(invalid, "input 'input' has shape [2, 5]", grpc_infer, served, wide)
    assert "dimension 1 must be 4" in wide_error.message()
    refused(invalid, "'input' is float64", grpc_infer, served, ROWS.astype(np.float64), datatype="FP64")
    texts = np.asarray([[b"a", b"b", b"c", b"d"]], dtype=np.object_)
    # Text where the model takes numbers: decoded (BYTES carry text and tables' columns), then refused.
    refused(invalid, "input 'input' is string; the model takes 'input' float32[?, 4]", grpc_infer, served,
            texts, datatype="BYTES")
    refused(invalid, "unknown output(s) ['nope']", grpc_infer, served, ROWS, outputs=["nope"])
    assert invalid_inputs(served) == invalid_before + 4  # counted as over HTTP

    unknown = f"nope-{served.name}"
    refused("NOT_FOUND", "is not served", grpc_infer, served, ROWS, name=unknown)
    refused("NOT_FOUND", "version 9 is not loaded", grpc_infer, served, ROWS, version="9")
    refused("NOT_FOUND", "is not served", served.client().get_model_metadata, unknown, headers=VIEWER)

    denials: list[tuple[dict[str, str], str]] = [
        ({}, "needs an API token"), ({"authorization": "Bearer wrong"}, "unknown API token"),
        ({"authorization": "Basic abc"}, "must be 'Bearer <token>'"),
    ]
    for headers, words in denials:
        refused("UNAUTHENTICATED", words, grpc_infer, served, ROWS, headers=headers)
    refused("UNAUTHENTICATED", "needs an API token", served.client().is_server_live)

    # Over max_body_bytes (4096): refused by gRPC itself.
    refused("RESOURCE_EXHAUSTED", "larger than max", grpc_infer, served, np.zeros((320, 4), np.float32))
    refused("UNIMPLEMENTED", "ModelConfig is not implemented by Shipyard serving",
            served.client().get_model_config, served.name, headers=VIEWER)

    # Still serving after every refusal.
    assert grpc_infer(served, ROWS).get_response().model_version == served.canary.version
    # Counted in the service's request metrics, as the HTTP protocols' requests are.
    route = {"method": "POST", "route": "/inference.GRPCInferenceService/ModelInfer", "service": "serving"}
    assert (metric(served.base, "shipyard_http_requests_total", {**route, "status": "200"}) or 0) >= 1
    assert (metric(served.base, "shipyard_http_requests_total", {**route, "status": "400"}) or 0) >= 4
    assert (metric(served.base, "shipyard_http_requests_total", {**route, "status": "401"}) or 0) >= 3
