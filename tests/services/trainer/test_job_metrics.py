"""The trainer's job metrics, read from a real database (SQLite and PostgreSQL) and Redis at scrape
time, and the worker's own ``/metrics`` with GPU readings from ``nvidia-smi``."""

from __future__ import annotations

import json
import stat
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry

from services.trainer.api.metrics import JobCollector
from services.trainer.app import create_app
from services.trainer.jobs.tables import JobLogRecord, JobRecord
from services.trainer.settings import TrainerSettings
from services.trainer.worker.metrics import (
    GpuCollector,
    WorkerMetricsSettings,
    parse_nvidia_smi,
    read_gpus,
    serve_worker_metrics,
)
from shipyard_common.db import Database, utcnow
from tests.services.trainer.support import job_spec, trainer_settings
from tests.support import free_port, own_database_url, running_app, test_platform


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of this test's own: the metrics count every job in it."""
    return own_database_url(request, tmp_path, prefix="metrics")


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, db_url: str) -> TrainerSettings:
    return trainer_settings(test_platform(tmp_path / "state", redis_url=redis_url, db_url=db_url))


@pytest.fixture
def database(settings: TrainerSettings) -> Iterator[Database]:
    database = Database(settings.platform.database_url)
    database.create_tables()
    yield database
    database.dispose()


def add_job(database: Database, *, state: str, queue: str = "cpu", waited_s: float = 0.0,
            ran_s: float | None = None) -> str:
    """A job row as the API and a worker leave it; ``ran_s``: a worker started it that long before its end."""
    now = utcnow()
    job_id = str(uuid.uuid4())
    spec = job_spec(rev="0" * 40, resources__queue=queue)
    created = now - timedelta(seconds=waited_s + (ran_s or 0.0))
    with database.session() as session:
        session.add(JobRecord(id=job_id, state=state, spec=spec, progress={}, metrics={},
                              model_name="m", attempts=1, created_at=created, updated_at=now))
        if ran_s is not None:
            session.add(JobLogRecord(job_id=job_id, line=1, level="info", message=f"job {job_id} started",
                                     created_at=now - timedelta(seconds=ran_s)))
            session.add(JobLogRecord(job_id=job_id, line=2, level="info", message="epoch 1/1",
                                     created_at=now - timedelta(seconds=ran_s / 2)))
    return job_id


def scrape(database: Database, settings: TrainerSettings) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(JobCollector(database, settings))
    return registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_jobs_by_state_age_of_the_oldest_queued_and_ended_counts(database, settings):
    add_job(database, state="queued", waited_s=120)
    add_job(database, state="queued", waited_s=5)
    add_job(database, state="running", queue="gpu", ran_s=30)
    add_job(database, state="succeeded", ran_s=42)
    add_job(database, state="failed", ran_s=3)
    add_job(database, state="cancelled", waited_s=10)  # cancelled while queued: it never ran
    registry = scrape(database, settings)

    assert value(registry, "shipyard_training_jobs", queue="cpu", state="queued") == 2
    assert value(registry, "shipyard_training_jobs", queue="gpu", state="running") == 1
    assert value(registry, "shipyard_training_jobs", queue="gpu", state="queued") == 0
    assert 119 <= value(registry, "shipyard_training_queued_oldest_age_seconds", queue="cpu") < 180
    assert value(registry, "shipyard_training_queued_oldest_age_seconds", queue="gpu") == 0
    for state, count in (("succeeded", 1), ("failed", 1), ("cancelled", 1)):
        assert value(registry, "shipyard_training_jobs_finished_total", queue="cpu", state=state) == count
    assert value(registry, "shipyard_training_jobs_finished_total", queue="gpu", state="failed") == 0


def test_durations_run_from_the_workers_first_log_line_to_the_end(database, settings):
    add_job(database, state="succeeded", ran_s=42, waited_s=600)  # the wait is not run time
    add_job(database, state="succeeded", ran_s=400)
    add_job(database, state="failed", ran_s=3)
    add_job(database, state="cancelled", waited_s=10)
    registry = scrape(database, settings)

    def bucket(state: str, le: str) -> float | None:
        name = "shipyard_training_job_duration_seconds_bucket"
        return value(registry, name, queue="cpu", state=state, le=le)

    assert bucket("succeeded", "30.0") == 0
    assert bucket("succeeded", "60.0") == 1
    assert bucket("succeeded", "600.0") == 2
    assert bucket("succeeded", "+Inf") == 2
    assert value(registry, "shipyard_training_job_duration_seconds_sum", queue="cpu",
                 state="succeeded") == pytest.approx(442, abs=1)
    assert bucket("failed", "5.0") == 1
    # The job cancelled in the queue never ran: it is a finished job, not a duration.
    assert bucket("cancelled", "+Inf") == 0
    assert value(registry, "shipyard_training_job_duration_seconds_count", queue="gpu", state="failed") == 0


