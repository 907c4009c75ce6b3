"""The steps of Shipyard's flows as Prefect tasks.

Transient failures (a service or MLflow unreachable, 429/502/503/504) are retried by Prefect
(``retries`` with growing delays + ``retry_condition_fn``), not by loops of our own; an answer that
will not change on retry (4xx, a failed job) fails at once. One task is cached: ``train_model``,
keyed on the job spec's hash (the spec names the dataset revision), so that a rerun with the same
inputs reuses the finished job instead of training again. Its results are kept under
``<state_dir>/pipelines/cache``, which every process running flows for one platform shares.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import State
from pydantic import BaseModel, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from shipyard_common.datasets import DataRepo, S3Remote
from shipyard_common.lineage import PRODUCTION, TAG_FEATURES, TAG_TARGET
from shipyard_common.mlflow_client import apply_mlflow_client_limits
from shipyard_common.settings import DEV_ADMIN_TOKEN, PlatformSettings

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
# Statuses that mean "the service did not handle this; ask again later".
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
PROMOTE_REASON = "train_and_deploy flow"
# Retries of a task that talks to a service: about a minute of waiting in all before it fails.
RETRY_DELAYS_S: list[float] = [1, 2, 4, 8, 16, 30]


class PipelineSettings(BaseSettings):
    """What only a client of the platform needs: its API token (``SHIPYARD_API_TOKEN``)."""

    model_config = SettingsConfigDict(env_prefix="SHIPYARD_", extra="ignore")

    api_token: SecretStr = SecretStr(DEV_ADMIN_TOKEN)


class PipelineConfig(BaseModel):
    """Where the flow's tasks find the platform.

    A flow's parameters are stored by the Prefect API; this holds only what a task needs, and
    the token as a ``SecretStr`` so that it is stored masked. ``PlatformSettings`` would carry
    every server-side token along. A deployed flow gets none: it builds its own from the
    environment of the process that serves it.
    """

    trainer_url: str
    registry_url: str
    mlflow_tracking_uri: str
    data_repo: Path
    dvc_remote: Path
    cache_dir: Path
    token: SecretStr
    http_timeout_s: float = 30.0
    #: The platform's S3 bucket as the data's DVC remote, when it names one (else ``dvc_remote``).
    s3: S3Remote | None = None

    @classmethod
    def from_platform(
        cls, platform: PlatformSettings | None = None, token: str | SecretStr | None = None
    ) -> PipelineConfig:
        """The config a flow's tasks get, from ``platform``. The tasks read MLflow directly (a version's
        files, its tags), so this process's MLflow client gets the platform's limits and, where MLflow
        asks for them, its credentials, as every service's does at start."""
        platform = platform or PlatformSettings()
        apply_mlflow_client_limits(platform)
        if token is None:
            secret = PipelineSettings().api_token
        else:
            secret = token if isinstance(token, SecretStr) else SecretStr(token)
        return cls(
            trainer_url=platform.trainer_url.rstrip("/"),
            registry_url=platform.registry_url.rstrip("/"),
            mlflow_tracking_uri=platform.mlflow_tracking_uri,
            data_repo=platform.data_repo_path,
            dvc_remote=platform.dvc_remote_path,
            cache_dir=platform.state_dir.resolve() / "pipelines" / "cache",
            token=secret,
            s3=S3Remote.from_settings(platform),
        )

    def repo(self) -> DataRepo:
        """The platform's data repository, with its remote (the S3 bucket, or the local folder)."""
        return DataRepo(self.data_repo, self.dvc_remote, s3=self.s3)

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


def is_transient(exc: BaseException | None) -> bool:
    """A failure that may pass if asked again: a connection failure, a "not now" answer, or MLflow
    unreachable or failing on its side."""
    if isinstance(exc, httpx.TransportError | ConnectionError):
        return True
    if isinstance(exc, ServiceError):
        return exc.status in RETRYABLE_STATUS
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        text = str(exc)
        return exc.get_http_status_code() >= 500 or "Max retries" in text or "onnection" in text
    return False


