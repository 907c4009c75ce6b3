"""The trainer's HTTP API on a real database (SQLite and PostgreSQL) and a real Redis broker."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis
from sklearn.datasets import load_breast_cancer

from services.trainer.app import create_app
from services.trainer.jobs.tables import JobRecord
from shipyard_common.auth import Role
from shipyard_common.datasets import DataRepo, DatasetVersion
from shipyard_common.db import Database
from shipyard_common.settings import PlatformSettings
from tests.services.trainer.support import job_spec, trainer_settings
from tests.support import auth, running_app

SMALL = load_breast_cancer(as_frame=True).frame.head(60)
# For the requests that run DVC, instead of httpx's default of 5 s, which the first add timed out on
# under load: a fresh repository's first add runs git init, dvc init, then dvc add and push, each dvc
# a Python process of its own (5.1 s on a 2-core machine at load 3.6; a second add took 2.8 s, a
# diff, which reads both versions through dvc.api, 1.1 s).
DVC_REQUEST_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataRepo, DatasetVersion]:
    """One versioned dataset for the module's tests: jobs naming it are accepted at submit."""
    root = tmp_path_factory.mktemp("trainer-data")
    repo = DataRepo(root / "repo", root / "remote")
    return repo, repo.add("breast_cancer", SMALL, tag="v1")


@pytest.fixture
def platform(platform: PlatformSettings, dataset: tuple[DataRepo, DatasetVersion]) -> PlatformSettings:
    repo, _ = dataset
    return platform.model_copy(update={"data_repo": repo.path, "dvc_remote": repo.remote})


@pytest.fixture
def rev(dataset: tuple[DataRepo, DatasetVersion]) -> str:
    return dataset[1].rev


@pytest.fixture
def db_settings(platform: PlatformSettings, db_url: str):
    return trainer_settings(platform.model_copy(update={"db_url": db_url}))


def queued_messages(settings, queue: str = "cpu") -> list[dict]:
    client = redis.Redis.from_url(settings.platform.redis_url)
    try:
        return [json.loads(raw) for raw in client.lrange(settings.queue_name(queue), 0, -1)]
    finally:
        client.close()


def test_submit_stores_the_job_and_queues_its_id(db_settings, rev):
    # The PostgreSQL database lives for the session; a model name of its own keeps the list ours.
    model_name = f"m-{uuid.uuid4().hex[:8]}"
    with running_app(create_app(db_settings)) as base:
        created = httpx.post(
            f"{base}/jobs", json=job_spec(rev=rev, model_name=model_name), headers=auth(Role.TRAINER)
        )
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["state"] == "queued" and job["model_version"] is None
        assert job["progress"] == {"epoch": 0, "epochs": 20, "step": 0, "steps": 0, "eta_seconds": None,
                               "resumed_from_epoch": None}
        assert job["spec"]["data"]["rev"] == rev and job["spec"]["spec_version"] == 1

        fetched = httpx.get(f"{base}/jobs/{job['id']}", headers=auth(Role.VIEWER))
        assert fetched.status_code == 200 and fetched.json() == job
        mine = {"model_name": model_name}
        listed = httpx.get(f"{base}/jobs", params=mine, headers=auth(Role.VIEWER)).json()
        assert [j["id"] for j in listed] == [job["id"]]
        failed = httpx.get(f"{base}/jobs", params={**mine, "state": "failed"}, headers=auth(Role.VIEWER))
        assert failed.json() == []

    # The database, not Redis, is the record; Redis carries only the id, on the spec's queue.
    database = Database(db_settings.platform.database_url)
    with database.session() as session:
        record = session.get(JobRecord, job["id"])
        assert record is not None and record.state == "queued" and record.enqueued_at is not None
    database.dispose()
    [message] = queued_messages(db_settings)
    assert message["headers"]["task"] == "shipyard.train"
    assert message["headers"]["argsrepr"] == repr([job["id"]])


