"""Shipyard's Prefect flows, each served as a deployment (``pipelines.serve``) by ``shipyard up``:

- ``ingest``: read a CSV file → validate, version and push it as a dataset (``DataRepo.add``).
- ``train_and_deploy``: a dataset revision (or a file, ingested first) → a training job through the
  trainer API (cached on the spec's hash) → the new version and production scored on the same holdout
  rows → a promotion request the registry's gate judges (or, by policy, a direct ``staging`` alias).
  It never moves ``production`` itself: an approver does, by approving the request.
- ``retrain``: the same from a parent version and a reason, warm-started from the parent
  (``init_from``) where the framework allows.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

from pipelines.tasks import (
    PROMOTE_REASON,
    PipelineConfig,
    cached_train_model,
    describe_evaluation,
    evaluate,
    promote,
    read_csv,
    read_job,
    read_version,
    request_promotion,
    version_dataset,
)
from shipyard_common.settings import NO_TELEMETRY_ENV, PlatformSettings

DEFAULT_TIMEOUT_S = 1800.0
# The key of the artifact a run's result is kept in (flows persist no results): ``runs.read_result``.
RESULT_KEY = "shipyard-result"
STAGING = "staging"
# "request": ask for production (an approver decides); "staging": point the staging alias at the
# new version at once (the registry allows that to an admin token only).
Promotion = Literal["request", "staging"]
PROMOTIONS: tuple[str, ...] = ("request", "staging")
# Frameworks whose jobs can fine-tune from a registered version's weights (``init_from``).
WARM_START_FRAMEWORKS = frozenset({"pytorch", "transformers"})


def default_job_spec(
    *,
    model_name: str,
    dataset: str,
    rev: str,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The trainer's job spec for a tabular classifier (what ``make demo`` trains on breast_cancer).

    An MLP with hidden layers [64, 32], 30 epochs of Adam (lr 1e-3, batch 32, seed 0) on all
    columns but ``target``, 20% held out for validation, exported to ONNX. ``overrides`` is
    merged into it key by key, so ``{"training": {"epochs": 5}}`` changes only the epochs; a
    ``model`` of another ``type`` replaces the MLP's block whole (its options would not fit).
    """
    spec: dict[str, Any] = {
        "model_name": model_name,
        "framework": "pytorch",
        "model": {"type": "mlp", "hidden": [64, 32]},
        "data": {
            "dataset": dataset,
            "rev": rev,
            "task": "classification",
            "target": "target",
            "features": None,
            "validation_split": 0.2,
        },
        "training": {"epochs": 30, "batch_size": 32, "learning_rate": 0.001, "optimizer": "adam", "seed": 0},
        "resources": {"queue": "cpu"},
        "exports": ["onnx"],
    }
    overrides = dict(overrides or {})
    model = overrides.get("model")
    if isinstance(model, Mapping) and model.get("type", "mlp") != "mlp":
        spec["model"] = {}
    return deep_merge(spec, overrides)


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@flow(name="ingest", persist_result=False)
def ingest(name: str, csv_path: str, config: PipelineConfig | None = None) -> dict[str, Any]:
    """Read ``csv_path`` and add it as dataset ``name``: validated, versioned with DVC, pushed to the
    remote. Returns ``{"dataset", "rev", "rows"}``. A refused file fails the ``version_dataset``
    task with the validation's report as its message."""
    config = config or PipelineConfig.from_platform()
    frame: pd.DataFrame = read_csv(csv_path)
    rev = version_dataset(name, frame, config)
    return report_result({"dataset": name, "rev": rev, "rows": len(frame)})


def _check(promotion: str, dataset_rev: str | None, csv_path: str | None, *, need_one: bool = True) -> None:
    if promotion not in PROMOTIONS:
        raise ValueError(f"promotion must be one of {', '.join(PROMOTIONS)}, not {promotion!r}")
    if need_one and (dataset_rev is None) == (csv_path is None):
        raise ValueError("give the dataset as exactly one of dataset_rev= or csv_path=")
    if not need_one and dataset_rev is not None and csv_path is not None:
        raise ValueError("give the dataset as at most one of dataset_rev= or csv_path=")


def train_evaluate_promote(
    spec: dict[str, Any], config: PipelineConfig, *, promotion: str, reason: str, timeout_s: float,
    poll_interval_s: float,
) -> dict[str, Any]:
    """The steps ``train_and_deploy`` and ``retrain`` share, inside their flow run."""
    logger = get_run_logger()
    trained = cached_train_model(config)(
        spec, config, timeout_s=timeout_s, poll_interval_s=poll_interval_s, return_state=True
    )
    job = trained.result()
    cached = trained.name == "Cached"
    model, version = str(job.get("model_name") or spec["model_name"]), str(job["model_version"])
    if cached:
        logger.info("same spec, same dataset revision: reusing job %s (%s v%s), nothing trained",
                    job["id"], model, version)
    evaluation = evaluate(model, version, dict(job.get("spec") or spec), config)
    why = f"{reason}; {describe_evaluation(evaluation)}"
    result: dict[str, Any] = {
        "dataset_rev": spec["data"]["rev"], "job_id": str(job["id"]), "model_name": model,
        "model_version": version, "metrics": dict(job.get("metrics") or {}), "cached": cached,
        "evaluation": evaluation, "promotion": promotion,
    }
    if promotion == "request":
        result["request"] = request_promotion(model, version, config, reason=why)
        logger.info("asked for %s v%s as production (request #%s)", model, version, result["request"]["id"])
    else:
        result["promoted"] = promote(model, version, config, alias=STAGING, reason=why)
        logger.info("%s of %s → v%s", STAGING, model, version)
    return result


