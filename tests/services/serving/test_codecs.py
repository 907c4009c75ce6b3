"""The protocol handlers as plain functions (bytes and headers in, an answer out), on a two-input model.

No web framework, no event loop and no MLflow: called from a plain thread, a handler's request runs
at once, alone, and its answer comes back through its callback. The model takes ``ids`` (int64
[batch, 3]) and ``weights`` (float32 [batch, 3]) and answers ``total`` and ``first``.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.serving.api import tfserving as tfserving_api
from services.serving.api import v2 as v2_api
from services.serving.api.http import ProtocolResponse
from services.serving.core.dataplane import DataPlane
from services.serving.core.loaded import LoadedModels, ServedModel
from services.serving.core.metrics import ServingMetrics
from services.serving.runtimes.base import Signature
from services.serving.settings import ServingSettings

SIGNATURE = Signature.from_json(
    {
        "inputs": [
            {"name": "ids", "shape": [None, 3], "dtype": "int64"},
            {"name": "weights", "shape": [None, 3], "dtype": "float32"},
        ],
        "outputs": [
            {"name": "total", "shape": [None], "dtype": "float32"},
            {"name": "first", "shape": [None], "dtype": "int64"},
        ],
    }
)


class SumRuntime:
    format = "onnx"
    platform = "onnxruntime_onnx"
    signature = SIGNATURE

    def predict(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        total = (arrays["ids"] * arrays["weights"]).sum(axis=1).astype(np.float32)
        return {"total": total, "first": arrays["ids"][:, 0].copy()}

    def close(self) -> None:
        pass


class MemoryLog:
    """The prediction log's interface, in memory: these tests read what the codecs logged."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, record: dict[str, Any], *, reserved: bool = False) -> None:
        self.records.append(record)

    def append_reserved(self, records: list[dict[str, Any]]) -> None:
        self.records += records

    def try_reserve(self, count: int = 1) -> bool:
        return True

    def release(self, count: int = 1) -> None:
        pass


@pytest.fixture
def plane() -> DataPlane:
    metrics = ServingMetrics(CollectorRegistry())
    models = LoadedModels(metrics)
    models.set_target("sum", "4")
    models.install(
        ServedModel(
            name="sum", version="4", runtime=SumRuntime(), signature=SIGNATURE, loaded_at=datetime.now(UTC)
        )
    )
    models.reconciled.set()
    log: Any = MemoryLog()
    return DataPlane(
        settings=ServingSettings(max_batch_rows=4), models=models, prediction_log=log, metrics=metrics
    )


def v2_infer(*, dataplane: DataPlane, headers: dict[str, str], **request: Any) -> ProtocolResponse:
    answers: list[ProtocolResponse] = []
    v2_api.infer(dataplane, header_length=headers.get("inference-header-content-length"),
                 request_id=headers.get("x-request-id"), started=time.perf_counter(), reply=answers.append,
                 **request)
    (answer,) = answers  # answered at once: no event loop here
    return answer


def tf_predict(*, dataplane: DataPlane, request_id: str | None = None, **request: Any) -> ProtocolResponse:
    answers: list[ProtocolResponse] = []
    tfserving_api.predict(dataplane, request_id=request_id, started=time.perf_counter(),
                          reply=answers.append, **request)
    (answer,) = answers
    return answer


IDS = np.asarray([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
WEIGHTS = np.asarray([[0.5, 1.0, 2.0], [1.0, 0.0, -1.0]], dtype=np.float32)


def test_v2_mixed_binary_and_json_inputs_and_outputs(plane: DataPlane) -> None:
    header = json.dumps(
        {
            "id": "r1",
            "inputs": [
                {
                    "name": "ids",
                    "shape": [2, 3],
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": IDS.nbytes},
                },
                {"name": "weights", "shape": [2, 3], "datatype": "FP32", "data": WEIGHTS.ravel().tolist()},
            ],
            "outputs": [{"name": "first", "parameters": {"binary_data": True}}, {"name": "total"}],
        }
    ).encode()
    status, body, headers = v2_infer(
        dataplane=plane,
        name="sum",
        version="4",
        body=header + IDS.astype("<i8").tobytes(),
        headers={"inference-header-content-length": str(len(header))},
    )
    assert status == 200, body
    length = int(headers["inference-header-content-length"])
    answer = json.loads(body[:length])
    assert answer["model_version"] == "4" and answer["id"] == "r1"
    first, total = answer["outputs"]
    assert first == {
        "name": "first",
        "datatype": "INT64",
        "shape": [2],
        "parameters": {"binary_data_size": 16},
    }
    assert np.frombuffer(body[length:], dtype="<i8").tolist() == [1, 4]
    assert total["datatype"] == "FP32" and total["data"] == [8.5, -2.0]
    np.testing.assert_array_equal(plane.prediction_log.records[0]["inputs"]["ids"], IDS)  # type: ignore[attr-defined]

    status, body, _ = v2_infer(dataplane=plane, name="sum", version=None, body=header, headers={})
    assert status == 400 and "neither 'data' nor" not in json.loads(body)["error"]
    assert "binary data" in json.loads(body)["error"]


def test_tf_serving_rest_named_inputs_and_several_outputs(plane: DataPlane) -> None:
    rows = {
        "instances": [{"ids": i, "weights": w} for i, w in zip(IDS.tolist(), WEIGHTS.tolist(), strict=True)]
    }
    status, body, _ = tf_predict(
        dataplane=plane, name="sum", version=None, label=None, body=json.dumps(rows).encode()
    )
    assert status == 200, body
    assert json.loads(body) == {"predictions": [{"total": 8.5, "first": 1}, {"total": -2.0, "first": 4}]}

    columns = {"inputs": {"ids": IDS.tolist(), "weights": WEIGHTS.tolist()}}
    status, body, _ = tf_predict(
        dataplane=plane, name="sum", version="4", label=None, body=json.dumps(columns).encode()
    )
    assert json.loads(body) == {"outputs": {"total": [8.5, -2.0], "first": [1, 4]}}

    for request, message in (
        ({"instances": [[1, 2, 3]]}, "each instance is an object"),
        ({"inputs": {"ids": IDS.tolist()}}, "input(s) ['weights'] missing"),
        ({"inputs": {"ids": [[1.5, 2, 3], [1, 2, 3]], "weights": WEIGHTS.tolist()}}, "fractional"),
        ({"inputs": {"ids": IDS.tolist(), "weights": WEIGHTS[:1].tolist()}}, "disagree on the batch size"),
    ):
        status, body, _ = tf_predict(
            dataplane=plane, name="sum", version=None, label=None, body=json.dumps(request).encode()
        )
        assert status == 400 and message in json.loads(body)["error"], (request, body)