def test_unknown_job_is_404_with_a_message(settings):
    with running_app(create_app(settings)) as base:
        response = httpx.get(f"{base}/jobs/does-not-exist", headers=auth(Role.VIEWER))
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "not_found" and "does-not-exist" in error["message"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"training__learning_rate": -0.001}, "training.learning_rate"),
        ({"training__optimizer": "lbfgs"}, "training.optimizer"),
        ({"data__validation_split": 1.5}, "data.validation_split"),
        ({"unexpected": True}, "unexpected"),
        ({"data__rev": "not-a-sha"}, "data.rev"),
        ({"data__rev": "v2"}, "data.rev"),
        ({"data__rev": "0" * 40}, "data.rev"),
        ({"data__dataset": "no_such_dataset"}, "data.dataset"),
    ],
)
def test_bad_spec_is_422_naming_the_field(settings, changes, field, rev):
    with running_app(create_app(settings)) as base:
        response = httpx.post(f"{base}/jobs", json=job_spec(rev=rev, **changes), headers=auth(Role.TRAINER))
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "validation_error" and field in error["message"]
        assert field in {d["field"] for d in error["details"]}
        assert httpx.get(f"{base}/jobs", headers=auth(Role.VIEWER)).json() == []


def test_submitting_needs_a_trainer_token(settings, rev):
    with running_app(create_app(settings)) as base:
        anonymous = httpx.post(f"{base}/jobs", json=job_spec(rev=rev))
        viewer = httpx.post(f"{base}/jobs", json=job_spec(rev=rev), headers=auth(Role.VIEWER))
        approver = httpx.post(f"{base}/jobs", json=job_spec(rev=rev), headers=auth(Role.APPROVER))
        admin = httpx.post(f"{base}/jobs", json=job_spec(rev=rev), headers=auth(Role.ADMIN))
        unread = httpx.get(f"{base}/jobs")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    assert viewer.status_code == 403 and "trainer" in viewer.json()["error"]["message"]
    assert approver.status_code == 403
    assert admin.status_code == 201
    assert unread.status_code == 401


def test_job_is_kept_when_the_broker_is_away_and_sent_once_it_is_back(platform, db_url, rev):
    from services.trainer.jobs import store

    away = trainer_settings(platform.model_copy(update={"db_url": db_url, "redis_url": "redis://127.0.0.1:1/0"}))
    with running_app(create_app(away)) as base:
        created = httpx.post(f"{base}/jobs", json=job_spec(rev=rev), headers=auth(Role.TRAINER), timeout=60)
        ready = httpx.get(f"{base}/readyz")
    # 201: the job exists; answering 503 would invite a second POST and a second training.
    assert created.status_code == 201, created.text
    assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("failed")
    job_id = created.json()["id"]

    back = trainer_settings(platform.model_copy(update={"db_url": db_url}))
    from services.trainer.worker.celery_app import TASK_NAME, make_celery

    celery = make_celery(back)
    database = Database(back.platform.database_url)
    try:
        def enqueue(job: str, queue: str) -> None:
            celery.send_task(TASK_NAME, args=[job], queue=back.queue_name(queue))

        assert store.send_unsent_jobs(database=database, enqueue=enqueue, older_than_s=0) == 1
        assert store.send_unsent_jobs(database=database, enqueue=enqueue, older_than_s=0) == 0
    finally:
        celery.close()
        database.dispose()
    [message] = queued_messages(back)
    assert message["headers"]["argsrepr"] == repr([job_id])


def test_health_and_readiness(settings):
    with running_app(create_app(settings)) as base:
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok", "service": "trainer"}
        ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_service_runs_as_a_module(platform, tmp_path):
    """``python -m services.trainer`` as the stack starts it: settings from the environment."""
    import os
    import subprocess
    import sys

    from tests.services.trainer.support import ROOT
    from tests.support import free_port, stop_process_group, wait_for

    port = free_port()
    env = {**os.environ, **platform.as_env(), "SHIPYARD_TRAINER_PORT": str(port), "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "trainer.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.trainer"], env=env, cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200,
                 timeout=60, what="the trainer process")
        listed = httpx.get(f"http://127.0.0.1:{port}/jobs", headers=auth(Role.VIEWER))
        assert listed.status_code == 200 and listed.json() == []
    finally:
        stop_process_group(process.pid, timeout=10)
        process.wait(timeout=10)


