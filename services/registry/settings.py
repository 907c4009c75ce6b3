from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shipyard_common.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHIPYARD_REGISTRY_", extra="ignore")

    port: int = 8002
    # Reading every version's run costs one MLflow request per version; cap the parallel fan-out.
    metrics_fetch_concurrency: int = Field(default=8, ge=1, le=64)
    audit_page_max: int = Field(default=1000, ge=1)
