"""End to end on real parts: DVC data, the API, a Celery worker process, MLflow, ONNX Runtime."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from services.trainer.app import create_app
from services.trainer.settings import TrainerSettings
from shipyard_common.auth import Role
from shipyard_common.datasets import DataRepo
from shipyard_common.lineage import (
    TAG_DATASET,
    TAG_DATASET_REV,
    TAG_FEATURES,
    TAG_FORMAT,
    TAG_GIT_COMMIT,
    TAG_JOB_ID,
    TAG_SIGNATURE,
    TAG_TARGET,
    TAG_TASK,
)
from tests.services.trainer.support import WorkerProcess, job_spec, trainer_settings
from tests.support import auth, running_app, test_platform, wait_for

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str
) -> Iterator[dict[str, Any]]:
    """One API, one worker and one versioned dataset, shared by this module's tests."""
    state = tmp_path_factory.mktemp("trainer-state")
    platform = test_platform(state, redis_url=redis_url, mlflow_tracking_uri=mlflow_server)
    settings = trainer_settings(platform)
    frame = load_breast_cancer(as_frame=True).frame
    version = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add("breast_cancer", frame)
    worker = WorkerProcess(settings, state / "worker.log")
    try:
        with running_app(create_app(settings)) as base:
            yield {"settings": settings, "base": base, "rev": version.rev, "frame": frame, "worker": worker}
    finally:
        worker.stop()


