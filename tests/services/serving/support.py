"""Helpers the serving tests share: a serving app on a free port, its predict and status calls, its metrics,
and a model trained by the real trainer for the tests that serve one.

Test modules import these from here, never from one another.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from services.serving.app import create_app
from services.serving.settings import ServingSettings
from services.trainer.app import create_app as create_trainer_app
from shipyard_common.auth import Role
from shipyard_common.lineage import PRODUCTION
from shipyard_common.settings import PlatformSettings
from tests.services.trainer.support import WorkerProcess, trainer_settings
from tests.support import auth, running_app, test_platform, wait_for

VIEWER = auth("viewer")
ROWS = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 2.0, -2.0], [0.0, 0.0, 0.0, 0.0]]
# Long enough that, within a test, only an event can make serving notice a promotion.
NO_RECONCILE = 300.0


@contextmanager
def serving(platform: PlatformSettings, **settings: Any) -> Iterator[str]:
    app = create_app(ServingSettings(platform=platform, **{"reconcile_interval_s": NO_RECONCILE, **settings}))
    with running_app(app) as base:
        # Ready once the registry's production models are loaded: the session's shared registry holds
        # other tests' models too (some with artifacts gone), each tried once, which takes a while on a
        # busy machine.
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, timeout=120, what="serving ready")
        yield base


def serving_platform(state: Path, *, redis_url: str, mlflow_server: str) -> PlatformSettings:
    """A platform on the session's Redis and MLflow with an events channel of its own: another module's
    promotions never reach this module's serving app."""
    platform = test_platform(state, redis_url=redis_url, mlflow_tracking_uri=mlflow_server)
    return platform.model_copy(update={"events_channel": f"test-events-{uuid.uuid4().hex[:10]}"})


def train_for_production(
    platform: PlatformSettings, specs: dict[str, dict[str, Any]], state: Path
) -> dict[str, dict[str, Any]]:
    """Train each spec through the trainer's API and a worker of its own, one after the other, then give
    each job's version its model's ``production`` alias: the jobs by key, each succeeded."""
    settings = trainer_settings(platform)
    worker = WorkerProcess(settings, state / "worker.log")
    try:
        with running_app(create_trainer_app(settings)) as trainer:
            jobs = {key: train(trainer, worker, spec) for key, spec in specs.items()}
    finally:
        worker.stop()
    uri = platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for key, job in jobs.items():
        client.set_registered_model_alias(specs[key]["model_name"], PRODUCTION, job["model_version"])
    return jobs


def predict(base: str, name: str, inputs: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/models/{name}/predict", json={"inputs": inputs}, headers=auth("viewer"), **kwargs
    )


def model_status(base: str, name: str) -> dict[str, Any]:
    response = httpx.get(f"{base}/v1/models/{name}", headers=auth("viewer"))
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def metric(base: str, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def train(base: str, worker: WorkerProcess, spec: dict[str, Any]) -> dict[str, Any]:
    """Submit ``spec`` to the trainer at ``base`` and wait for its ``worker`` to end the job: the job,
    which must have succeeded (else the worker's log says why)."""
    created = httpx.post(f"{base}/jobs", json=spec, headers=auth(Role.TRAINER))
    assert created.status_code == 201, created.text
    url = f"{base}/jobs/{created.json()['id']}"

    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = httpx.get(url, headers=VIEWER).json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    job: dict[str, Any] = wait_for(ended, timeout=600, interval=0.5, what="the training job to end")
    assert job["state"] == "succeeded", (job["error"], worker.log_tail())
    return job
