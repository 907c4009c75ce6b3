from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from shipyard_common.settings import ServiceSettings


def _default_intra_op_threads() -> int:
    # Several models and the request threads share the machine; one model may not take it all.
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class BatchingPolicy:
    enabled: bool
    max_batch_size: int
    max_wait_s: float


class BatchingOverride(BaseModel):
    """One model's batching settings; a field left out takes the service-wide setting."""

    batching: bool | None = None
    max_batch_size: int | None = Field(default=None, ge=1)
    max_batch_wait_ms: float | None = Field(default=None, ge=0)


class ServingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHIPYARD_SERVING_", extra="ignore")

    port: int = 8003
    grpc_port: int = Field(
        default=0, ge=0, le=65535,
        description="Port of the Open Inference Protocol v2 over gRPC (inference.GRPCInferenceService, "
        "tritonclient.grpc), on the same host; 0: off (8013 by convention). With several workers each "
        "process binds it with SO_REUSEPORT.",
    )
    reconcile_interval_s: float = Field(
        default=10, gt=0, description="Full check of every production alias; catches lost events."
    )
    failed_load_retry_s: float = Field(
        default=60, ge=0, description="How long a version that failed to load is left alone before a retry."
    )
    max_batch_rows: int = Field(default=1024, ge=1, description="Rows (the batch dimension) per request.")
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1, description="Largest request body; a larger one is answered 413."
    )
    allow_non_finite: bool = Field(
        default=False, description="Let NaN and ±Inf through to the model instead of refusing the request."
    )
    tf_serving_address: str | None = Field(
        default=None,
        description="host:port of TF Serving's gRPC API; savedmodel versions are answered through it.",
    )
    tf_serving_timeout_s: float = Field(default=10, gt=0)
    intra_op_threads: int = Field(default_factory=_default_intra_op_threads, ge=1)
    choose_intra_op_threads: bool = Field(
        default=True,
        description="ONNX: time a one-row call with intra_op_threads and with one thread at load, and "
        "keep one thread unless the pool is clearly faster (a small model's call costs less than "
        "waking the pool).",
    )
    graph_optimization: Literal["disabled", "basic", "extended", "all"] = "all"
    prediction_log_capacity: int = Field(
        default=10_000, ge=1,
        description="Answered requests journalled and not yet in the database, at most (per worker "
        "process); requests wait for room when it is full.",
    )
    prediction_log_batch: int = Field(default=500, ge=1)
    prediction_log_flush_s: float = Field(default=0.5, gt=0)
    # -- adaptive batching (services/serving/batching/adaptive.py) --------------------------------------
    batching: bool = Field(
        default=True,
        description="Merge concurrent requests for one model version into one runtime call.",
    )
    max_batch_size: int = Field(
        default=64, ge=1,
        description="Most rows one merged runtime call carries; a larger request runs alone.",
    )
    max_batch_wait_ms: float = Field(
        default=2.0, ge=0,
        description="Longest a request waits for others to join its batch, and only while another "
        "call of the same version is running: an idle model runs a request at once.",
    )
    batching_overrides: dict[str, BatchingOverride] = Field(
        default_factory=dict,
        description='Per model: {"<model>": {"batching": false, "max_batch_size": 8, '
        '"max_batch_wait_ms": 5}}; JSON in SHIPYARD_SERVING_BATCHING_OVERRIDES.',
    )
    fast_lane: bool = Field(
        default=True,
        description="Take predict requests in the lean layer (fastlane/lane.py) in front of FastAPI, "
        "handed over by uvicorn's HTTP protocol without a task (fastlane/uvicorn_protocol.py); false: "
        "FastAPI's routes take them (same handlers and answers, more CPU per request).",
    )
    # -- processes and threads -----------------------------------------------------------------
    workers: int = Field(
        default=1, ge=1,
        description="Server processes sharing the port; each loads the models and runs its own "
        "follower and prediction-log shipper process.",
    )
    request_threads: int = Field(
        default=64, ge=1,
        description="Threads per process for model calls too costly to run on the event loop; "
        "concurrent ones of a version are what adaptive batching merges.",
    )
    gil_switch_interval_ms: float = Field(
        default=1.0, gt=0,
        description="Python's thread switch interval in the serving process (Python's default is 5 ms): "
        "how long a background thread may hold the GIL while a request "
        "waits for it; a shorter one trims the latency tail.",
    )
    gc_freeze: bool = Field(
        default=True,
        description="At startup, move the objects already allocated (imported modules, mostly) out of "
        "the garbage collector's sight (gc.freeze), so that its full passes stay short.",
    )
    # -- shutdown ------------------------------------------------------------------------------
    drain_grace_s: float = Field(
        default=5.0, ge=0,
        description="On SIGTERM, readiness answers 503 this long while requests are still served, "
        "so that load balancers stop sending; then uvicorn stops accepting and finishes in-flight ones.",
    )
    shutdown_timeout_s: int = Field(
        default=30, ge=1,
        description="How long in-flight requests may take to finish after the drain, before they are cut.",
    )

    def batching_for(self, model: str) -> BatchingPolicy:
        """The batching settings of ``model``: its override's fields, else the service-wide ones."""
        override = self.batching_overrides.get(model, BatchingOverride())
        wait_ms = self.max_batch_wait_ms if override.max_batch_wait_ms is None else override.max_batch_wait_ms
        return BatchingPolicy(
            enabled=self.batching if override.batching is None else override.batching,
            max_batch_size=override.max_batch_size or self.max_batch_size,
            max_wait_s=wait_ms / 1000,
        )
