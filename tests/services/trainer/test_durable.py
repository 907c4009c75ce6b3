"""Durable training on real parts: a worker killed mid-job, and another that resumes its checkpoint."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_breast_cancer

from services.trainer.app import create_app
from shipyard_common.auth import Role
from shipyard_common.datasets import DataRepo
from shipyard_common.lineage import TAG_JOB_ID
from shipyard_common.settings import PlatformSettings
from tests.services.trainer.support import job_spec, trainer_settings
from tests.support import auth, running_app, wait_for

# Enough epochs that the kill, made once epoch 3 is reported, lands mid-training: at batch size 4 an
# epoch is over a hundred steps, so the nine left take far longer than the 0.1 s poll and the kill.
EPOCHS = 12


def test_a_job_whose_worker_is_killed_resumes_from_its_checkpoint(
    platform: PlatformSettings, start_worker: Any, tmp_path: Path
):
    # Quick takeover: a row silent for 2 s is stale, and unacked messages come back after 3 s.
    settings = trainer_settings(
        platform, stale_after_s=2, visibility_timeout_s=3, unacked_restore_interval_s=0.5,
        unacked_restore_throttle=1,
    )
    frame = load_breast_cancer(as_frame=True).frame
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add("breast_cancer", frame).rev
    model_name = f"durable-{uuid.uuid4().hex[:8]}"
    spec = job_spec(rev=rev, model_name=model_name, training__epochs=EPOCHS, training__batch_size=4)
    first = start_worker(settings)
    with running_app(create_app(settings)) as base:
        created = httpx.post(f"{base}/jobs", json=spec, headers=auth(Role.TRAINER))
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        def get() -> dict[str, Any]:
            return httpx.get(f"{base}/jobs/{job_id}", headers=auth(Role.VIEWER)).json()

        try:
            running = wait_for(lambda: (job := get())["progress"]["epoch"] >= 3 and job, timeout=60,
                               interval=0.1, what="epoch 3")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{first.log_tail()}") from None
        assert running["state"] == "running" and running["progress"]["epoch"] < EPOCHS, running
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        killed_at = get()["progress"]["epoch"]
        time.sleep(0.5)
        assert get()["progress"]["epoch"] == killed_at  # nobody trains it now

        second = start_worker(settings)
        try:
            job = _wait_while_it_progresses(get)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{get()}\n{second.log_tail()}") from None

    assert job["state"] == "succeeded", (job["error"], second.log_tail())
    resumed = job["progress"]["resumed_from_epoch"]
    # The checkpoint is saved before an epoch is reported, so the reported epochs all survive.
    assert resumed is not None and killed_at + 1 <= resumed <= EPOCHS, job["progress"]
    assert resumed >= 4
    assert job["progress"]["epoch"] == EPOCHS and job["metrics"]["val_accuracy"] >= 0.9
    assert job["mlflow_run_id"] == running["mlflow_run_id"]  # the same run, continued
    assert f"resuming at epoch {resumed}" in second.log_tail(400)

    uri = settings.platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"tags.`{TAG_JOB_ID}` = '{job_id}'")
    assert [v.version for v in versions] == [job["model_version"]]
    run = client.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["shipyard.resumed_from_epoch"] == str(resumed)
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")}
    assert steps == set(range(1, EPOCHS + 1))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {"checkpoints/last.pt"}


def _wait_while_it_progresses(get: Any, *, stalled_s: float = 60) -> dict[str, Any]:
    """The job once it has ended; fails when its epoch has not moved for ``stalled_s`` (nobody trains it),
    rather than after a fixed time: how long the remaining epochs take depends on the machine's load."""
    last_epoch, moved_at = None, time.monotonic()
    while True:
        job = get()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job  # type: ignore[no-any-return]
        epoch = job["progress"]["epoch"]
        if epoch != last_epoch:
            last_epoch, moved_at = epoch, time.monotonic()
        assert time.monotonic() - moved_at < stalled_s, (
            f"the job to end on the second worker: its epoch stayed at {epoch} for {stalled_s}s"
        )
        time.sleep(0.2)