def run_job(stack: dict[str, Any], spec: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
    created = httpx.post(f"{stack['base']}/jobs", json=spec, headers=auth(Role.TRAINER))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    seen: list[dict[str, Any]] = []

    def ended() -> dict[str, Any] | None:
        job = httpx.get(f"{stack['base']}/jobs/{job_id}", headers=auth(Role.VIEWER)).json()
        seen.append(job)
        return job if job["state"] in TERMINAL else None

    try:
        job = wait_for(ended, timeout=timeout, interval=0.5, what=f"job {job_id} to end")
    except AssertionError as exc:
        worker: WorkerProcess = stack["worker"]
        raise AssertionError(f"{exc}\nlast seen: {seen[-1:]}\nworker log:\n{worker.log_tail()}") from None
    job["_seen"] = seen
    return job


@pytest.fixture(scope="module")
def trained(stack: dict[str, Any]) -> dict[str, Any]:
    return run_job(stack, job_spec(rev=stack["rev"]))


def test_job_trains_to_a_good_model(trained, stack):
    assert trained["state"] == "succeeded", (trained["error"], stack["worker"].log_tail())
    assert trained["metrics"]["val_accuracy"] >= 0.94
    assert trained["metrics"]["onnx_max_abs_diff"] <= 1e-4
    assert trained["progress"]["epoch"] == trained["progress"]["epochs"] == 20
    assert trained["progress"]["step"] == trained["progress"]["steps"] > 0
    assert trained["device"] == "cpu" and trained["error"] is None
    assert trained["model_version"] and trained["mlflow_run_id"]
    states = [job["state"] for job in trained["_seen"]]
    assert set(states) <= {"queued", "running", "succeeded"}


def test_registered_version_carries_lineage_and_an_onnx_file(trained, stack, tmp_path: Path, monkeypatch):
    import mlflow
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient

    settings: TrainerSettings = stack["settings"]
    uri = settings.platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("breast_cancer", trained["model_version"])
    tags = version.tags
    frame = stack["frame"]
    features = [c for c in frame.columns if c != "target"]
    assert tags[TAG_JOB_ID] == trained["id"]
    assert tags[TAG_DATASET] == "breast_cancer" and tags[TAG_DATASET_REV] == stack["rev"]
    assert json.loads(tags[TAG_FEATURES]) == features
    assert tags[TAG_TARGET] == "target" and tags[TAG_TASK] == "classification"
    assert tags[TAG_FORMAT] == "onnx" and len(tags[TAG_GIT_COMMIT]) >= 7
    signature = json.loads(tags[TAG_SIGNATURE])
    assert signature["inputs"] == [{"name": "input", "shape": [None, 30], "dtype": "float32"}]
    assert signature["outputs"] == [{"name": "probabilities", "shape": [None, 2], "dtype": "float32"}]
    assert version.run_id == trained["mlflow_run_id"]
    run = client.get_run(trained["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 20
    reports = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/confusion_matrix.png", "reports/training_curves.png"} <= reports

    # models:/ URIs resolve through the registry URI, which download_artifacts does not take.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    folder = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/breast_cancer/{trained['model_version']}", dst_path=str(tmp_path),
    ))
    [onnx_file] = list(folder.rglob("model.onnx"))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    # Raw feature rows in, probabilities out: the standardisation is inside the model.
    (probabilities,) = session.run(None, {"input": frame[features].to_numpy(dtype=np.float32)})
    assert probabilities.shape == (len(frame), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == frame["target"].to_numpy()).mean() >= 0.9


def test_a_missing_column_fails_the_job_with_a_reason(stack):
    spec = job_spec(rev=stack["rev"], data__features=["mean radius", "no_such_column"], training__epochs=1)
    job = run_job(stack, spec, timeout=60)
    assert job["state"] == "failed" and job["model_version"] is None
    assert "no_such_column" in job["error"] and "has no column" in job["error"]


def test_a_missing_dataset_is_refused_at_submit(stack):
    spec = job_spec(rev=stack["rev"], dataset="no_such_dataset", training__epochs=1)
    refused = httpx.post(f"{stack['base']}/jobs", json=spec, headers=auth(Role.TRAINER))
    assert refused.status_code == 422
    assert "no_such_dataset" in refused.json()["error"]["message"] and "does not exist" in refused.text


def test_a_second_delivery_of_a_finished_job_changes_nothing(trained, stack):
    from services.trainer.worker.celery_app import TASK_NAME, make_celery

    settings: TrainerSettings = stack["settings"]
    celery = make_celery(settings)
    try:
        celery.send_task(TASK_NAME, args=[trained["id"]], queue=settings.queue_name("cpu"))
    finally:
        celery.close()
    worker: WorkerProcess = stack["worker"]
    wait_for(lambda: f"job {trained['id']} not run here: finished" in worker.log_tail(200),
             timeout=30, what="the worker to turn the duplicate away")
    job = httpx.get(f"{stack['base']}/jobs/{trained['id']}", headers=auth(Role.VIEWER)).json()
    assert job["updated_at"] == trained["updated_at"] and job["model_version"] == trained["model_version"]


def test_the_version_folder_holds_every_export_a_signature_and_a_model_card(stack, tmp_path: Path):
    import onnxruntime as ort
    import torch
    from mlflow.tracking import MlflowClient

    spec = job_spec(rev=stack["rev"], model_name="bc_formats", training__epochs=3,
                    exports=["onnx", "torchscript"])
    job = run_job(stack, spec)
    assert job["state"] == "succeeded", (job["error"], stack["worker"].log_tail())
    assert job["metrics"]["torchscript_max_abs_diff"] <= 1e-4 and job["metrics"]["onnx_max_abs_diff"] <= 1e-4
    uri = stack["settings"].platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("bc_formats", job["model_version"])
    assert version.source.endswith("/model")
    assert json.loads(version.tags["shipyard.formats"]) == ["onnx", "torchscript"]
    assert version.tags["shipyard.framework"] == "pytorch" and "shipyard.parent" not in version.tags
    folder = Path(client.download_artifacts(job["mlflow_run_id"], "model", str(tmp_path)))

    rows = stack["frame"].drop(columns="target").to_numpy(dtype=np.float32)[:50]
    session = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (from_onnx,) = session.run(None, {"input": rows})
    scripted = torch.jit.load(str(folder / "torchscript" / "model.pt"))
    with torch.no_grad():
        from_script = scripted(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(from_onnx, from_script, atol=1e-4)

    signature = json.loads((folder / "signature.json").read_text())
    assert signature["primary"] == "onnx" and set(signature["formats"]) == {"onnx", "torchscript"}
    assert signature["classes"] == [0, 1]
    card = (folder / "MODEL_CARD.md").read_text()
    for expected in ("## Intended use", "## Limitations", "breast_cancer", stack["rev"], "accuracy",
                     job["id"]):
        assert expected in card, expected
    facts = json.loads((folder / "model_card.json").read_text())
    assert facts["metrics"]["val_accuracy"] == pytest.approx(job["metrics"]["val_accuracy"])
    assert facts["data"]["rows_train"] + facts["data"]["rows_validation"] == len(stack["frame"])

    run_files = {a.path for a in client.list_artifacts(job["mlflow_run_id"])}
    assert {"tensorboard", "weights", "checkpoints", "reports", "model"} <= run_files
    events = [a.path for a in client.list_artifacts(job["mlflow_run_id"], "tensorboard")]
    assert any("tfevents" in path for path in events), events


def _split_and_test_rows(
    client: Any, job: dict[str, Any], frame: Any, tmp_path: Path
) -> tuple[dict[str, Any], Any, Any]:
    """The version's split.json, and its test rows' features and labels from the dataset."""
    folder = Path(client.download_artifacts(job["mlflow_run_id"], "model", str(tmp_path)))
    split = json.loads((folder / "split.json").read_text())
    rows = split["rows"]["test"]
    x = frame.drop(columns="target").to_numpy(dtype=np.float32)[rows]
    return split, x, frame["target"].to_numpy()[rows]


def test_a_three_way_split_scores_rows_neither_training_nor_early_stopping_saw(stack, tmp_path: Path):
    """Early stopping chooses on the validation rows; the test rows give the test_* metrics once, and the
    version's split.json lets anyone recompute them with its ONNX file."""
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient

    spec = job_spec(rev=stack["rev"], model_name="bc_split", training__epochs=12,
                    training__early_stopping={"metric": "val_loss", "patience": 3},
                    data__split={"train": 0.6, "validation": 0.2, "test": 0.2, "seed": 11})
    job = run_job(stack, spec)
    assert job["state"] == "succeeded", (job["error"], stack["worker"].log_tail())
    metrics, frame = job["metrics"], stack["frame"]
    assert {"val_accuracy", "test_accuracy", "test_f1_macro", "test_roc_auc"} <= set(metrics)
    uri = stack["settings"].platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    split, x, y = _split_and_test_rows(client, job, frame, tmp_path)
    parts = {part: set(rows) for part, rows in split["rows"].items()}
    assert parts["test"].isdisjoint(parts["train"] | parts["validation"])
    assert parts["train"].isdisjoint(parts["validation"])
    assert parts["train"] | parts["validation"] | parts["test"] == set(range(len(frame)))
    assert (split["method"], split["seed"], split["stratified"], split["revision"]) == (
        "shares", 11, True, stack["rev"])
    session = ort.InferenceSession(str(tmp_path / "model" / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {"input": x})
    recomputed = float((probabilities.argmax(axis=1) == y).mean())
    assert abs(recomputed - metrics["test_accuracy"]) <= 1 / len(y)  # ONNX may flip a near-tie row
    run = client.get_run(job["mlflow_run_id"])
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    facts = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert facts["data"]["rows_test"] == len(parts["test"]) == 114


def test_a_separate_test_revision_is_scored_once_and_named_in_split_json(stack, tmp_path: Path):
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient

    platform, frame = stack["settings"].platform, stack["frame"]
    repo = DataRepo(platform.data_repo_path, platform.dvc_remote_path)
    train_rev = repo.add("bc_revs", frame.iloc[:450]).rev
    test_rev = repo.add("bc_revs", frame.iloc[450:]).rev
    no_such = {"train": 0.8, "validation": 0.2, "test_rev": "f" * 12}
    unknown = httpx.post(f"{stack['base']}/jobs", headers=auth(Role.TRAINER),
                         json=job_spec(rev=train_rev, dataset="bc_revs", data__split=no_such))
    assert unknown.status_code == 422 and "data.split.test_rev" in unknown.text, unknown.text
    spec = job_spec(rev=train_rev, dataset="bc_revs", model_name="bc_revs", training__epochs=6,
                    data__split={"train": 0.8, "validation": 0.2, "test_rev": test_rev[:12]})
    job = run_job(stack, spec)
    assert job["state"] == "succeeded", (job["error"], stack["worker"].log_tail())
    uri = platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    folder = Path(client.download_artifacts(job["mlflow_run_id"], "model", str(tmp_path)))
    split = json.loads((folder / "split.json").read_text())
    assert split["test_revision"] == test_rev and split["rows"]["test"] == list(range(119))
    rows = frame.iloc[450:]
    session = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {"input": rows.drop(columns="target").to_numpy(dtype=np.float32)})
    recomputed = float((probabilities.argmax(axis=1) == rows["target"].to_numpy()).mean())
    assert abs(recomputed - job["metrics"]["test_accuracy"]) <= 1 / len(rows)


def test_five_fold_cross_validation_on_wine_logs_each_fold_and_their_mean(stack, tmp_path: Path):
    """evaluation.kfold: five folds of the training rows, each scored on rows its model never trained on,
    their mean and spread; then the registered model trains on every training row."""
    from mlflow.tracking import MlflowClient
    from sklearn.datasets import load_wine

    platform = stack["settings"].platform
    frame = load_wine(as_frame=True).frame
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add("wine_cv", frame).rev
    spec = job_spec(rev=rev, dataset="wine_cv", model_name="wine_cv", training__epochs=15,
                    training__learning_rate=0.01, evaluation={"kfold": 5, "stratified": True},
                    data__split={"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 3})
    job = run_job(stack, spec)
    assert job["state"] == "succeeded", (job["error"], stack["worker"].log_tail())
    metrics = job["metrics"]
    uri = platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    folds = client.get_metric_history(job["mlflow_run_id"], "cv_accuracy")
    assert sorted(m.step for m in folds) == [1, 2, 3, 4, 5]
    scores = np.asarray([m.value for m in sorted(folds, key=lambda m: m.step)])
    assert metrics["cv_accuracy_mean"] == pytest.approx(scores.mean())
    assert metrics["cv_accuracy_std"] == pytest.approx(scores.std())
    assert metrics["cv_accuracy_mean"] >= 0.85 and "test_accuracy" in metrics
    assert len(client.get_metric_history(job["mlflow_run_id"], "val_accuracy")) == 15  # the final model's
    folder = Path(client.download_artifacts(job["mlflow_run_id"], "model", str(tmp_path)))
    split = json.loads((folder / "split.json").read_text())
    fold_rows = [set(rows) for rows in split["folds"]["rows"]]
    assert len(fold_rows) == 5 and sum(len(rows) for rows in fold_rows) == len(split["rows"]["train"])
    assert set().union(*fold_rows) == set(split["rows"]["train"])  # the folds cut the training rows
    facts = json.loads((folder / "model_card.json").read_text())
    assert facts["data"]["rows_train"] == len(split["rows"]["train"])  # refitted on all of them
    assert job["progress"]["step"] == job["progress"]["steps"]


def test_a_fine_tuned_version_names_its_parent_and_starts_from_its_weights(trained, stack):
    from mlflow.tracking import MlflowClient

    # One epoch at a tiny rate: only a start from the parent's weights can already be this good.
    spec = job_spec(rev=stack["rev"], training__epochs=1, training__learning_rate=1e-6,
                    init_from={"model_name": "breast_cancer", "version": trained["model_version"]})
    job = run_job(stack, spec)
    assert job["state"] == "succeeded", (job["error"], stack["worker"].log_tail())
    assert job["metrics"]["val_accuracy"] >= 0.94
    uri = stack["settings"].platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("breast_cancer", job["model_version"])
    assert version.tags["shipyard.parent"] == f"breast_cancer/{trained['model_version']}"

    missing = run_job(stack, job_spec(rev=stack["rev"], training__epochs=1,
                                      init_from={"model_name": "breast_cancer", "version": "999"}))
    assert missing["state"] == "failed" and "has no version 999" in missing["error"]


def test_a_keras_job_trains_through_the_worker_and_registers_onnx(stack):
    from mlflow.tracking import MlflowClient
    from sklearn.datasets import load_wine

    platform = stack["settings"].platform
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add(
        "wine", load_wine(as_frame=True).frame
    ).rev
    spec = job_spec(rev=rev, dataset="wine", model_name="wine_keras", framework="keras",
                    model={"type": "mlp", "hidden": [32]}, training__epochs=15, training__batch_size=16,
                    training__learning_rate=0.01)
    job = run_job(stack, spec, timeout=300)
    assert job["state"] == "succeeded", (job["error"], stack["worker"].log_tail())
    assert job["metrics"]["val_accuracy"] >= 0.9 and job["metrics"]["onnx_max_abs_diff"] <= 1e-4
    assert job["progress"]["epoch"] == 15
    uri = platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("wine_keras", job["model_version"])
    assert version.tags["shipyard.framework"] == "keras" and version.tags["shipyard.format"] == "onnx"
    assert len(client.get_metric_history(job["mlflow_run_id"], "val_accuracy")) == 15


def test_a_keras_job_scores_its_test_rows_in_the_targets_units(stack, tmp_path: Path):
    """Regression through the Keras child: its test_* metrics, from the child's outputs on the test rows,
    equal the ONNX export's on the rows split.json names."""
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient
    from sklearn.datasets import load_diabetes

    platform = stack["settings"].platform
    frame = load_diabetes(as_frame=True, scaled=False).frame
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add("diabetes", frame).rev
    spec = job_spec(rev=rev, dataset="diabetes", model_name="diabetes_keras", framework="keras",
                    model={"type": "mlp", "hidden": [16]}, training__epochs=4, training__batch_size=32,
                    data__task="regression", data__split={"train": 0.6, "validation": 0.2, "test": 0.2})
    job = run_job(stack, spec, timeout=300)
    assert job["state"] == "succeeded", (job["error"], stack["worker"].log_tail())
    uri = platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    split, x, y = _split_and_test_rows(client, job, frame, tmp_path)
    assert split["stratified"] is False and len(y) == 89
    session = ort.InferenceSession(str(tmp_path / "model" / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (predicted,) = session.run(None, {session.get_inputs()[0].name: x})
    errors = predicted.ravel().astype(np.float64) - y
    assert job["metrics"]["test_mse"] == pytest.approx(float(np.mean(errors ** 2)), rel=1e-3)
    assert job["metrics"]["test_mae"] == pytest.approx(float(np.mean(np.abs(errors))), rel=1e-3)


def test_a_transformers_job_fine_tunes_minilm_and_ships_its_tokenizer(stack, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from tests.services.trainer.sentiment import sentiment_frame

    platform = stack["settings"].platform
    rev = DataRepo(platform.data_repo_path, platform.dvc_remote_path).add("reviews", sentiment_frame(160)).rev
    spec = job_spec(rev=rev, dataset="reviews", model_name="sentiment", framework="transformers",
                    model={"type": "pretrained_text", "max_length": 32, "freeze_encoder": True},
                    data__target="sentiment", training__epochs=2, training__batch_size=16,
                    training__learning_rate=5e-3)
    job = run_job(stack, spec, timeout=300)
    assert job["state"] == "succeeded", (job["error"], stack["worker"].log_tail())
    assert job["metrics"]["val_accuracy"] >= 0.9
    uri = platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("sentiment", job["model_version"])
    assert version.tags["shipyard.parent"] == "pretrained:all-MiniLM-L6-v2"
    signature = json.loads(version.tags["shipyard.signature"])
    assert signature["inputs"] == [{"name": "input_ids", "shape": [None, 32], "dtype": "int64"}]
    files = {a.path for a in client.list_artifacts(job["mlflow_run_id"], "model/tokenizer")}
    assert "model/tokenizer/tokenizer.json" in files