def test_messages_waiting_on_the_celery_queues(database, settings):
    client = redis.Redis.from_url(settings.platform.redis_url)
    name = settings.queue_name("cpu")
    try:
        client.rpush(name, json.dumps({"body": "a"}), json.dumps({"body": "b"}))
        client.rpush(f"{name}\x06\x163", json.dumps({"body": "c"}))
        registry = scrape(database, settings)  # a registry collects when asked for a value
        assert value(registry, "shipyard_training_queue_messages", queue="cpu") == 3
        assert value(registry, "shipyard_training_queue_messages", queue="gpu") == 0
    finally:
        client.delete(name, f"{name}\x06\x163")
        client.close()


def test_without_redis_the_queue_lengths_are_left_out_and_the_rest_stays(database, settings):
    away = settings.model_copy(update={"platform": settings.platform.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})})
    add_job(database, state="queued")
    registry = scrape(database, away)
    assert value(registry, "shipyard_training_queue_messages", queue="cpu") is None
    assert value(registry, "shipyard_training_jobs", queue="cpu", state="queued") == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_trainer_api_serves_them(database, settings):
    add_job(database, state="queued", queue="gpu")
    with running_app(create_app(settings)) as base:
        text = httpx.get(f"{base}/metrics", timeout=30).text
    assert 'shipyard_training_jobs{queue="gpu",state="queued"} 1.0' in text
    assert "shipyard_training_job_duration_seconds_bucket" in text
    assert "shipyard_http_requests_total" in text


# -- the worker ---------------------------------------------------------------------------------------

SMI_OUTPUT = "0, NVIDIA H100 80GB HBM3, 1024, 81559, 37\n1, NVIDIA H100 80GB HBM3, 0, 81559, [N/A]\n"


def fake_nvidia_smi(folder: Path, output: str, exit_code: int = 0) -> None:
    """An ``nvidia-smi`` that prints ``output`` when asked the query the collector asks."""
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in --query-gpu=index,name,memory.used,memory.total,utilization.gpu) ;; *) exit 9;; esac\n'
        f"printf '%s' '{output}'\nexit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_nvidia_smi_lines_become_readings():
    first, second = parse_nvidia_smi(SMI_OUTPUT)
    assert (first.index, first.memory_used_bytes, first.utilization_ratio) == ("0", 1024 * 2**20, 0.37)
    assert first.memory_total_bytes == 81559 * 2**20
    assert second.utilization_ratio is None
    assert parse_nvidia_smi("No devices were found\n") == []


def test_gpu_series_come_from_nvidia_smi_on_path(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, SMI_OUTPUT)
    monkeypatch.setenv("PATH", str(tmp_path))
    registry = CollectorRegistry()
    registry.register(GpuCollector())
    labels = {"gpu": "0", "name": "NVIDIA H100 80GB HBM3"}
    assert registry.get_sample_value("shipyard_gpu_memory_used_bytes", labels) == 1024 * 2**20
    assert registry.get_sample_value("shipyard_gpu_utilization_ratio", labels) == pytest.approx(0.37)
    assert registry.get_sample_value("shipyard_gpu_utilization_ratio", {**labels, "gpu": "1"}) is None


def test_no_gpu_series_without_nvidia_smi_or_when_it_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert read_gpus() == []
    fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed", exit_code=6)
    assert read_gpus() == []
    registry = CollectorRegistry()
    registry.register(GpuCollector())
    assert "shipyard_gpu" not in "".join(m.name for m in registry.collect())


def test_the_worker_serves_metrics_on_its_port_and_nothing_without_one():
    assert serve_worker_metrics(WorkerMetricsSettings(), queues=["cpu"], concurrency=1) is None
    port = free_port()
    settings = WorkerMetricsSettings(metrics_port=port)
    server = serve_worker_metrics(settings, queues=["cpu", "gpu"], concurrency=2)
    assert server is not None
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()
        server.server_close()
    assert 'shipyard_worker_info{concurrency="2",queues="cpu,gpu"} 1.0' in text
