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