def retry_when_transient(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Retry on connection trouble and on answers that say "not now"."""
    return is_transient(_failure(state))


def retry_when_not_delivered(task: Any, task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a non-idempotent POST only when the service cannot have acted on it.

    After a read timeout or a 504 the job may exist already; a second POST would train twice.
    """
    exc = _failure(state)
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return True
    return isinstance(exc, ServiceError) and exc.status in {429, 502, 503}


@task(name="read_csv", cache_policy=NO_CACHE, persist_result=False)
def read_csv(path: str) -> pd.DataFrame:
    """Read the file to ingest (a missing or unreadable file fails here, naming it)."""
    frame = pd.read_csv(Path(path))
    get_run_logger().info("read %s: %d rows × %d columns", path, len(frame), len(frame.columns))
    return frame


@task(name="version_dataset", cache_policy=NO_CACHE, persist_result=False)
def version_dataset(name: str, data: pd.DataFrame | str | Path, config: PipelineConfig) -> str:
    """Validate, version and push ``data`` (a frame, or the path of a CSV file) as dataset ``name``
    (``DataRepo.add``: its refusal is this task's failure message); return the git revision."""
    frame = data if isinstance(data, pd.DataFrame) else pd.read_csv(Path(data))
    version = config.repo().add(name, frame)
    get_run_logger().info(
        "dataset %s: %d rows × %d columns at revision %s",
        name, version.rows, len(version.columns), version.rev,
    )
    return version.rev


@task(
    name="submit_job", cache_policy=NO_CACHE, persist_result=False,
    retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=retry_when_not_delivered,
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
    retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=retry_when_transient,
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
    retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=retry_when_transient,
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
    retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=retry_when_not_delivered,
)
def request_promotion(
    model: str, version: str, config: PipelineConfig, *, reason: str = PROMOTE_REASON,
    alias: str = PRODUCTION,
) -> dict[str, Any]:
    """Ask the registry for ``alias`` → ``version`` (``POST /models/{name}/requests``); return the request.

    The request stays pending until an approver other than the token's holder decides it; the
    answer carries the model's gate verdict on it now (``gate``, None when no gate covers ``alias``).
    Asking again is harmless: when the same request is pending already (a rerun), that one is
    returned; when ``alias`` names ``version`` already, ``{"id": None, "state": "in place", …}``.
    """
    url = f"{config.registry_url}/models/{model}/requests"
    with config.client() as client:
        try:
            request: dict[str, Any] = checked_json(
                client.post(url, json={"version": str(version), "alias": alias, "reason": reason})
            )
        except ServiceError as exc:
            if exc.status != 409:
                raise
            request = _existing_request(client, config, model, str(version), alias) or {}
            if not request:
                raise
    gate = request.get("gate")
    get_run_logger().info(
        "request #%s: %s of %s → version %s, %s; gate: %s", request["id"], alias, model, version,
        request["state"], "none" if gate is None else gate.get("summary"),
    )
    return request


def _existing_request(
    client: httpx.Client, config: PipelineConfig, model: str, version: str, alias: str
) -> dict[str, Any] | None:
    pending = checked_json(client.get(f"{config.registry_url}/requests",
                                      params={"model": model, "state": "pending"}))
    for request in pending:
        if str(request.get("version")) == version and request.get("alias") == alias:
            return dict(request)
    aliases = checked_json(client.get(f"{config.registry_url}/models/{model}")).get("aliases") or {}
    if str(aliases.get(alias)) == version:
        return {"id": None, "state": "in place", "version": version, "alias": alias, "gate": None}
    return None


def spec_hash(spec: dict[str, Any]) -> str:
    """A stable hash of a job spec (key order does not matter)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def training_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    spec = parameters["spec"]
    return f"train-{spec['model_name']}-{spec['data']['rev']}-{spec_hash(spec)[:24]}"


@task(
    name="train_model", cache_key_fn=training_cache_key, persist_result=True, result_serializer="json",
)
def train_model(
    spec: dict[str, Any], config: PipelineConfig, *, timeout_s: float = 1800.0, poll_interval_s: float = 1.0
) -> dict[str, Any]:
    """Submit the job and wait for it; return the finished job.

    Cached (see :func:`training_cache_key`): a second run with the same spec, hence the same
    dataset revision, returns the first job without a second one. A failed job is never cached.
    The flow sets the result storage (``config.cache_dir``) with ``with_options``.
    """
    job_id = submit_job(spec, config)
    job = wait_for_job(job_id, config, timeout_s=timeout_s, poll_interval_s=poll_interval_s)
    return {key: job.get(key) for key in ("id", "state", "model_name", "model_version", "metrics", "spec")}


def cached_train_model(config: PipelineConfig) -> Any:
    return train_model.with_options(result_storage=config.cache_dir)


@task(
    name="read_version", cache_policy=NO_CACHE, persist_result=False,
    retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_when_transient,
)
def read_version(model: str, version: str, config: PipelineConfig) -> dict[str, Any]:
    """``GET /models/{name}/versions/{version}`` on the registry."""
    with config.client() as client:
        found: dict[str, Any] = checked_json(
            client.get(f"{config.registry_url}/models/{model}/versions/{version}")
        )
    return found


@task(
    name="read_job", cache_policy=NO_CACHE, persist_result=False,
    retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_when_transient,
)
def read_job(job_id: str, config: PipelineConfig) -> dict[str, Any]:
    with config.client() as client:
        return get_job(client, config, job_id)


def holdout_rows(frame: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """The rows of ``frame`` the trainer held out for validation under ``spec``.

    The trainer splits with scikit-learn's ``train_test_split`` (``test_size`` = the spec's
    ``data.validation_split``, ``random_state`` = ``training.seed``, stratified on the target for
    classification); the same call on the row numbers picks the same rows.
    """
    from sklearn.model_selection import train_test_split

    data, training = spec["data"], spec.get("training") or {}
    target = frame[data.get("target", "target")]
    stratify = None
    if data.get("task", "classification") == "classification":
        classes = sorted(target.unique().tolist())
        stratify = target.map({label: i for i, label in enumerate(classes)}).to_numpy(dtype=np.int64)
    _, val_index = train_test_split(
        np.arange(len(frame)), test_size=data.get("validation_split", 0.2),
        random_state=training.get("seed", 0), stratify=stratify,
    )
    return frame.iloc[np.sort(val_index)]


def _download_version(config: PipelineConfig, model: str, version: str, folder: Path) -> Path:
    """The version's files, through a client bound to the platform's MLflow (never MLflow's
    process-wide tracking URI, which other code in the same process may rely on)."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    uri = config.mlflow_tracking_uri
    source = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(model, version).source
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(folder), tracking_uri=uri)
    return Path(local)


