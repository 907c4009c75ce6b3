"""The steps of ``train_and_deploy`` as Prefect tasks.

Transient HTTP failures are retried by Prefect (``retries`` + ``retry_condition_fn``), not by
loops of our own; an answer that will not change on retry (4xx, a failed job) fails at once.
No task is cached: each one changes the platform, and a cached job id or revision would lie.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.states import State
from pydantic import BaseModel, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shipyard_common.datasets import DataRepo
from shipyard_common.lineage import PRODUCTION
from shipyard_common.settings import DEV_ADMIN_TOKEN, PlatformSettings

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
# Statuses that mean "the service did not handle this; ask again later".
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
PROMOTE_REASON = "train_and_deploy flow"


class PipelineSettings(BaseSettings):
    """What only a client of the platform needs: its API token (``SHIPYARD_API_TOKEN``)."""

    model_config = SettingsConfigDict(env_prefix="SHIPYARD_", extra="ignore")

    api_token: SecretStr = SecretStr(DEV_ADMIN_TOKEN)


class PipelineConfig(BaseModel):
    """Where the flow's tasks find the platform.

    A flow's parameters are stored by the Prefect API; this holds only what a task needs, and
    the token as a ``SecretStr`` so that it is stored masked. ``PlatformSettings`` would carry
    every server-side token along.
    """

    trainer_url: str
    registry_url: str
    data_repo: Path
    dvc_remote: Path
    token: SecretStr
    http_timeout_s: float = 30.0

    @classmethod
    def from_platform(
        cls, platform: PlatformSettings | None = None, token: str | SecretStr | None = None
    ) -> PipelineConfig:
        platform = platform or PlatformSettings()
        if token is None:
            secret = PipelineSettings().api_token
        else:
            secret = token if isinstance(token, SecretStr) else SecretStr(token)
        return cls(
            trainer_url=platform.trainer_url.rstrip("/"),
            registry_url=platform.registry_url.rstrip("/"),
            data_repo=platform.data_repo_path,
            dvc_remote=platform.dvc_remote_path,
            token=secret,
        )

    def client(self) -> httpx.Client:
        return httpx.Client(
            timeout=self.http_timeout_s,
            headers={"Authorization": f"Bearer {self.token.get_secret_value()}"},
        )


class ServiceError(RuntimeError):
    """A Shipyard service answered with an error; the message is the service's own."""

    def __init__(self, method: str, url: str, status: int, message: str) -> None:
        super().__init__(f"{method} {url} answered {status}: {message}")
        self.status = status
        self.message = message


class JobFailed(RuntimeError):
    """The training job ended without a model version."""


