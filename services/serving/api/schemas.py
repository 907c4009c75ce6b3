from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class PredictRequest(BaseModel):
    # Any, not list[list[float]]: the data plane checks the rows against the loaded model and says
    # which row is wrong and how, which pydantic's generic messages cannot.
    inputs: Any = Field(
        description="A batch of rows, each a list of numbers in the model's feature order.",
        examples=[[[0.1, 2.0, 3.5]]],
    )


class PredictResponse(BaseModel):
    model: str
    model_version: str
    outputs: list[Any] = Field(description="The model's first output, one entry per input row.")


class ModelStatusPublic(BaseModel):
    name: str
    version: str | None = Field(description="The version answering requests now.")
    status: str = Field(
        description="loading, serving, updating, degraded (an older version serves) or failed."
    )
    target_version: str | None = Field(description="The version the production alias names.")
    error: str | None = Field(description="Why target_version is not served, if it failed to load.")
    failed_version: str | None = None
    loaded_at: datetime | None = None
    format: str | None = Field(default=None, description="onnx, torchscript or savedmodel (via TF Serving).")
    platform: str | None = Field(default=None, description="The runtime, as the v2 protocol names it.")
    runtime_threads: int | None = Field(
        default=None, description="ONNX Runtime intra-op threads the answering version runs with."
    )
    input_name: str | None = None
    output_name: str | None = None
    n_features: int | None = None
    inputs: list[dict[str, Any]] | None = Field(
        default=None, description="The signature requests are checked against: name, dtype, shape."
    )
    outputs: list[dict[str, Any]] | None = None
    # TF Serving's GetModelStatus answer, so that its clients can read this route as they read its own.
    model_version_status: list[dict[str, Any]] = Field(default_factory=list)
    canary_weight: float | None = Field(
        default=None, description="Share of requests naming no version that the canary answers."
    )
    canary: dict[str, Any] | None = Field(
        default=None,
        description="The canary alias, when set: role, version (answering now), status, target_version, "
        "error, failed_version, loaded_at, weight.",
    )
    shadow: dict[str, Any] | None = Field(
        default=None, description="The shadow alias, when set: the same fields as canary, without weight."
    )


class ProtocolErrorPublic(BaseModel):
    """OIP v2's and TF Serving REST's error body, ``{"error": "..."}``: their clients read only that."""

    error: str


class ReadyPublic(BaseModel):
    ready: bool


# The request bodies of the routes that read their body as bytes (v2 infer, TF Serving :predict: the
# codecs parse it, faster than a model would), for their OpenAPI only.
V2_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                "FP16", "FP32", "FP64", "BYTES"]
V2_INFER_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["inputs"],
    "description": "An Open Inference Protocol v2 inference request (JSON; binary tensors: "
                   "application/octet-stream after the JSON, its length in Inference-Header-Content-Length).",
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {"name": {"type": "string"},
                           "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                           "datatype": {"enum": V2_DATATYPES},
                           "parameters": {"type": "object"},
                           "data": {"type": "array", "description": "Row-major values, or nested lists."}}}},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}},
    },
}
TF_PREDICT_REQUEST: dict[str, Any] = {
    "type": "object",
    "description": "TF Serving's REST predict request: rows in `instances`, or columns in `inputs`.",
    "properties": {
        "signature_name": {"type": "string"},
        "instances": {"type": "array", "minItems": 1},
        "inputs": {},
    },
    "anyOf": [{"required": ["instances"]}, {"required": ["inputs"]}],
}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` documenting a required JSON request body of ``schema``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
