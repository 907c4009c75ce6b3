"""MLflow down, as a training job sees it: the trainer's API, real Celery worker processes, PostgreSQL,
Redis, a DVC repository and an MLflow server of this module's own, killed with SIGKILL.

A job that finds MLflow down does not sit ``running`` at epoch 0 in silence (it did for 4 minutes,
then failed): it waits with a bounded backoff and says so in its ``detail`` and its log, then trains
and registers once MLflow is back, or fails saying why once its retries are spent.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_breast_cancer

from services.trainer.app import create_app
from services.trainer.settings import TrainerSettings
from shipyard_common.datasets import DataRepo
from shipyard_common.lineage import TAG_JOB_ID
from tests.reliability.conftest import KillableMlflow, Worker
from tests.support import auth, running_app, test_platform, wait_for

pytestmark = pytest.mark.reliability

TERMINAL = ("succeeded", "failed", "cancelled")
# A job says that it waits within seconds of finding MLflow down.
BOUND_S = 15.0
# From the submit: a worker's first job imports torch and reads its data before it touches MLflow,
# which on a loaded machine takes up to half a minute of its own.
JOB_BOUND_S = BOUND_S + 30
# The patient trainer's waits: 1 s, then 2 s each, 30 of them (59 s in all, more than MLflow takes to
# start again on a loaded machine); a wait of 2 s at most, so that the job goes on within 2 s of
# MLflow answering again.
PATIENT_RETRIES = 30
# Epochs of the job that loses MLflow mid-training: killed once epoch 2 is reported, MLflow is gone
# long before the ten epochs left (over a hundred steps each at batch size 4) are done.
MID_TRAINING_EPOCHS = 12


@dataclass
class Trainer:
    """One trainer API and its worker, on a queue of their own, with their own patience for MLflow."""

    base: str
    worker: Worker
    settings: TrainerSettings


@pytest.fixture(scope="module")
def trainers(
    tmp_path_factory: pytest.TempPathFactory, killable_mlflow: KillableMlflow, redis_url: str,
    postgres_url: str,
) -> Iterator[dict[str, Any]]:
    """A patient trainer (PATIENT_RETRIES waits, up to 2 s each: MLflow has time to come back) and a
    brief one (2 waits of 1 s: it gives up at once), and a versioned dataset."""
    state = tmp_path_factory.mktemp("mlflow-down-jobs")
    # Each refused call fails at once, so that the job's own backoff is all the waiting there is.
    platform = test_platform(state, redis_url=redis_url, db_url=postgres_url,
                             mlflow_tracking_uri=killable_mlflow.uri, mlflow_request_retries=0)
    frame = load_breast_cancer(as_frame=True).frame
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add("breast_cancer", frame).rev
    patience = {"patient": (PATIENT_RETRIES, 1.0, 2.0), "brief": (2, 1.0, 1.0)}
    made: dict[str, TrainerSettings] = {
        name: TrainerSettings(platform=platform, queue_prefix=f"rel-{name}-{uuid.uuid4().hex[:8]}-",
                              mlflow_wait_retries=retries, mlflow_wait_backoff_s=backoff,
                              mlflow_wait_max_backoff_s=cap)
        for name, (retries, backoff, cap) in patience.items()
    }
    workers = {name: Worker(settings, state / f"{name}-worker.log") for name, settings in made.items()}
    try:
        with running_app(create_app(made["patient"])) as patient, \
                running_app(create_app(made["brief"])) as brief:
            yield {"rev": rev, "patient": Trainer(patient, workers["patient"], made["patient"]),
                   "brief": Trainer(brief, workers["brief"], made["brief"])}
    finally:
        for worker in workers.values():
            worker.stop()


def submit(trainer: Trainer, rev: str, *, epochs: int = 2, batch_size: int = 64) -> str:
    spec = {
        "model_name": f"down-{uuid.uuid4().hex[:8]}", "framework": "pytorch",
        "model": {"type": "mlp", "hidden": [16]},
        "data": {"dataset": "breast_cancer", "rev": rev, "task": "classification", "target": "target",
                 "features": None, "validation_split": 0.2},
        "training": {"epochs": epochs, "batch_size": batch_size, "learning_rate": 0.01, "optimizer": "adam",
                     "seed": 0},
        "resources": {"queue": "cpu"}, "exports": ["onnx"],
    }
    created = httpx.post(f"{trainer.base}/jobs", json=spec, headers=auth("trainer"), timeout=30)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def follow(trainer: Trainer, job_id: str, until: Any, *, timeout: float, seen: list[dict[str, Any]]) -> Any:
    """Poll the job until ``until(job)`` is truthy; every answer is kept in ``seen``."""

    def look() -> Any:
        job = httpx.get(f"{trainer.base}/jobs/{job_id}", headers=auth("viewer"), timeout=30).json()
        seen.append(job)
        return until(job) and job

    try:
        return wait_for(look, timeout=timeout, interval=0.1, what=f"job {job_id}")
    except AssertionError as exc:
        tail = trainer.worker.log_tail()
        raise AssertionError(f"{exc}\nlast seen: {seen[-1:]}\nworker log:\n{tail}") from None


def log_lines(trainer: Trainer, job_id: str) -> list[str]:
    answer = httpx.get(f"{trainer.base}/jobs/{job_id}/logs", headers=auth("viewer"), timeout=30).json()
    return [line["message"] for line in answer["lines"]]


def test_a_job_waits_for_mlflow_says_so_and_trains_once_it_is_back(trainers, killable_mlflow):
    trainer: Trainer = trainers["patient"]
    killable_mlflow.kill()
    seen: list[dict[str, Any]] = []
    started = time.monotonic()
    job_id = submit(trainer, trainers["rev"])
    waiting = follow(trainer, job_id, lambda job: job["detail"], timeout=60, seen=seen)
    said_so = time.monotonic() - started
    killable_mlflow.start()

    assert waiting["state"] == "running" and waiting["progress"]["epoch"] == 0, waiting
    assert waiting["detail"].startswith(f"waiting for MLflow at {killable_mlflow.uri}: retry "), waiting
    assert f" of {PATIENT_RETRIES} in " in waiting["detail"], waiting
    assert "(connection refused)" in waiting["detail"], waiting
    # The first wait is shown within seconds of the job's start (importing torch, reading the data).
    assert said_so < JOB_BOUND_S, f"the job said it waits only after {said_so:.1f} s"

    job = follow(trainer, job_id, lambda job: job["state"] in TERMINAL, timeout=180, seen=seen)
    assert job["state"] == "succeeded" and job["detail"] is None and job["error"] is None, job
    assert job["progress"]["epoch"] == 2 and job["model_version"] == "1", job
    # Nothing lost, nothing twice: one version, made by this job, from a finished run.
    client = MlflowClient(tracking_uri=killable_mlflow.uri)
    versions = client.search_model_versions(f"name = '{job['model_name']}'")
    assert [(v.version, v.tags[TAG_JOB_ID]) for v in versions] == [("1", job_id)]
    assert client.get_run(job["mlflow_run_id"]).info.status == "FINISHED"
    lines = log_lines(trainer, job_id)
    first_wait = f"waiting for MLflow at {killable_mlflow.uri}: retry 1 of {PATIENT_RETRIES}"
    assert any(line.startswith(first_wait) for line in lines), lines
    assert any("answers again" in line for line in lines), lines


def test_a_job_that_loses_mlflow_mid_training_waits_with_its_progress_and_finishes(trainers, killable_mlflow):
    trainer: Trainer = trainers["patient"]
    killable_mlflow.start()
    seen: list[dict[str, Any]] = []
    job_id = submit(trainer, trainers["rev"], epochs=MID_TRAINING_EPOCHS, batch_size=4)
    follow(trainer, job_id, lambda job: job["progress"]["epoch"] >= 2, timeout=90, seen=seen)
    killable_mlflow.kill()
    # The next epoch's metrics (or, had training ended, the model's upload or its registration) wait.
    waiting = follow(trainer, job_id, lambda job: job["detail"], timeout=BOUND_S, seen=seen)
    killable_mlflow.start()

    assert waiting["state"] == "running" and waiting["progress"]["epoch"] >= 2, waiting
    assert waiting["detail"].startswith(f"waiting for MLflow at {killable_mlflow.uri}: retry "), waiting
    job = follow(trainer, job_id, lambda job: job["state"] in TERMINAL, timeout=180, seen=seen)
    assert job["state"] == "succeeded" and job["detail"] is None, job
    assert job["progress"]["epoch"] == MID_TRAINING_EPOCHS, job
    client = MlflowClient(tracking_uri=killable_mlflow.uri)
    assert [v.version for v in client.search_model_versions(f"name = '{job['model_name']}'")] == ["1"]
    # Every epoch's metrics reached the run, the one logged across the outage too.
    assert len(client.get_metric_history(job["mlflow_run_id"], "val_accuracy")) == MID_TRAINING_EPOCHS


def test_a_job_whose_mlflow_does_not_come_back_fails_saying_why(trainers, killable_mlflow):
    trainer: Trainer = trainers["brief"]
    killable_mlflow.kill()
    seen: list[dict[str, Any]] = []
    started = time.monotonic()
    job_id = submit(trainer, trainers["rev"])
    job = follow(trainer, job_id, lambda job: job["state"] in TERMINAL, timeout=90, seen=seen)
    elapsed = time.monotonic() - started

    assert job["state"] == "failed" and job["detail"] is None, job
    assert job["error"].startswith(
        f"the model registry (MLflow at {killable_mlflow.uri}) is not answering: connection refused; "
        "gave up after 2 retries over "
    ), job["error"]
    # Two waits of 1 s, after the job's start (torch imported, the data read): seconds, not minutes.
    assert elapsed < JOB_BOUND_S, f"the job failed only after {elapsed:.1f} s"
    details = {j["detail"] for j in seen if j["detail"]}
    assert any("retry 1 of 2 in 1 s (connection refused)" in d for d in details), details
