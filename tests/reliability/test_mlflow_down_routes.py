"""MLflow down, as the HTTP routes see it: the registry and the monitor on real parts (an MLflow
server of this module's own, PostgreSQL, Redis, a DVC repository), MLflow killed with SIGKILL.

Every route that needs MLflow answers the platform's 503 within seconds (MLflow's client retried a
refused connection for about 170 s before); the drift route answers from its last stored result, with
its age and why it is stale; once MLflow is back, the same routes answer as before: nothing was lost.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_breast_cancer

from services.monitor.app import create_app as create_monitor
from services.monitor.settings import MonitorSettings
from services.registry.app import create_app as create_registry
from services.registry.settings import RegistrySettings
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database, utcnow
from shipyard_common.lineage import (
    PRODUCTION,
    TAG_DATASET,
    TAG_DATASET_REV,
    TAG_FEATURES,
    TAG_TARGET,
    TAG_TASK,
)
from shipyard_common.records import PredictionRecord
from tests.reliability.conftest import KillableMlflow
from tests.support import auth, running_app, test_platform, wait_for

pytestmark = pytest.mark.reliability

# Within its timeout: seconds, not minutes (the default limits answer a refused MLflow in about 3 s).
BOUND_S = 15.0


@dataclass
class Stack:
    mlflow: KillableMlflow
    registry: str
    monitor: str
    model: str


def register(uri: str, rev: str, features: list[str]) -> str:
    """A model whose version 1 carries the trainer's lineage tags and is production."""
    client = MlflowClient(tracking_uri=uri)
    name = f"down-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    run = client.create_run(experiment_id="0")
    client.set_terminated(run.info.run_id)
    lineage = {TAG_DATASET: "breast_cancer", TAG_DATASET_REV: rev, TAG_FEATURES: json.dumps(features),
               TAG_TARGET: "target", TAG_TASK: "classification"}
    client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                tags=lineage)
    client.set_registered_model_alias(name, PRODUCTION, "1")
    return name


def log_predictions(db_url: str, model: str, rows: list[list[float]]) -> None:
    """Rows as serving logs them, answered a minute ago (one request of 10 rows each)."""
    database = Database(db_url)
    database.create_tables()
    with database.session() as session:
        for start in range(0, len(rows), 10):
            session.add(PredictionRecord(
                request_id=uuid.uuid4().hex, model=model, version="1", inputs=rows[start:start + 10],
                outputs=[[0.5, 0.5]] * len(rows[start:start + 10]), latency_ms=1.0,
                created_at=utcnow() - timedelta(minutes=1)))
    database.dispose()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, killable_mlflow: KillableMlflow, redis_url: str,
    postgres_url: str,
) -> Iterator[Stack]:
    """The registry and the monitor on this module's MLflow, and one model with a stored drift."""
    state = tmp_path_factory.mktemp("mlflow-down")
    # Short MLflow timeouts, so that a hung MLflow's 503 comes within this module's bound too (the
    # defaults, 10 s and 2 retries, answer a hung MLflow in about 33 s, a refused one in about 3 s).
    platform = test_platform(state, redis_url=redis_url, db_url=postgres_url,
                             mlflow_tracking_uri=killable_mlflow.uri, mlflow_request_timeout_s=3,
                             mlflow_request_retries=1)
    frame = load_breast_cancer(as_frame=True).frame
    features = [c for c in frame.columns if c != "target"]
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add("breast_cancer", frame).rev
    model = register(killable_mlflow.uri, rev, features)
    monitor_settings = MonitorSettings(platform=platform, loop_interval_s=0.5, window={"rows": 100},
                                       window_grace_s=0)
    with running_app(create_registry(RegistrySettings(platform=platform, mlflow_timeout_s=3))) as registry, \
            running_app(create_monitor(monitor_settings)) as monitor:
        log_predictions(postgres_url, model, frame[features].sample(100, random_state=0).to_numpy().tolist())
        wait_for(lambda: get(monitor, f"/drift/{model}").status_code == 200, timeout=120,
                 what="the monitor to store the model's drift")
        yield Stack(killable_mlflow, registry, monitor, model)


def get(base: str, path: str) -> httpx.Response:
    return httpx.get(f"{base}{path}", headers=auth("viewer"), timeout=300)


def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def assert_prompt_503(response: httpx.Response, elapsed: float, uri: str, what: str = "") -> None:
    assert elapsed < BOUND_S, f"{what} answered after {elapsed:.1f} s"
    assert response.status_code == 503, (what, response.text)
    message = response.json()["error"]["message"]
    assert f"the model registry (MLflow at {uri}) is not answering" in message, (what, message)