def test_a_job_records_the_full_sha_of_a_tag_short_sha_or_latest(settings, rev):
    with running_app(create_app(settings)) as base:
        for given in ("v1", rev[:7], "latest", rev):
            created = httpx.post(f"{base}/jobs", json=job_spec(rev=given), headers=auth(Role.TRAINER))
            assert created.status_code == 201, created.text
            assert created.json()["spec"]["data"]["rev"] == rev
        wine = job_spec(rev=rev, dataset="wine")
        missing = httpx.post(f"{base}/jobs", json=wine, headers=auth(Role.TRAINER))
    assert missing.status_code == 422
    message = missing.json()["error"]["message"]
    assert message == "invalid request: data.dataset: dataset 'wine' does not exist"


def test_dataset_routes(settings, tmp_path):
    from shipyard_common.datasets import DataRepo as Repo

    platform = settings.platform.model_copy(
        update={"data_repo": tmp_path / "repo", "dvc_remote": tmp_path / "remote"})
    fresh = trainer_settings(platform)
    csv = SMALL.to_csv(index=False).encode()
    parquet_body = SMALL.head(50).to_parquet()
    with running_app(create_app(fresh)) as base:
        viewer = httpx.post(f"{base}/datasets/bc", content=csv, headers=auth(Role.VIEWER))
        assert viewer.status_code == 403
        first = httpx.post(f"{base}/datasets/bc", params={"tag": "v1"}, content=csv,
                           headers={**auth(Role.TRAINER), "content-type": "text/csv"},
                           timeout=DVC_REQUEST_TIMEOUT_S)
        assert first.status_code == 201, first.text
        rules = httpx.put(f"{base}/datasets/bc/rules", content=b"rows: {min: 55}\n",
                          headers=auth(Role.TRAINER))
        assert rules.status_code == 200, rules.text
        small = httpx.post(f"{base}/datasets/bc", content=parquet_body,
                           headers={**auth(Role.TRAINER), "content-type": "application/vnd.apache.parquet"})
        assert small.status_code == 422
        [failure] = small.json()["error"]["details"]["failures"]
        assert failure["rule"] == "rows" and failure["figures"] == {"rows": 50, "min": 55, "max": None}
        second = httpx.post(f"{base}/datasets/bc", params={"format": "parquet"},
                            content=SMALL.head(58).to_parquet(), headers=auth(Role.TRAINER),
                            timeout=DVC_REQUEST_TIMEOUT_S)
        assert second.status_code == 201, second.text
        listed = httpx.get(f"{base}/datasets", headers=auth(Role.VIEWER)).json()
        assert [(d["name"], d["versions"], d["latest"]) for d in listed] == [("bc", 2, second.json()["rev"])]
        shown = httpx.get(f"{base}/datasets/bc/versions/v1", headers=auth(Role.VIEWER)).json()
        assert shown["rev"] == first.json()["rev"] and shown["rows"] == 60 and shown["models"] == []
        assert shown["stats"]["target"]["min"] == 0
        diff = httpx.get(f"{base}/datasets/bc/diff", params={"a": "v1", "b": "latest"},
                         headers=auth(Role.VIEWER), timeout=DVC_REQUEST_TIMEOUT_S)
        assert diff.json()["rows"] == {"a": 60, "b": 58, "delta": -2}
        unknown = httpx.get(f"{base}/datasets/bc/versions/nope", headers=auth(Role.VIEWER))
        assert unknown.status_code == 404 and "no revision 'nope'" in unknown.json()["error"]["message"]
        garbage = httpx.post(f"{base}/datasets/bc", params={"format": "parquet"}, content=b"nope",
                             headers=auth(Role.TRAINER))
        assert garbage.status_code == 400 and "parquet" in garbage.json()["error"]["message"]
    assert len(Repo(tmp_path / "repo", tmp_path / "remote").versions("bc")) == 2