@flow(name="train_and_deploy", persist_result=False)
def train_and_deploy_flow(
    dataset_name: str,
    model_name: str,
    dataset_rev: str | None = None,
    csv_path: str | None = None,
    spec_overrides: dict[str, Any] | None = None,
    promotion: str = "request",
    reason: str = PROMOTE_REASON,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_interval_s: float = 1.0,
    config: PipelineConfig | None = None,
) -> dict[str, Any]:
    """Train ``model_name`` on dataset ``dataset_name`` at ``dataset_rev`` (or on ``csv_path``,
    ingested first), evaluate it against production on the same holdout rows and ask for production
    (``promotion="request"``) or point ``staging`` at it (``"staging"``, admin token).

    ``config`` is for in-process callers; a deployed run builds it from its process's environment
    (``SHIPYARD_*`` settings, ``SHIPYARD_API_TOKEN``).
    """
    _check(promotion, dataset_rev, csv_path)
    config = config or PipelineConfig.from_platform()
    rev = dataset_rev or ingest(dataset_name, str(csv_path), config)["rev"]
    spec = default_job_spec(model_name=model_name, dataset=dataset_name, rev=rev, overrides=spec_overrides)
    # Overrides may not move the job off the revision that was asked for.
    spec["data"]["dataset"], spec["data"]["rev"] = dataset_name, rev
    return report_result(train_evaluate_promote(spec, config, promotion=promotion, reason=reason,
                                                timeout_s=timeout_s, poll_interval_s=poll_interval_s))


@flow(name="retrain", persist_result=False)
def retrain_flow(
    model_name: str,
    parent_version: str,
    reason: str,
    dataset_rev: str | None = None,
    csv_path: str | None = None,
    spec_overrides: dict[str, Any] | None = None,
    promotion: str = "request",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_interval_s: float = 1.0,
    config: PipelineConfig | None = None,
) -> dict[str, Any]:
    """Retrain ``model_name`` from ``parent_version``: the parent's job spec on the same dataset, at
    ``dataset_rev``, or ``csv_path`` ingested, or else the parent's revision; warm-started from the
    parent (``init_from``) for PyTorch and Transformers jobs; then as ``train_and_deploy``, with
    ``reason`` and the parent named in the promotion request."""
    _check(promotion, dataset_rev, csv_path, need_one=False)
    config = config or PipelineConfig.from_platform()
    parent = read_version(model_name, str(parent_version), config)
    lineage = parent.get("lineage") or {}
    if not lineage.get("job_id"):
        raise ValueError(f"{model_name} v{parent_version} names no training job: nothing to retrain from")
    parent_spec = read_job(str(lineage["job_id"]), config).get("spec") or {}
    spec = deep_merge(parent_spec, spec_overrides or {})
    dataset = str(spec["data"]["dataset"])
    if csv_path is not None:
        rev = ingest(dataset, csv_path, config)["rev"]
    else:
        rev = dataset_rev or str(lineage.get("dataset_rev") or spec["data"]["rev"])
    spec["model_name"] = model_name
    spec["data"]["rev"] = rev
    if spec.get("framework", "pytorch") in WARM_START_FRAMEWORKS:
        spec["init_from"] = {"model_name": model_name, "version": str(parent_version)}
    else:
        spec.pop("init_from", None)
    get_run_logger().info("retraining %s from v%s on %s@%s: %s", model_name, parent_version, dataset,
                          rev[:12], reason)
    return report_result(train_evaluate_promote(spec, config, promotion=promotion,
                                                reason=f"retrain from v{parent_version}: {reason}",
                                                timeout_s=timeout_s, poll_interval_s=poll_interval_s))


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON: non-finite floats become null, anything else unknown its ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return str(value)


def report_result(result: dict[str, Any]) -> dict[str, Any]:
    """Keep a flow's result as an artifact of its run (key ``RESULT_KEY``, the JSON as data): runs
    persist no results, and whoever started the run over HTTP reads the outcome there (the trainer's
    ``GET /pipelines/runs/{id}`` answers it as ``result``). A failure to keep it is logged, never
    the run's failure: what the run did (a job, a version, a request) is done either way."""
    try:
        keep_result(json_safe(result))
    except Exception:
        get_run_logger().warning("the run's result could not be kept", exc_info=True)
    return result


