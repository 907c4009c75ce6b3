from __future__ import annotations

import os
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shipyard_common.settings import ServiceSettings


def _default_intra_op_threads() -> int:
    # Several models and the request threads share the machine; one model may not take it all.
    return max(1, min(4, os.cpu_count() or 1))


class ServingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHIPYARD_SERVING_", extra="ignore")

    port: int = 8003
    reconcile_interval_s: float = Field(
        default=10, gt=0, description="Full check of every production alias; catches lost events."
    )
    failed_load_retry_s: float = Field(
        default=60, ge=0, description="How long a version that failed to load is left alone before a retry."
    )
    max_batch_rows: int = Field(default=1024, ge=1)
    intra_op_threads: int = Field(default_factory=_default_intra_op_threads, ge=1)
    graph_optimization: Literal["disabled", "basic", "extended", "all"] = "all"
    prediction_log_capacity: int = Field(
        default=10_000, ge=1, description="Requests waiting to be written; producers block when full."
    )
    prediction_log_batch: int = Field(default=500, ge=1)
    prediction_log_flush_s: float = Field(default=0.5, gt=0)