def test_integer_parameters_past_a_bigint_are_422_not_500(db_settings, rev):
    # after=10**20 reached the database and overflowed its driver (a 500); every integer a route
    # takes is bounded by what a BIGINT holds, so FastAPI refuses it with its own message.
    with running_app(create_app(db_settings)) as base:
        job = httpx.post(f"{base}/jobs", json=job_spec(rev=rev), headers=auth(Role.TRAINER)).json()
        logs = f"{base}/jobs/{job['id']}/logs"
        for after in ("99999999999999999999", str(2**63), "-1"):
            response = httpx.get(logs, params={"after": after}, headers=auth(Role.VIEWER))
            assert response.status_code == 422, (after, response.text)
            error = response.json()["error"]
            assert error["code"] == "validation_error" and "after" in error["message"]
            assert {d["field"] for d in error["details"]} == {"query.after"}, error
        for after in (0, 5, 2**63 - 1):
            response = httpx.get(logs, params={"after": after}, headers=auth(Role.VIEWER))
            assert response.status_code == 200, response.text
            assert response.json()["lines"] == [] and response.json()["next_after"] == after
        huge = httpx.get(f"{base}/jobs", params={"limit": "99999999999999999999"}, headers=auth(Role.VIEWER))
        assert huge.status_code == 422, huge.text


@pytest.mark.parametrize(("header", "line"), [
    ("7", 7), (str(2**63 - 1), 2**63 - 1), (str(2**63), 0), ("9" * 5000, 0), ("²", 0), ("", 0), ("-3", 0),
])
def test_a_last_event_id_past_a_bigint_or_not_a_number_is_ignored(header, line):
    from services.trainer.api.jobs import _last_event_id

    assert _last_event_id(header) == line


# RFC 3339's date-time, which OpenAPI's format names: a time zone offset is not optional.
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def test_a_jobs_times_are_utc_with_their_offset(db_settings, rev):
    # Both databases hand the DateTime columns back naive; the API says they are UTC.
    with running_app(create_app(db_settings)) as base:
        before = datetime.now(UTC)
        created = httpx.post(f"{base}/jobs", json=job_spec(rev=rev), headers=auth(Role.TRAINER)).json()
        fetched = httpx.get(f"{base}/jobs/{created['id']}", headers=auth(Role.VIEWER)).json()
        listed = httpx.get(f"{base}/jobs", headers=auth(Role.VIEWER)).json()
        cancelled = httpx.post(f"{base}/jobs/{created['id']}/cancel", headers=auth(Role.TRAINER)).json()
        schema = httpx.get(f"{base}/openapi.json").json()["components"]["schemas"]["JobPublic"]
    answers = [created, fetched, *[j for j in listed if j["id"] == created["id"]], cancelled]
    assert len(answers) == 4
    for job in answers:
        for field in ("created_at", "updated_at"):
            assert RFC3339.match(job[field]), (field, job[field])
            moment = datetime.fromisoformat(job[field])
            assert moment.utcoffset() == timedelta(0)
            assert before - timedelta(seconds=5) <= moment <= datetime.now(UTC) + timedelta(seconds=5)
    assert schema["properties"]["created_at"]["format"] == "date-time"


README = Path(__file__).resolve().parents[3] / "README.md"
README_JOB_MARKER = "<!-- README example: POST /jobs"


def readme_job_example() -> dict:
    """The JSON of the README's ``POST /jobs`` example: the first ```json block after its marker."""
    text = README.read_text(encoding="utf-8")
    assert README_JOB_MARKER in text, f"README.md lost its marker {README_JOB_MARKER!r}"
    after = text.split(README_JOB_MARKER, 1)[1]
    block = re.search(r"^```json\n(.*?)^```", after, flags=re.S | re.M)
    assert block is not None, "no ```json block after the README's POST /jobs marker"
    return dict(json.loads(block.group(1)))


def test_the_readmes_job_example_is_accepted(settings):
    # The README's example once lacked data.task and was refused; it is submitted as written, to a
    # trainer whose data repository holds the dataset it names.
    example = readme_job_example()
    with running_app(create_app(settings)) as base:
        response = httpx.post(f"{base}/jobs", json=example, headers=auth(Role.TRAINER))
    assert response.status_code in (201, 202), response.text
    job = response.json()
    assert job["state"] == "queued" and job["model_name"] == example["model_name"]
    assert job["spec"]["data"]["dataset"] == example["data"]["dataset"]