@pytest.fixture
def mlflow_down(stack: Stack) -> Iterator[Stack]:
    """MLflow killed for the test, and started again after it."""
    stack.mlflow.kill()
    try:
        yield stack
    finally:
        stack.mlflow.start()


def test_registry_routes_answer_503_within_seconds_and_the_same_as_before_once_mlflow_returns(mlflow_down):
    stack, name = mlflow_down, mlflow_down.model
    calls = {
        "model": lambda: get(stack.registry, f"/models/{name}"),
        "models": lambda: get(stack.registry, "/models"),
        "version": lambda: get(stack.registry, f"/models/{name}/versions/1"),
        "promote": lambda: httpx.post(f"{stack.registry}/models/{name}/versions/1/promote",
                                      json={"alias": "staging"}, headers=auth("admin"), timeout=300),
    }
    for what, call in calls.items():
        response, elapsed = timed(call)
        assert_prompt_503(response, elapsed, stack.mlflow.uri, what)

    stack.mlflow.start()
    model = get(stack.registry, f"/models/{name}")
    assert model.status_code == 200 and model.json()["aliases"].get(PRODUCTION) == "1", model.text
    promoted = httpx.post(f"{stack.registry}/models/{name}/versions/1/promote", json={"alias": "staging"},
                          headers=auth("admin"), timeout=60)
    assert promoted.status_code == 200, promoted.text


def test_drift_answers_its_stored_result_with_its_age_and_why_it_is_stale(mlflow_down):
    stack = mlflow_down
    before = get(stack.monitor, f"/drift/{stack.model}").json()

    drift, elapsed = timed(lambda: get(stack.monitor, f"/drift/{stack.model}"))
    assert elapsed < BOUND_S and drift.status_code == 200, drift.text
    assert drift.json()["window_id"] == before["window_id"] and drift.json()["age_s"] >= before["age_s"]
    # The loop notices on its next pass (every 0.5 s here, plus the refused calls' seconds).
    stale = wait_for(lambda: (d := get(stack.monitor, f"/drift/{stack.model}").json())["stale"] and d,
                     timeout=BOUND_S, what="the drift to be marked stale")
    assert stale["age_s"] > 0 and stale["window_id"] == before["window_id"]
    assert f"MLflow at {stack.mlflow.uri}) is not answering" in stale["stale_reason"], stale
    summary = {entry["model"]: entry for entry in get(stack.monitor, "/drift").json()}[stack.model]
    assert summary["stale"] and summary["age_s"] > 0 and summary["stale_reason"] == stale["stale_reason"]

    # Only a model the monitor never saw needs MLflow: a prompt 503, not a guess.
    unknown, elapsed = timed(lambda: get(stack.monitor, f"/drift/never-seen-{uuid.uuid4().hex[:6]}"))
    assert_prompt_503(unknown, elapsed, stack.mlflow.uri)
    policy, elapsed = timed(lambda: httpx.put(f"{stack.monitor}/policies/{stack.model}",
                                              json={"drift_share_above": 0.5}, headers=auth("approver"),
                                              timeout=300))
    assert_prompt_503(policy, elapsed, stack.mlflow.uri)

    stack.mlflow.start()
    fresh = wait_for(lambda: not (d := get(stack.monitor, f"/drift/{stack.model}").json())["stale"] and d,
                     timeout=60, what="the drift to be up to date again")
    assert fresh["window_id"] == before["window_id"] and fresh["stale_reason"] is None
    summary = {entry["model"]: entry for entry in get(stack.monitor, "/drift").json()}[stack.model]
    assert summary["window_id"] == before["window_id"] and not summary["stale"]


def test_a_hung_mlflow_is_a_503_within_the_timeout_and_drift_still_answers(stack):
    stack.mlflow.freeze()  # accepts connections, answers nothing: each call runs into its timeout
    try:
        for what, path, base in (("a registry read", f"/models/{stack.model}", stack.registry),
                                 ("an unknown model's drift", "/drift/never-seen-x", stack.monitor)):
            response, elapsed = timed(lambda path=path, base=base: get(base, path))
            assert_prompt_503(response, elapsed, stack.mlflow.uri, what)
            assert "timed out" in response.json()["error"]["message"], response.text
        drift, elapsed = timed(lambda: get(stack.monitor, f"/drift/{stack.model}"))
        assert drift.status_code == 200 and elapsed < 2, (elapsed, drift.text)
    finally:
        stack.mlflow.thaw()
    assert get(stack.registry, f"/models/{stack.model}").status_code == 200
