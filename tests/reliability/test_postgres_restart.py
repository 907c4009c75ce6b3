"""PostgreSQL restarted under a running service: the trainer's API (uvicorn, in this process) on a
private PostgreSQL cluster (``tests/reliability/postgres.py``) that the test stops with ``pg_ctl stop -m
fast`` and starts again, the way an operator restarts the database.

While it is down, every request that needs it is a 503 saying so within seconds (none hangs, none is
a 500); once it is back the very next request succeeds, on the same app: its pooled connections, all
dead, are replaced as they are checked out (``pool_pre_ping``), with no restart of the service.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sklearn.datasets import load_breast_cancer

from services.trainer.app import create_app
from services.trainer.settings import TrainerSettings
from shipyard_common.datasets import DataRepo
from shipyard_common.db import CONNECT_TIMEOUT_S
from tests.reliability.postgres import PrivatePostgres, why_unavailable
from tests.support import auth, free_port, missing_tool, running_app, test_platform

pytestmark = pytest.mark.reliability

# A refused connection fails at once; one that hangs gives up after libpq's connect_timeout.
ANSWER_BOUND_S = CONNECT_TIMEOUT_S + 3.0


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    reason = why_unavailable()
    if reason:
        missing_tool(reason)
    server = PrivatePostgres()
    try:
        server.init()
        yield server
    finally:
        server.destroy()


def spec(rev: str) -> dict[str, Any]:
    return {
        "model_name": f"pg-{uuid.uuid4().hex[:8]}", "framework": "pytorch",
        "model": {"type": "mlp", "hidden": [8]},
        "data": {"dataset": "breast_cancer", "rev": rev, "task": "classification", "target": "target",
                 "features": None, "validation_split": 0.2},
        "training": {"epochs": 1, "batch_size": 64, "learning_rate": 0.01, "optimizer": "adam", "seed": 0},
        "resources": {"queue": "cpu"}, "exports": ["onnx"],
    }


def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_requests_are_503_while_postgresql_restarts_and_succeed_after_without_a_service_restart(
    private_postgres: PrivatePostgres, tmp_path: Path, redis_url: str
):
    platform = test_platform(tmp_path / "state", redis_url=redis_url, db_url=private_postgres.url,
                             mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    settings = TrainerSettings(platform=platform, queue_prefix=f"pg-{uuid.uuid4().hex[:8]}-")
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add(
        "breast_cancer", load_breast_cancer(as_frame=True).frame).rev
    with running_app(create_app(settings)) as base, \
            httpx.Client(base_url=base, timeout=60) as client:
        viewer, trainer = auth("viewer"), auth("trainer")
        created = client.post("/jobs", json=spec(rev), headers=trainer)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        # Several pooled connections, all of which the restart will kill.
        with ThreadPoolExecutor(8) as pool:
            assert {r.status_code for r in pool.map(lambda _: client.get("/jobs", headers=viewer),
                                                   range(16))} == {200}

        private_postgres.stop("fast")
        calls = [lambda: client.get(f"/jobs/{job_id}", headers=viewer),
                 lambda: client.get("/jobs", headers=viewer),
                 lambda: client.post("/jobs", json=spec(rev), headers=trainer),
                 lambda: client.get("/readyz")]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(timed, calls * 4))
        for response, took in answers:
            assert response.status_code == 503, (response.request.url, response.text)
            assert took < ANSWER_BOUND_S, (response.request.url, took)
        body = answers[0][0].json()["error"]
        assert body["code"] == "unavailable"
        assert body["message"].startswith(
            f"the database (postgresql at 127.0.0.1:{private_postgres.port}/shipyard) is not answering"), body
        assert answers[3][0].json()["checks"]["database"] != "ok"

        private_postgres.start()
        # The first request after the restart is answered: the dead pooled connection is replaced.
        again, took = timed(lambda: client.get(f"/jobs/{job_id}", headers=viewer))
        assert again.status_code == 200 and again.json()["id"] == job_id, again.text
        assert took < ANSWER_BOUND_S
        with ThreadPoolExecutor(8) as pool:
            assert {r.status_code for r in pool.map(lambda _: client.get("/jobs", headers=viewer),
                                                   range(16))} == {200}
        assert client.post("/jobs", json=spec(rev), headers=trainer).status_code == 201
        assert client.get("/readyz").status_code == 200
        # Nothing was written during the outage: the two jobs made before and after it, no third.
        assert len(client.get("/jobs", headers=viewer).json()) == 2
