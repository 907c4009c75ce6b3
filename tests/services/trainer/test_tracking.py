"""Registration against a real MLflow server: once per job, however often the job runs."""

from __future__ import annotations

import uuid

from services.trainer.engines.tracking import Tracking, flatten, git_commit
from shipyard_common.lineage import TAG_DATASET, TAG_JOB_ID


def test_registering_twice_for_one_job_reuses_the_version(mlflow_server, tmp_path):
    tracking = Tracking(mlflow_server)
    model = f"idempotent-{uuid.uuid4().hex[:8]}"
    job_id = str(uuid.uuid4())
    run_id = tracking.start_run(experiment=model, run_name="r", tags={TAG_JOB_ID: job_id})
    (tmp_path / "model" / "onnx").mkdir(parents=True)
    (tmp_path / "model" / "onnx" / "model.onnx").write_bytes(b"not really onnx")
    source = tracking.log_model_folder(run_id, tmp_path / "model")
    assert source == f"runs:/{run_id}/model"
    register = {"model_name": model, "job_id": job_id, "run_id": run_id, "source": source}

    first = tracking.register(**register, tags={TAG_DATASET: "a"})
    second = tracking.register(**register, tags={TAG_DATASET: "b"})
    other = tracking.register(**{**register, "job_id": str(uuid.uuid4())}, tags={})

    assert first == second == "1" and other == "2"
    assert tracking.find_version(model_name=model, job_id=job_id) == "1"
    version = tracking.client.get_model_version(model, first)
    assert version.tags[TAG_JOB_ID] == job_id and version.tags[TAG_DATASET] == "b"
    # The experiment exists once however many runs ask for it.
    assert tracking.experiment_id(model) == tracking.experiment_id(model)


def test_params_are_flat_and_the_commit_is_known():
    assert flatten({"model": {"hidden": [64, 32]}, "training": {"epochs": 3}, "x": None}) == {
        "model.hidden": "[64, 32]", "training.epochs": "3", "x": "null",
    }
    assert len(git_commit()) == 40  # the tests run from a git checkout
