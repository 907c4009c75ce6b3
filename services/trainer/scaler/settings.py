"""The scaler's settings, read from ``SHIPYARD_SCALER_*`` (and the platform's ``SHIPYARD_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shipyard_common.settings import PlatformSettings

# Kubernetes mounts the pod's namespace here with its service-account token.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def pod_namespace(path: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The namespace this pod runs in (its service-account file), else ``default`` outside a cluster."""
    try:
        namespace = path.read_text().strip()
    except OSError:
        return "default"
    return namespace or "default"


class ScalerSettings(BaseSettings):
    """Which Deployment follows which queue, within what bounds, how often and how patiently."""

    model_config = SettingsConfigDict(env_prefix="SHIPYARD_SCALER_", extra="ignore")

    namespace: str = Field(default_factory=pod_namespace, min_length=1,
                           description="The Deployment's namespace; unset: the pod's own.")
    deployment: str = Field(min_length=1, description="The GPU worker Deployment to scale.")
    queue: str = Field(default="gpu", min_length=1, description="The spec queue its workers consume.")
    min_replicas: int = Field(default=0, ge=0, description="Workers kept even with nothing to do.")
    max_replicas: int = Field(default=1, ge=0, description="Most workers (GPUs) to start.")
    jobs_per_replica: int = Field(default=1, ge=1,
                                  description="Jobs one worker runs at once (its concurrency).")
    cooldown_s: float = Field(default=300, ge=0,
                              description="Seconds workers stay unneeded before they are removed.")
    interval_s: float = Field(default=15, gt=0, description="Seconds between two decisions.")
    request_timeout_s: float = Field(default=10, gt=0,
                                     description="Seconds one Kubernetes API call may take.")
    # The worker's metrics are on 8005; the scaler is a pod of its own, scraped on all its addresses.
    metrics_port: int = Field(default=8006, ge=0, le=65535, description="Port of its /metrics; 0: none.")
    metrics_host: str = "0.0.0.0"
    platform: PlatformSettings = Field(default_factory=PlatformSettings)

    @model_validator(mode="after")
    def _bounds_in_order(self) -> ScalerSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"SHIPYARD_SCALER_MIN_REPLICAS ({self.min_replicas}) is above "
                             f"SHIPYARD_SCALER_MAX_REPLICAS ({self.max_replicas})")
        return self
