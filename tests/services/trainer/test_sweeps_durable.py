"""A sweep survives its worker dying: the trial's job is taken over like any job, resumes from its
checkpoint, keeps reporting to the same Optuna trial, and the sweep ends as if nothing happened."""

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
from services.trainer.sweeps.schemas import SweepCreate
from services.trainer.sweeps.study import load_study
from shipyard_common.auth import Role
from shipyard_common.datasets import DataRepo
from shipyard_common.settings import PlatformSettings
from tests.services.trainer.support import job_spec, trainer_settings
from tests.support import auth, running_app, wait_for

EPOCHS = 10  # at batch size 4 an epoch is over a hundred steps: the kill at epoch 3 lands mid-training


def test_a_sweep_whose_worker_is_killed_mid_trial_carries_on(
    platform: PlatformSettings, start_worker: Any, tmp_path: Path
):
    # Quick takeover (as test_durable.py), and a reconciler that advances sweeps every second.
    settings = trainer_settings(platform, stale_after_s=2, visibility_timeout_s=3,
                                unacked_restore_interval_s=0.5, unacked_restore_throttle=1,
                                reconcile_interval_s=1)
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add(
        "breast_cancer", load_breast_cancer(as_frame=True).frame).rev
    model_name = f"sweep-durable-{uuid.uuid4().hex[:8]}"
    base = job_spec(rev=rev, model_name=model_name, model={"type": "mlp", "hidden": [16]},
                    training__epochs=EPOCHS, training__batch_size=4)
    spec = {"base": base, "strategy": "grid", "trials": 2, "parallelism": 1,
            "objective": {"metric": "val_loss"},
            "space": {"training.learning_rate": {"type": "choice", "values": [0.001, 0.003]}}}
    first = start_worker(settings)
    with running_app(create_app(settings)) as api:
        created = httpx.post(f"{api}/sweeps", json=spec, headers=auth(Role.TRAINER), timeout=60)
        assert created.status_code == 201, created.text
        sweep_id = created.json()["id"]

        def sweep() -> dict[str, Any]:
            return httpx.get(f"{api}/sweeps/{sweep_id}", headers=auth(Role.VIEWER)).json()

        def job(job_id: str) -> dict[str, Any]:
            return httpx.get(f"{api}/jobs/{job_id}", headers=auth(Role.VIEWER)).json()

        job_id = sweep()["trials"][0]["job_id"]
        try:
            wait_for(lambda: job(job_id)["progress"]["epoch"] >= 3, timeout=90, interval=0.1, what="epoch 3")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{first.log_tail()}") from None
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        killed_at = job(job_id)["progress"]["epoch"]
        assert killed_at < EPOCHS

        second = start_worker(settings)
        deadline = time.monotonic() + 300
        while sweep()["state"] == "running":
            assert time.monotonic() < deadline, f"the sweep to end\n{second.log_tail()}"
            time.sleep(0.5)
        ended = sweep()
        taken_over = job(job_id)

    assert ended["state"] == "succeeded", (ended["error"], second.log_tail())
    assert [t["state"] for t in ended["trials"]] == ["complete", "complete"]
    assert taken_over["progress"]["resumed_from_epoch"] is not None  # continued from the checkpoint
    assert taken_over["progress"]["epoch"] == EPOCHS
    # The Optuna trial got every epoch's value once, from both workers: 1..killed_at, then the rest.
    study = load_study(platform.database_url, sweep_id, SweepCreate.model_validate(ended["spec"]))
    first_trial = study.get_trials(deepcopy=False)[0]
    assert sorted(first_trial.intermediate_values) == list(range(1, EPOCHS + 1))
    assert first_trial.value == ended["trials"][0]["value"]
    uri = platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert [v.version for v in versions] == [ended["model_version"]]
    assert versions[0].run_id == ended["best"]["mlflow_run_id"]
