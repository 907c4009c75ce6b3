from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shipyard_common.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHIPYARD_REGISTRY_", extra="ignore")

    port: int = 8002
    audit_page_max: int = Field(default=1000, ge=1)
    page_size: int = Field(default=50, ge=1, le=1000, description="Models or versions per page by default.")
    # Serving's status and the monitor's verdict on a page: never wait longer than this for them.
    peer_timeout_s: float = Field(default=1.0, gt=0, le=30)
    # A read from MLflow that takes longer fails with a 503 rather than holding the caller.
    mlflow_timeout_s: float = Field(default=30.0, gt=0, le=600)
    # Web UI sessions: how long a sign-in lasts, and whether the cookie needs HTTPS (behind TLS).
    session_hours: float = Field(default=12, gt=0, le=24 * 30)
    secure_cookies: bool = False
    # How often MLflow's aliases are compared with the audit, so that an alias moved in MLflow directly
    # is recorded and alerted (services.registry.core.reconcile); 0: only on demand (POST /aliases/reconcile).
    alias_reconcile_interval_s: float = Field(default=60.0, ge=0, le=86_400)