@task(name="keep_result", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1, persist_result=False)
def keep_result(result: dict[str, Any]) -> None:
    """The artifact, written by a task so that it names a task run too: Prefect's artifact filter
    (``pipelines.runs.read_result``) finds only artifacts whose task run matches."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    task_run = context.task_run if context is not None else None
    artifact = ArtifactCreate(
        key=RESULT_KEY, type="json", description="The run's result (JSON).", data=result,
        flow_run_id=task_run.flow_run_id if task_run else None, task_run_id=task_run.id if task_run else None,
    )
    # The client itself: prefect.artifacts' helpers hand back an unawaited coroutine where a sync
    # flow runs inside an event loop, and then nothing is kept.
    with get_client(sync_client=True) as client:
        client.create_artifact(artifact=artifact)


@contextmanager
def prefect_api(platform: PlatformSettings | None = None) -> Iterator[None]:
    """Talk to the platform's Prefect server (``SHIPYARD_PREFECT_API_URL``, started by ``shipyard up``)
    in this block: flows run here are recorded there, and deployments are found there."""
    platform = platform or PlatformSettings()
    for key, value in NO_TELEMETRY_ENV.items():
        os.environ.setdefault(key, value)
    updates: dict[Any, Any] = {
        PREFECT_SERVER_ANALYTICS_ENABLED: False, PREFECT_API_URL: platform.prefect_api_url
    }
    with temporary_settings(updates=updates):
        yield


def frame_to_csv(frame: pd.DataFrame, platform: PlatformSettings, name: str) -> Path:
    """Keep a frame to ingest as a CSV file under the state dir (flows take files, not frames)."""
    text = frame.to_csv(index=False)
    folder = platform.state_dir.resolve() / "pipelines" / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.csv"
    if not path.exists():
        path.write_text(text)
    return path


def train_and_deploy(
    *,
    dataset_name: str,
    model_name: str,
    frame: pd.DataFrame | None = None,
    csv_path: str | Path | None = None,
    dataset_rev: str | None = None,
    spec_overrides: Mapping[str, Any] | None = None,
    platform: PlatformSettings | None = None,
    token: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_interval_s: float = 1.0,
    promotion: Promotion = "request",
    reason: str = PROMOTE_REASON,
) -> dict[str, Any]:
    """Run the flow ``train_and_deploy`` in this process, recorded by the platform's Prefect server.

    (``shipyard pipelines run train_and_deploy`` runs it in the deployments process instead.)

    Args:
        dataset_name: name of the dataset in the DVC repository.
        model_name: registered model name the trainer registers the new version under.
        frame / csv_path / dataset_rev: the data: exactly one of a frame or a CSV file (ingested
            first), or a revision already in the repository.
        spec_overrides: merged key by key into :func:`default_job_spec`, e.g.
            ``{"training": {"epochs": 5}, "model": {"hidden": [16]}}``.
        platform: where the services, the data repository and Prefect are (default: ``PlatformSettings()``).
        token: API token for the trainer and the registry (trainer or approver for ``"request"``,
            admin for ``"staging"``). Default ``SHIPYARD_API_TOKEN``, else the development admin token.
        timeout_s: how long to wait for the training job.
        poll_interval_s: how often to ask the trainer about the job.
        promotion: ``"request"`` (default: a promotion request for production, which an approver
            who is not the token's holder decides) or ``"staging"`` (the staging alias at once).
        reason: why, for the request (the holdout figures are added to it).

    Returns:
        ``{"dataset_rev", "job_id", "model_name", "model_version", "metrics", "cached", "evaluation",
        "promotion"}`` and ``"request"`` (id, state, gate, …) or ``"promoted"`` (the registry's answer).

    Raises:
        ValueError: the data is given in none or several ways, or ``promotion`` is unknown.
        pipelines.tasks.JobFailed: the job failed or was cancelled (with the job's error).
        pipelines.tasks.ServiceError: a service refused a request (after retries, if transient).
        TimeoutError: the job did not end within ``timeout_s``.
    """
    platform = platform or PlatformSettings()
    if sum(x is not None for x in (frame, csv_path, dataset_rev)) != 1:
        raise ValueError("give the dataset as exactly one of frame=, csv_path= or dataset_rev=")
    _check(promotion, None, None, need_one=False)
    if frame is not None:
        csv_path = frame_to_csv(frame, platform, dataset_name)
    config = PipelineConfig.from_platform(platform, token)
    with prefect_api(platform):
        return train_and_deploy_flow(
            dataset_name=dataset_name,
            model_name=model_name,
            dataset_rev=dataset_rev,
            csv_path=str(csv_path) if csv_path is not None else None,
            spec_overrides=dict(spec_overrides) if spec_overrides else None,
            promotion=promotion,
            reason=reason,
            timeout_s=timeout_s,
            poll_interval_s=poll_interval_s,
            config=config,
        )

