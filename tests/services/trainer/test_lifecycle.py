"""Cancel, lost broker messages, and job logs, on real parts: the API, Redis, a Celery worker, MLflow."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from sklearn.datasets import load_breast_cancer

from services.trainer.app import create_app
from services.trainer.settings import TrainerSettings
from services.trainer.worker.broker import job_ids_on_broker
from shipyard_common.auth import Role
from shipyard_common.datasets import DataRepo
from tests.services.trainer.support import WorkerProcess, job_spec, trainer_settings
from tests.support import auth, running_app, test_platform, wait_for

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str
) -> Iterator[dict[str, Any]]:
    """One API reconciling every half second, one dataset; the worker starts on demand."""
    state = tmp_path_factory.mktemp("trainer-lifecycle")
    platform = test_platform(state, redis_url=redis_url, mlflow_tracking_uri=mlflow_server)
    settings = trainer_settings(platform, reconcile_interval_s=0.5, lost_after_s=1, log_poll_interval_s=0.1)
    frame = load_breast_cancer(as_frame=True).frame
    version = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add("breast_cancer", frame)
    workers: list[WorkerProcess] = []

    def worker() -> WorkerProcess:
        if not workers:
            workers.append(WorkerProcess(settings, state / "worker.log"))
        return workers[0]

    try:
        with running_app(create_app(settings)) as base:
            yield {"settings": settings, "base": base, "rev": version.rev, "worker": worker}
    finally:
        for started in workers:
            started.stop()


def submit(stack: dict[str, Any], **changes: Any) -> str:
    spec = job_spec(rev=stack["rev"], model_name=f"life-{uuid.uuid4().hex[:8]}", **changes)
    created = httpx.post(f"{stack['base']}/jobs", json=spec, headers=auth(Role.TRAINER))
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def get(stack: dict[str, Any], job_id: str) -> dict[str, Any]:
    return httpx.get(f"{stack['base']}/jobs/{job_id}", headers=auth(Role.VIEWER)).json()


def wait_state(
    stack: dict[str, Any], job_id: str, states: tuple[str, ...], timeout: float = 60
) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def reached() -> dict[str, Any] | None:
        job = get(stack, job_id)
        seen.append(job)
        return job if job["state"] in states else None

    try:
        return wait_for(reached, timeout=timeout, interval=0.2, what=f"job {job_id} to be {states}")
    except AssertionError as exc:
        tail = stack["worker"]().log_tail() if stack.get("worker") else ""
        raise AssertionError(f"{exc}\nlast seen: {seen[-1:]}\nworker log:\n{tail}") from None


def logs(stack: dict[str, Any], job_id: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{stack['base']}/jobs/{job_id}/logs", params=params, headers=auth(Role.VIEWER))


def test_jobs_whose_messages_are_lost_are_sent_again_and_finish(stack):
    """Runs first, while no worker consumes: the messages wait on the queue, then vanish."""
    settings: TrainerSettings = stack["settings"]
    jobs = [submit(stack, training__epochs=2) for _ in range(2)]
    queue_names = [settings.queue_name("cpu"), settings.queue_name("gpu")]
    assert job_ids_on_broker(settings.platform.redis_url, queue_names) >= set(jobs)

    # Only this module's queue keys go: FLUSHDB would take the messages of every other test
    # session sharing this Redis database too. For these jobs the effect is the same.
    client = redis.Redis.from_url(settings.platform.redis_url)
    try:
        client.delete(*queue_names)
        assert not job_ids_on_broker(settings.platform.redis_url, queue_names) & set(jobs)
        # The reconciler (every 0.5 s, for jobs sent over 1 s ago) puts them back.
        wait_for(lambda: job_ids_on_broker(settings.platform.redis_url, queue_names) >= set(jobs),
                 timeout=15, what="the reconciler to send the lost jobs again")
    finally:
        client.close()

    worker = stack["worker"]()
    for job_id in jobs:
        job = wait_state(stack, job_id, TERMINAL, timeout=90)
        assert job["state"] == "succeeded", (job["error"], worker.log_tail())
        assert job["model_version"]
    # A job whose message waits on its queue is left alone: each job ran exactly once.
    assert sum(f"job {j} started" in worker.log_tail(400) for j in jobs) == 2


def test_cancel_a_queued_and_a_running_job(stack, mlflow_server):
    from mlflow.tracking import MlflowClient

    worker = stack["worker"]()
    long_job = submit(stack, training__epochs=5000)
    wait_state(stack, long_job, ("running",), timeout=60)
    wait_for(lambda: get(stack, long_job)["progress"]["epoch"] >= 1, timeout=60, what="an epoch to end")
    # With one worker busy, a second job waits on the queue.
    waiting = submit(stack, training__epochs=2)
    assert get(stack, waiting)["state"] == "queued"

    viewer = httpx.post(f"{stack['base']}/jobs/{waiting}/cancel", headers=auth(Role.VIEWER))
    assert viewer.status_code == 403
    cancelled = httpx.post(f"{stack['base']}/jobs/{waiting}/cancel", headers=auth(Role.TRAINER))
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"

    stopped = httpx.post(f"{stack['base']}/jobs/{long_job}/cancel", headers=auth(Role.TRAINER))
    assert stopped.status_code == 200 and stopped.json()["state"] == "cancelled"
    wait_for(lambda: f"job {long_job} is now cancelled elsewhere" in worker.log_tail(400),
             timeout=15, what="the worker to stop the running job")
    # The worker then receives the cancelled queued job and turns it away.
    wait_for(lambda: f"job {waiting} not run here: finished" in worker.log_tail(400),
             timeout=15, what="the worker to skip the cancelled queued job")

    for job_id in (long_job, waiting):
        job = get(stack, job_id)
        assert job["state"] == "cancelled" and job["model_version"] is None
        again = httpx.post(f"{stack['base']}/jobs/{job_id}/cancel", headers=auth(Role.TRAINER))
        assert again.status_code == 409
        error = again.json()["error"]
        assert error["code"] == "conflict" and "already ended as 'cancelled'" in error["message"]
    assert get(stack, long_job)["progress"]["epoch"] < 5000
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    name = get(stack, long_job)["model_name"]
    assert client.search_model_versions(f"name='{name}'") == []
    messages = [line["message"] for line in logs(stack, long_job).json()["lines"]]
    assert any("training stopped, no model registered" in m for m in messages), messages

    missing = httpx.post(f"{stack['base']}/jobs/no-such-job/cancel", headers=auth(Role.TRAINER))
    assert missing.status_code == 404 and "no-such-job" in missing.json()["error"]["message"]


def test_logs_can_be_read_in_pages_and_followed_as_a_stream(stack):
    stack["worker"]()
    job_id = submit(stack, training__epochs=3)

    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", f"{stack['base']}/jobs/{job_id}/logs", params={"stream": "true"},
                      headers=auth(Role.VIEWER), timeout=90) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name, data = "", ""
        for raw in response.iter_lines():
            if raw.startswith("event: "):
                name = raw[len("event: "):]
            elif raw.startswith("data: "):
                data = raw[len("data: "):]
            elif raw == "" and name:
                events.append((name, json.loads(data)))
                name, data = "", ""
    assert events and events[-1][0] == "end" and events[-1][1]["state"] == "succeeded"
    streamed = [body for name, body in events if name == "line"]

    page = logs(stack, job_id)
    assert page.status_code == 200
    body = page.json()
    assert body["state"] == "succeeded"
    lines = body["lines"]
    assert streamed == lines
    assert [line["line"] for line in lines] == list(range(1, len(lines) + 1))
    text = "\n".join(line["message"] for line in lines)
    assert f"job {job_id} started" in text and f"job {job_id} succeeded" in text
    assert "epoch 1/3:" in text and "epoch 3/3:" in text and "val_loss=" in text
    assert body["next_after"] == len(lines)

    rest = logs(stack, job_id, after=2).json()
    assert rest["lines"] == lines[2:]
    assert logs(stack, job_id, after=len(lines)).json()["lines"] == []
    assert logs(stack, "no-such-job").status_code == 404
    assert httpx.get(f"{stack['base']}/jobs/{job_id}/logs").status_code == 401


def test_cancel_and_logs_on_sqlite_and_postgresql(db_url):
    from services.trainer.api import service
    from services.trainer.jobs import store
    from services.trainer.jobs.schemas import JobCreate, JobState
    from shipyard_common.db import Database
    from shipyard_common.errors import Conflict, NotFound

    database = Database(db_url)
    database.create_tables()
    try:
        spec = JobCreate.model_validate(job_spec(rev="0" * 40))
        job = service.create_job(database=database, spec=spec, enqueue=lambda job_id, queue: None)
        for line, message in enumerate(["one", "two", "three"], start=1):
            store.append_log(database=database, job_id=job.id, line=line, level="info", message=message)
        assert store.last_log_line(database=database, job_id=job.id) == 3
        state, lines = service.read_logs(database=database, job_id=job.id, after=1)
        assert state == JobState.QUEUED and [x["message"] for x in lines] == ["two", "three"]

        assert service.cancel_job(database=database, job_id=job.id).state == JobState.CANCELLED
        with pytest.raises(Conflict, match="already ended as 'cancelled'"):
            service.cancel_job(database=database, job_id=job.id)
        with pytest.raises(NotFound):
            service.cancel_job(database=database, job_id="nope")
        with pytest.raises(NotFound):
            service.read_logs(database=database, job_id="nope")
    finally:
        database.dispose()