def score_version(
    model: str, version: str, rows: pd.DataFrame, config: PipelineConfig, tags: dict[str, str], task: str
) -> float | None:
    """Score one registered version's ONNX file on ``rows`` with ONNX Runtime: accuracy for a
    classifier, RMSE for a regressor. None when the version has no ONNX file or needs columns
    ``rows`` lack."""
    import onnxruntime as ort

    features = json.loads(tags.get(TAG_FEATURES) or "[]")
    target = tags.get(TAG_TARGET) or "target"
    if not features or any(c not in rows.columns for c in [*features, target]):
        return None
    with tempfile.TemporaryDirectory(prefix="shipyard-eval-") as folder:
        local = _download_version(config, model, version, Path(folder))
        found = sorted(local.rglob("model.onnx"))
        if not found:
            return None
        session = ort.InferenceSession(str(found[0]), providers=["CPUExecutionProvider"])
        inputs = {session.get_inputs()[0].name: rows[features].to_numpy(dtype=np.float32)}
        output = np.asarray(session.run(None, inputs)[0])
    truth = rows[target]
    if task == "classification":
        # The trainer numbers the classes in sorted order of their labels.
        index = {label: i for i, label in enumerate(sorted(truth.unique().tolist()))}
        return float((output.argmax(axis=1) == truth.map(index).to_numpy()).mean())
    return float(np.sqrt(np.mean((output.reshape(-1) - truth.to_numpy(dtype=np.float64)) ** 2)))


@task(
    name="evaluate", cache_policy=NO_CACHE, persist_result=False,
    retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_when_transient,
)
def evaluate(model: str, version: str, spec: dict[str, Any], config: PipelineConfig) -> dict[str, Any]:
    """Score the new version and the current production version on the same holdout rows (the new
    version's validation split of the dataset revision it was trained on).

    Returns ``{"metric": "accuracy" | "rmse", "rows", "candidate": {"version", "value"},
    "production": {"version", "value"} | None}``; production's value is None when it cannot be
    scored on these rows (other columns, no ONNX file).
    """
    frame = config.repo().read(spec["data"]["dataset"], spec["data"]["rev"])
    rows = holdout_rows(frame, spec)
    task = spec["data"].get("task", "classification")
    with config.client() as client:
        registered = checked_json(client.get(f"{config.registry_url}/models/{model}"))
        candidate = checked_json(client.get(f"{config.registry_url}/models/{model}/versions/{version}"))
        production_version = (registered.get("aliases") or {}).get(PRODUCTION)
        production = None
        if production_version is not None and str(production_version) != str(version):
            production = checked_json(
                client.get(f"{config.registry_url}/models/{model}/versions/{production_version}")
            )
    result: dict[str, Any] = {
        "metric": "accuracy" if task == "classification" else "rmse",
        "rows": len(rows),
        "candidate": {"version": str(version),
                      "value": score_version(model, str(version), rows, config, candidate["tags"], task)},
        "production": None,
    }
    if production is not None:
        result["production"] = {
            "version": str(production_version),
            "value": score_version(model, str(production_version), rows, config, production["tags"], task),
        }
    get_run_logger().info("holdout of %s (%d rows): %s", model, len(rows), describe_evaluation(result))
    return result


def describe_evaluation(evaluation: dict[str, Any]) -> str:
    """One line for a promotion request's reason: both versions' figures on the same rows."""
    metric, rows = evaluation["metric"], evaluation["rows"]
    candidate, production = evaluation["candidate"], evaluation["production"]

    def figure(entry: dict[str, Any]) -> str:
        value = entry["value"]
        return f"v{entry['version']} {metric} " + ("n/a" if value is None else f"{value:.4f}")

    text = f"holdout {rows} rows: {figure(candidate)}"
    return text + (f" vs production {figure(production)}" if production else " (no production version)")


def _eta(seconds: float | None) -> str:
    return "unknown" if seconds is None else f"{seconds:.0f}s"
