from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shipyard_common.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHIPYARD_TRAINER_", extra="ignore")

    port: int = 8001
    # Prepended to the spec's queue name ("cpu" → "<prefix>cpu"), so that two stacks, or test
    # sessions, sharing one Redis database do not take each other's jobs.
    queue_prefix: str = ""
    # A running job whose row has not moved for this long is taken to have lost its worker,
    # and a redelivered task may take it over.
    stale_after_s: float = Field(default=600, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # How often the API re-sends jobs that were stored but never reached the broker.
    reconcile_interval_s: float = Field(default=30, gt=0)
    # A queued job sent this long ago whose message is neither waiting on its queue nor held by
    # a worker (a flushed or replaced Redis) is sent again by the same reconciler.
    lost_after_s: float = Field(default=60, gt=0)
    # How often a streaming ``GET /jobs/{id}/logs`` looks for new lines.
    log_poll_interval_s: float = Field(default=0.5, gt=0)
    # Set in images built without .git; otherwise the worker asks git.
    git_commit: str | None = None
    # Where jobs with ``model.type: plugin`` load their factory from: ``module:function`` runs
    # ``<plugin_dir>/<module>.py`` (that file only, never an import path). Unset: plugins are refused.
    plugin_dir: Path | None = None
    # Redis's default (1 h) would redeliver any job that trains longer than that to a second worker.
    # Tests shorten it (with the two below) so that a killed worker's job comes back within seconds.
    visibility_timeout_s: int = Field(default=6 * 3600, ge=1)
    # How often a worker looks for messages held longer than the visibility timeout by a lost worker.
    unacked_restore_interval_s: float = Field(default=10, gt=0)
    # Only every n-th of those looks scans Redis (kombu's ``unacked_restore_throttle``).
    unacked_restore_throttle: int = Field(default=10, ge=1)

    # A job whose MLflow calls find it down waits for it rather than failing at once: this many
    # waits, the first this long, each twice the last up to the cap; its progress says so meanwhile.
    # Each wait is at most half of stale_after_s, so that a waiting job is never taken for a lost one.
    mlflow_wait_retries: int = Field(default=5, ge=0, le=100)
    mlflow_wait_backoff_s: float = Field(default=5.0, gt=0)
    mlflow_wait_max_backoff_s: float = Field(default=60.0, gt=0)

    # The largest dataset file ``POST /datasets/{name}`` accepts (413 above it).
    dataset_max_bytes: int = Field(default=1 << 30, ge=1)

    def queue_name(self, queue: str) -> str:
        return f"{self.queue_prefix}{queue}"
