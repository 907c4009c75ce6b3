"""A Redis flushed while jobs wait: the API's reconciler sends them again and each trains once.

Real parts throughout: a Redis server, the trainer API under uvicorn, a Celery worker process,
the MLflow server. The Redis is a server of this test's own (the same redis-server binary, on a
free port): FLUSHDB on the shared test database would also take the messages of every other
test session using it (see tests/conftest.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_breast_cancer

from services.trainer.app import create_app
from services.trainer.jobs.tables import JobRecord
from services.trainer.worker.broker import on_broker_for
from shipyard_cli.stack import Stack
from shipyard_common.auth import Role
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database
from shipyard_common.lineage import TAG_JOB_ID
from tests.services.trainer.support import WorkerProcess, job_spec, trainer_settings
from tests.support import auth, free_port, running_app, stop_process_group, test_platform, wait_for

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server process for this test alone, stopped afterwards."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    stack = Stack(test_platform(tmp_path / "redis-state", redis_url=url))
    component = stack.redis_component()
    assert component is not None, f"something already answers at {url}"
    record = stack.start_component(component)
    try:
        stack.wait_ready(record, timeout=20)
        yield url
    finally:
        stop_process_group(record.pid, timeout=10)


def test_jobs_queued_when_redis_is_flushed_are_sent_again_and_each_trains_once(
    tmp_path: Path, own_redis: str, mlflow_server: str
):
    platform = test_platform(tmp_path / "state", redis_url=own_redis, mlflow_tracking_uri=mlflow_server)
    settings = trainer_settings(platform, reconcile_interval_s=0.3, lost_after_s=1)
    frame = load_breast_cancer(as_frame=True).frame
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add("breast_cancer", frame).rev
    on_broker = on_broker_for(settings)
    client = redis.Redis.from_url(own_redis)
    worker: WorkerProcess | None = None
    try:
        with running_app(create_app(settings)) as base:
            def get(job_id: str) -> dict[str, Any]:
                return httpx.get(f"{base}/jobs/{job_id}", headers=auth(Role.VIEWER)).json()

            # No worker runs: the messages wait on the queue.
            jobs: dict[str, str] = {}
            for _ in range(2):
                model_name = f"flushed-{uuid.uuid4().hex[:8]}"
                spec = job_spec(rev=rev, model_name=model_name, model={"type": "mlp", "hidden": [8]},
                                training__epochs=1, training__batch_size=64)
                created = httpx.post(f"{base}/jobs", json=spec, headers=auth(Role.TRAINER))
                assert created.status_code == 201, created.text
                assert created.json()["state"] == "queued"
                jobs[created.json()["id"]] = model_name
            assert on_broker() >= set(jobs)
            first_sent = _enqueued_at(settings, jobs)

            assert client.flushdb()
            assert client.dbsize() == 0 and not on_broker() & set(jobs)

            # Every 0.3 s, jobs sent over 1 s ago with no message on the broker are sent again.
            wait_for(lambda: on_broker() >= set(jobs), timeout=15, interval=0.1,
                     what="the reconciler to send the flushed jobs again")
            assert all(get(job_id)["state"] == "queued" for job_id in jobs)
            resent = _enqueued_at(settings, jobs)
            assert all(resent[job_id] > first_sent[job_id] for job_id in jobs), (first_sent, resent)

            worker = WorkerProcess(settings, tmp_path / "worker.log")

            def all_ended() -> bool:
                return all(get(job_id)["state"] in TERMINAL for job_id in jobs)

            try:
                wait_for(all_ended, timeout=45, interval=0.2, what="the re-sent jobs to end")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{[get(j) for j in jobs]}\n{worker.log_tail()}") from None
            finished = {job_id: get(job_id) for job_id in jobs}
    finally:
        if worker is not None:
            worker.stop()
        client.close()

    log = worker.log_tail(2000)
    registry = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    for job_id, model_name in jobs.items():
        job = finished[job_id]
        assert job["state"] == "succeeded", (job["error"], log)
        # Exactly once: one start in the worker's log, one registered version carrying the job id.
        assert log.count(f"job {job_id} started") == 1, log
        versions = registry.search_model_versions(f"tags.`{TAG_JOB_ID}` = '{job_id}'")
        assert [(v.name, v.version) for v in versions] == [(model_name, job["model_version"])]
        assert job["model_version"] == "1"


def _enqueued_at(settings: Any, jobs: dict[str, str]) -> dict[str, Any]:
    database = Database(settings.platform.database_url)
    try:
        with database.session() as session:
            return {job_id: session.get(JobRecord, job_id).enqueued_at for job_id in jobs}  # type: ignore[union-attr]
    finally:
        database.dispose()
