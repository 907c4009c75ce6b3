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
    labels: list[str] | None = Field(
        default=None, description="A classifier's class names, in the order of each row's probabilities."
    )
    label: list[str] | None = Field(
        default=None, description="A classifier's answer per row: the label of its highest probability."
    )


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
    labels: list[str] | None = Field(
        default=None, description="A classifier's class names, in the order of its output's columns."
    )
    features: list[str] | None = Field(
        default=None, description="The feature (column) names the input's values are, in order."
    )
    columns: list[dict[str, Any]] | None = Field(
        default=None, description="A table's columns, one input each: type, categories (a value outside "
                                  "them is answered as unknown), how a null is filled.",
    )
    text: dict[str, Any] | None = Field(
        default=None, description="A text model's raw text: the input it fills and the tokens each text is "
                                  "cut or padded to ({\"input\": \"input_ids\", \"max_length\": 128})."
    )
    sequence: dict[str, Any] | None = Field(
        default=None, description="A sequence model's input and the most steps a sequence may have (its "
                                  "signature's sequence.max_length; a longer one is refused): "
                                  "({\"input\": \"input\", \"max_length\": 20})."
    )
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


def json_body(schema: dict[str, Any], example: Any) -> dict[str, Any]:
    """``openapi_extra`` documenting a required JSON request body of ``schema``, with ``example``."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema, "example": example}}}}


# Examples for a model of four float features whose input is named "input" (as the trainer exports).
V2_INFER_EXAMPLE = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                "data": [0.1, 0.2, 0.3, 0.4]}]}
TF_PREDICT_EXAMPLE = {"instances": [[0.1, 0.2, 0.3, 0.4]]}
TF_CLASSIFY_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["examples"],
    "description": "TF Serving's REST classify request: one object {feature: value} per example; "
                   "`context` holds features every example shares.",
    "properties": {
        "signature_name": {"type": "string"},
        "context": {"type": "object"},
        "examples": {"type": "array", "minItems": 1, "items": {"type": "object"}},
    },
}
TF_CLASSIFY_EXAMPLE = {"examples": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4,
                                     "petal_width": 0.2}]}


# What the protocol routes answer (their codecs build the bytes; these describe them for the OpenAPI).
class ServerMetadataPublic(BaseModel):
    name: str
    version: str
    extensions: list[str]


class LivePublic(BaseModel):
    live: bool


class ModelReadyPublic(BaseModel):
    name: str
    version: str
    ready: bool


class TensorMetadataPublic(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 where any size is taken (the batch).")


class ModelMetadataPublic(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadataPublic]
    outputs: list[TensorMetadataPublic]
    parameters: dict[str, Any] | None = Field(
        default=None, description="labels (a classifier's class names, in output order) and features "
        "(the input's column names), where the version has them; text (a text model's) and sequence (a "
        "sequence model's): {\"input\", \"max_length\"}, the most tokens or steps its input reads."
    )


class OutputTensorPublic(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(default=None, description="Row-major values (JSON tensors).")
    parameters: dict[str, Any] | None = Field(default=None, description="binary_data_size (binary tensors).")


class InferResponsePublic(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensorPublic]


class TfPredictPublic(BaseModel):
    """Rows (``instances``) are answered in ``predictions``, columns (``inputs``) in ``outputs``."""

    predictions: list[Any] | None = None
    outputs: Any = None


class TfClassifyPublic(BaseModel):
    """Per example, every class's ``[label, score]``, in the model's output order."""

    results: list[list[list[Any]]]
    truncated: list[bool] | None = Field(
        default=None, description="A text classifier's: whether each example's text was cut to the model's "
                                  "max_length tokens.")


class TfModelStatusPublic(BaseModel):
    model_version_status: list[dict[str, Any]]


class TfMetadataPublic(BaseModel):
    model_spec: dict[str, Any]
    metadata: dict[str, Any]


#: v2 infer's answer: JSON, or with binary outputs the JSON header followed by their bytes.
INFER_ANSWER: dict[int | str, dict[str, Any]] = {200: {
    "model": InferResponsePublic,
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    "description": "The outputs; binary ones after the JSON header (Inference-Header-Content-Length).",
}}