def checked_json(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise ServiceError(response.request.method, str(response.request.url), response.status_code, message)
    return response.json()


def _failure(state: State[Any]) -> BaseException | None:
    try:
        state.result()
    except BaseException as exc:  # the failed state re-raises what the task raised
        return exc
    return None


def retry_when_transient(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Retry on connection trouble and on answers that say "not now"."""
    exc = _failure(state)
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, ServiceError) and exc.status in RETRYABLE_STATUS


def retry_when_not_delivered(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a non-idempotent POST only when the service cannot have acted on it.

    After a read timeout or a 504 the job may exist already; a second POST would train twice.
    """
    exc = _failure(state)
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return True
    return isinstance(exc, ServiceError) and exc.status in {429, 502, 503}


@task(name="version_dataset", cache_policy=NO_CACHE, persist_result=False)
def version_dataset(name: str, data: pd.DataFrame | str | Path, config: PipelineConfig) -> str:
    """Version ``data`` (a frame, or the path of a CSV file) as dataset ``name``; return the git revision."""
    frame = data if isinstance(data, pd.DataFrame) else pd.read_csv(Path(data))
    version = DataRepo(config.data_repo, config.dvc_remote).add(name, frame)
    get_run_logger().info(
        "dataset %s: %d rows × %d columns at revision %s",
        name, version.rows, len(version.columns), version.rev,
    )
    return version.rev


@task(
    name="submit_job", cache_policy=NO_CACHE, persist_result=False,
    retries=4, retry_delay_seconds=[1, 2, 4, 8], retry_condition_fn=retry_when_not_delivered,
)
def submit_job(spec: dict[str, Any], config: PipelineConfig) -> str:
    """``POST /jobs`` on the trainer; return the job id."""
    with config.client() as client:
        job = checked_json(client.post(f"{config.trainer_url}/jobs", json=spec))
    get_run_logger().info("submitted job %s for model %s", job["id"], spec.get("model_name"))
    return str(job["id"])


def get_job(client: httpx.Client, config: PipelineConfig, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = checked_json(client.get(f"{config.trainer_url}/jobs/{job_id}"))
    return job


@task(
    name="wait_for_job", cache_policy=NO_CACHE, persist_result=False,
    retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=retry_when_transient,
)
def wait_for_job(
    job_id: str, config: PipelineConfig, *, timeout_s: float = 1800.0, poll_interval_s: float = 1.0
) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` until the job succeeds; return the job.

    Raises :class:`JobFailed` with the job's own error if it fails or is cancelled, and
    ``TimeoutError`` if it has not ended within ``timeout_s``.
    """
    logger = get_run_logger()
    deadline = time.monotonic() + timeout_s
    last_seen: tuple[Any, ...] = ()
    with config.client() as client:
        while True:
            job = get_job(client, config, job_id)
            state = job["state"]
            progress = job.get("progress") or {}
            seen = (state, progress.get("epoch"))
            if seen != last_seen:
                logger.info(
                    "job %s %s: epoch %s/%s, eta %s, metrics %s", job_id, state, progress.get("epoch"),
                    progress.get("epochs"), _eta(progress.get("eta_seconds")), job.get("metrics") or {},
                )
                last_seen = seen
            if state == "succeeded":
                if job.get("model_version") is None:
                    raise JobFailed(f"job {job_id} succeeded but registered no model version")
                return job
            if state in TERMINAL_STATES:
                raise JobFailed(f"job {job_id} {state}: {job.get('error') or 'no error given'}")
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {job_id} is still {state} after {timeout_s:g}s "
                    f"(epoch {progress.get('epoch')}/{progress.get('epochs')})"
                )
            time.sleep(poll_interval_s)


@task(
    name="promote", cache_policy=NO_CACHE, persist_result=False,
    retries=4, retry_delay_seconds=[1, 2, 4, 8], retry_condition_fn=retry_when_transient,
)
def promote(
    model: str, version: str, config: PipelineConfig, *, alias: str = PRODUCTION,
    reason: str = PROMOTE_REASON,
) -> dict[str, Any]:
    """Point ``alias`` of ``model`` at ``version`` at once, without a request (the registry lets only
    an admin do so, audits the move as direct and announces it)."""
    url = f"{config.registry_url}/models/{model}/versions/{version}/promote"
    with config.client() as client:
        answer: dict[str, Any] = checked_json(
            client.post(url, json={"alias": alias, "reason": reason})
        )
    get_run_logger().info(
        "%s of %s: version %s (was %s)", alias, model, version, answer.get("previous_version")
    )
    return answer


@task(
    name="request_promotion", cache_policy=NO_CACHE, persist_result=False,
    retries=4, retry_delay_seconds=[1, 2, 4, 8], retry_condition_fn=retry_when_not_delivered,
)
def request_promotion(
    model: str, version: str, config: PipelineConfig, *, reason: str = PROMOTE_REASON,
    alias: str = PRODUCTION,
) -> dict[str, Any]:
    """Ask the registry for ``alias`` → ``version`` (``POST /models/{name}/requests``); return the request.

    The request stays pending until an approver other than the token's holder decides it; the
    answer carries the model's gate verdict on it now (``gate``, None when no gate covers ``alias``).
    """
    url = f"{config.registry_url}/models/{model}/requests"
    with config.client() as client:
        request: dict[str, Any] = checked_json(
            client.post(url, json={"version": str(version), "alias": alias, "reason": reason})
        )
    gate = request.get("gate")
    get_run_logger().info(
        "request #%s: %s of %s → version %s, %s; gate: %s", request["id"], alias, model, version,
        request["state"], "none" if gate is None else gate.get("summary"),
    )
    return request


def _eta(seconds: float | None) -> str:
    return "unknown" if seconds is None else f"{seconds:.0f}s"
