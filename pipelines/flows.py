"""``train_and_deploy``: version a dataset with DVC, train on it, and promote the result to production
(at once, as an admin) or ask for it (a promotion request an approver decides)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from prefect import flow
from prefect.logging import get_run_logger
from prefect.settings import (
    PREFECT_HOME,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    get_current_settings,
    temporary_settings,
)

from pipelines.tasks import (
    PROMOTE_REASON,
    PipelineConfig,
    promote,
    request_promotion,
    submit_job,
    version_dataset,
    wait_for_job,
)
from shipyard_common.settings import NO_TELEMETRY_ENV, PlatformSettings

DEFAULT_TIMEOUT_S = 1800.0
Promotion = Literal["direct", "request"]
PROMOTIONS: tuple[str, ...] = ("direct", "request")


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


@flow(name="train_and_deploy", persist_result=False)
def train_and_deploy_flow(
    *,
    dataset_name: str,
    model_name: str,
    config: PipelineConfig,
    frame: pd.DataFrame | None = None,
    csv_path: str | None = None,
    spec_overrides: dict[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_interval_s: float = 1.0,
    promotion: str = "direct",
    reason: str = PROMOTE_REASON,
) -> dict[str, Any]:
    """The Prefect flow itself; most callers want :func:`train_and_deploy`, which sets Prefect up."""
    if (frame is None) == (csv_path is None):
        raise ValueError("give the dataset as exactly one of frame= or csv_path=")
    if promotion not in PROMOTIONS:
        raise ValueError(f"promotion must be one of {', '.join(PROMOTIONS)}, not {promotion!r}")
    data: pd.DataFrame | str = frame if frame is not None else str(csv_path)
    rev = version_dataset(dataset_name, data, config)
    spec = default_job_spec(model_name=model_name, dataset=dataset_name, rev=rev, overrides=spec_overrides)
    # Overrides may not move the job off the revision that was just versioned.
    spec["data"]["dataset"], spec["data"]["rev"] = dataset_name, rev
    job_id = submit_job(spec, config)
    job = wait_for_job(job_id, config, timeout_s=timeout_s, poll_interval_s=poll_interval_s)
    registered_name = str(job.get("model_name") or spec["model_name"])
    version = str(job["model_version"])
    result: dict[str, Any] = {
        "dataset_rev": rev,
        "job_id": job_id,
        "model_name": registered_name,
        "model_version": version,
        "metrics": dict(job.get("metrics") or {}),
        "promotion": promotion,
    }
    if promotion == "direct":
        result["promoted"] = promote(registered_name, version, config, reason=reason)
        get_run_logger().info("deployed %s v%s to production: %s", registered_name, version,
                              result["metrics"])
    else:
        result["request"] = request_promotion(registered_name, version, config, reason=reason)
        get_run_logger().info("asked for %s v%s as production (request #%s): %s", registered_name, version,
                              result["request"]["id"], result["metrics"])
    return result


@contextmanager
def local_prefect(platform: PlatformSettings) -> Iterator[None]:
    """Run flows on Prefect's ephemeral local API, keeping its database under the state dir.

    With ``PREFECT_API_URL`` (a Prefect server) or ``PREFECT_HOME`` set by the caller, their
    choice stands. The ephemeral server is started once per process and outlives this block,
    so a later call with another state dir reuses the first one's Prefect database.
    """
    for key, value in NO_TELEMETRY_ENV.items():
        os.environ.setdefault(key, value)
    updates: dict[Any, Any] = {PREFECT_SERVER_ANALYTICS_ENABLED: False}
    if not get_current_settings().api.url and "PREFECT_HOME" not in os.environ:
        home = platform.state_dir.resolve() / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        updates[PREFECT_HOME] = home
    with temporary_settings(updates=updates):
        yield


def train_and_deploy(
    *,
    dataset_name: str,
    model_name: str,
    frame: pd.DataFrame | None = None,
    csv_path: str | Path | None = None,
    spec_overrides: Mapping[str, Any] | None = None,
    platform: PlatformSettings | None = None,
    token: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_interval_s: float = 1.0,
    promotion: Promotion = "direct",
    reason: str = PROMOTE_REASON,
) -> dict[str, Any]:
    """Version a dataset, train a model on it, and promote the new version to ``production``.

    Runs the Prefect flow ``train_and_deploy`` (:func:`train_and_deploy_flow`) on Prefect's
    local ephemeral API unless a Prefect server is configured.

    Two ways to promote (``promotion``):

    - ``"direct"`` (the default): the flow moves ``production`` to the new version itself
      (``POST …/promote``). The registry allows that to an **admin** token only and marks the
      move ``direct`` in the audit; with any other token the flow fails with a 403 after training.
    - ``"request"``: the flow asks for ``production`` (``POST /models/{name}/requests``, as the
      token's holder, trainer or approver, with ``reason``) and returns the pending request with
      the gate's verdict on it; production moves only once an approver who is not that person
      approves it (``shipyard models approve <id>``). ``make demo`` runs this way.

    Args:
        dataset_name: name of the dataset in the DVC repository (``data/<name>.csv``).
        model_name: registered model name the trainer registers the new version under.
        frame: the data, with a ``target`` column; or
        csv_path: a CSV file holding it (exactly one of ``frame`` and ``csv_path``).
        spec_overrides: merged key by key into :func:`default_job_spec`, e.g.
            ``{"training": {"epochs": 5}, "model": {"hidden": [16]}}``.
        platform: where the services and the data repository are (default: ``PlatformSettings()``).
        token: API token for the trainer and the registry: admin for ``"direct"``; trainer,
            approver or admin for ``"request"``. Default ``SHIPYARD_API_TOKEN``, else the
            development admin token.
        timeout_s: how long to wait for the training job.
        poll_interval_s: how often to ask the trainer about the job.
        promotion: ``"direct"`` or ``"request"``, as above.
        reason: why, for the audit row (and the approver, with ``"request"``).

    Returns:
        ``{"dataset_rev", "job_id", "model_name", "model_version", "metrics", "promotion"}`` and,
        with ``"direct"``, ``"promoted"`` (the registry's answer: version, previous_version, …);
        with ``"request"``, ``"request"`` (the pending request: id, state, gate, …).

    Raises:
        ValueError: the data is given both or neither way, or ``promotion`` is unknown.
        pipelines.tasks.JobFailed: the job failed or was cancelled (with the job's error).
        pipelines.tasks.ServiceError: a service refused a request (after retries, if transient).
        TimeoutError: the job did not end within ``timeout_s``.
    """
    platform = platform or PlatformSettings()
    config = PipelineConfig.from_platform(platform, token)
    with local_prefect(platform):
        return train_and_deploy_flow(
            dataset_name=dataset_name,
            model_name=model_name,
            config=config,
            frame=frame,
            csv_path=str(csv_path) if csv_path is not None else None,
            spec_overrides=dict(spec_overrides) if spec_overrides else None,
            timeout_s=timeout_s,
            poll_interval_s=poll_interval_s,
            promotion=promotion,
            reason=reason,
        )
