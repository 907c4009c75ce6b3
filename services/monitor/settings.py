from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shipyard_common.settings import ServiceSettings

MAX_WINDOW = 100_000


class MonitorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHIPYARD_MONITOR_", extra="ignore")

    port: int = 8004
    default_window: int = Field(default=500, ge=1, le=MAX_WINDOW)
    min_rows: int = Field(default=30, ge=1)
    refresh_interval_s: float = Field(default=30, gt=0)
    # Evidently's own default (0.5) needs half of all features to move before it calls the
    # dataset drifted; on a 30-feature model that hides a shift of 8 features, which is the
    # kind of change worth an alert. A quarter still needs several independent K-S rejections.
    drift_share: float = Field(default=0.25, gt=0, le=1)
    reference_cache_size: int = Field(default=16, ge=1)
