"""The whole loop as a user drives it: data → training → registry → serving → monitoring.

Every component is real and runs as its own process, started the way ``shipyard up`` starts
it: MLflow, a Prefect server, a Celery worker on Redis, the four services and the deployments
process. The pipeline runs in this process, recorded by the stack's Prefect server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from shipyard_cli.client import ShipyardClient
from shipyard_cli.demo import newest_window_id, send_rows, wait_for_window, wait_until_served
from shipyard_cli.stack import Stack
from shipyard_common.lineage import TAG_DATASET_REV, TAG_FEATURES, TAG_JOB_ID
from shipyard_common.settings import PlatformSettings
from tests.e2e.conftest import SERVING_GRPC_PORT
from tests.support import auth, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(stack_platform: PlatformSettings) -> Iterator[ShipyardClient]:
    client = ShipyardClient(stack_platform, token="test-admin")
    yield client
    client.close()


def test_flow_trains_registers_and_promotes(deployed, client):
    assert deployed["metrics"]["val_accuracy"] >= 0.94
    job = client.get_job(deployed["job_id"])
    assert job["state"] == "succeeded" and str(job["model_version"]) == str(deployed["model_version"])
    [model] = [m for m in client.list_models() if m["name"] == "breast_cancer"]
    assert str(model["aliases"]["production"]) == str(deployed["model_version"])
    version = next(
        v
        for v in client.list_versions("breast_cancer")
        if str(v["version"]) == str(deployed["model_version"])
    )
    assert version["tags"][TAG_JOB_ID] == deployed["job_id"]
    assert version["tags"][TAG_DATASET_REV] == deployed["dataset_rev"]


def test_promoted_version_answers_predictions(deployed, client):
    version = str(deployed["model_version"])
    wait_until_served(client, "breast_cancer", version)
    frame = load_breast_cancer(as_frame=True).frame
    answer = client.predict("breast_cancer", frame.drop(columns="target").iloc[:5].to_numpy().tolist())
    assert answer["model_version"] == version
    probabilities = np.array(answer["outputs"])
    assert probabilities.shape == (5, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The model is good: it gets the first rows of its own dataset right.
    assert (probabilities.argmax(axis=1) == frame["target"].iloc[:5].to_numpy()).mean() >= 0.8
    # The stack serves the Open Inference Protocol over gRPC too, with the same answer.
    import tritonclient.grpc as grpcclient

    rows = frame.drop(columns="target").iloc[:5].to_numpy().astype(np.float32)
    metadata = {key.lower(): value for key, value in auth("viewer").items()}  # gRPC keys are lower case
    with grpcclient.InferenceServerClient(f"127.0.0.1:{SERVING_GRPC_PORT}") as triton:
        name = triton.get_model_metadata("breast_cancer", headers=metadata).inputs[0].name
        tensor = grpcclient.InferInput(name, list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        result = triton.infer("breast_cancer", [tensor], headers=metadata)
    assert result.get_response().model_version == version
    np.testing.assert_allclose(result.as_numpy(result.get_response().outputs[0].name), probabilities,
                               rtol=1e-5, atol=1e-6)


def test_drift_flagged_on_shifted_data_only(deployed, client, stack_platform):
    """Rows sent to fill two windows (the stack's windows are 200 rows): the monitor's loop closes
    them; the newest holds only these rows, calm or shifted."""
    version = str(deployed["model_version"])
    wait_until_served(client, "breast_cancer", version)
    tags = next(v for v in client.list_versions("breast_cancer") if str(v["version"]) == version)["tags"]
    features = json.loads(tags[TAG_FEATURES])
    frame = load_breast_cancer(as_frame=True).frame
    rows = frame[features].sample(400, random_state=3).to_numpy(dtype=float)

    before = newest_window_id(client, "breast_cancer")
    send_rows(client, "breast_cancer", rows)
    calm = wait_for_window(client, "breast_cancer", after=before)
    assert calm["dataset_drift"] is False and calm["current_rows"] == 200
    assert calm["version"] == version and calm["reference"]["rev"] == deployed["dataset_rev"]

    shifted = rows.copy()
    shifted[:, :8] += 3 * frame[features].to_numpy(dtype=float).std(axis=0)[:8]
    before = newest_window_id(client, "breast_cancer")
    send_rows(client, "breast_cancer", shifted)
    stormy = wait_for_window(client, "breast_cancer", after=before)
    assert stormy["dataset_drift"] is True and stormy["window_id"] > calm["window_id"]
    drifted = {f["name"] for f in stormy["features"] if f["drifted"]}
    assert set(features[:8]) <= drifted

    metrics = httpx.get(f"{stack_platform.monitor_url}/metrics").text
    assert f'shipyard_dataset_drift{{model="breast_cancer",version="{version}"}} 1.0' in metrics
    [listed] = client.reports("breast_cancer", limit=1)["items"]
    assert listed["window_id"] == stormy["window_id"]


def test_bad_input_gets_a_clear_4xx_everywhere(deployed, stack_platform):
    p = stack_platform
    cases = [
        ("POST", f"{p.trainer_url}/jobs", {"model_name": "x"}, auth("trainer"), 422),
        ("POST", f"{p.trainer_url}/jobs", {"model_name": "x"}, None, 401),
        ("GET", f"{p.trainer_url}/jobs/does-not-exist", None, auth("viewer"), 404),
        (
            "POST",
            f"{p.registry_url}/models/breast_cancer/versions/999/promote",
            {"alias": "production"},
            auth("admin"),
            404,
        ),
        (
            "POST",
            f"{p.registry_url}/models/breast_cancer/versions/1/promote",
            {"alias": "production"},
            auth("trainer"),
            403,
        ),
        (
            "POST",
            f"{p.serving_url}/v1/models/breast_cancer/predict",
            {"inputs": [[1.0, 2.0]]},
            auth("viewer"),
            422,
        ),
        ("POST", f"{p.serving_url}/v1/models/nope/predict", {"inputs": [[1.0]]}, auth("viewer"), 404),
        ("GET", f"{p.monitor_url}/drift/nope", None, auth("viewer"), 404),
    ]
    for method, url, body, headers, status in cases:
        response = httpx.request(method, url, json=body, headers=headers, timeout=30)
        assert response.status_code == status, (url, response.text)
        error = response.json()["error"]
        assert error["message"], url


def test_stack_reports_every_component_healthy(stack_platform):
    rows = Stack(stack_platform).status()
    assert {r["name"] for r in rows} >= {"mlflow", "prefect", "worker", "trainer", "registry", "serving",
                                         "monitor", "pipelines"}
    assert all(r["alive"] for r in rows)
    assert all(r["healthy"] in (True, None) for r in rows)


def test_logs_are_structured(stack_platform):
    log = Path(stack_platform.state_dir) / "logs" / "trainer.log"
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines and all("service" in json.loads(line) for line in lines[:20])


def test_cli_trains_promotes_and_serving_swaps(deployed, client, stack_platform, tmp_path):
    """A user's CLI session: submit a spec and follow it, promote the new version, roll back."""
    import yaml
    from typer.testing import CliRunner

    from shipyard_cli.main import app

    spec = {
        "model_name": "breast_cancer",
        "framework": "pytorch",
        "model": {"type": "mlp", "hidden": [32]},
        "data": {
            "dataset": "breast_cancer",
            "rev": deployed["dataset_rev"],
            "task": "classification",
            "target": "target",
            "validation_split": 0.2,
        },
        "training": {"epochs": 5, "batch_size": 32, "learning_rate": 0.001, "optimizer": "adam", "seed": 1},
        "resources": {"queue": "cpu"},
        "exports": ["onnx"],
    }
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**stack_platform.as_env(), "SHIPYARD_API_TOKEN": "test-admin", "COLUMNS": "200"}
    runner = CliRunner()

    submitted = runner.invoke(app, ["jobs", "submit", str(spec_file), "--follow"], env=env)
    assert submitted.exit_code == 0, submitted.output
    assert "succeeded" in submitted.output and "epoch 5/5" in submitted.output
    new_version = str(json.loads(submitted.output[submitted.output.index("{") :])["model_version"])
    job_id = submitted.output.split("job ", 1)[1].split()[0]

    logs = runner.invoke(app, ["jobs", "logs", job_id], env=env)
    assert logs.exit_code == 0, logs.output
    assert "epoch 5" in logs.output
    finished = runner.invoke(app, ["jobs", "cancel", job_id], env=env)
    assert finished.exit_code == 1 and "already ended" in finished.output
    old_version = str(deployed["model_version"])
    assert new_version != old_version

    promoted = runner.invoke(
        app, ["models", "promote", "breast_cancer", new_version, "--reason", "cli"], env=env
    )
    assert promoted.exit_code == 0, promoted.output
    wait_until_served(client, "breast_cancer", new_version, timeout=30)
    row = load_breast_cancer(as_frame=True).frame.drop(columns="target").iloc[:1].to_numpy().tolist()
    assert client.predict("breast_cancer", row)["model_version"] == new_version

    rolled_back = runner.invoke(app, ["models", "promote", "breast_cancer", old_version], env=env)
    assert rolled_back.exit_code == 0, rolled_back.output
    wait_until_served(client, "breast_cancer", old_version, timeout=30)
    assert client.predict("breast_cancer", row)["model_version"] == old_version

    bad = runner.invoke(app, ["models", "promote", "breast_cancer", "999"], env=env)
    assert bad.exit_code == 1 and "error" in bad.output


def test_the_registry_shows_the_metrics_of_the_model_it_registered(deployed, client, stack_platform):
    """Early stopping with restore_best registers an earlier epoch's model: the registry must show
    that model's figures (what serving answers with), not the run's summary of its last epoch."""
    from mlflow.tracking import MlflowClient

    spec = {
        "model_name": "breast_cancer_es", "framework": "pytorch",
        "model": {"type": "mlp", "hidden": [64, 32]},
        "data": {"dataset": "breast_cancer", "rev": deployed["dataset_rev"], "task": "classification",
                 "target": "target", "validation_split": 0.2},
        "training": {"epochs": 60, "batch_size": 16, "learning_rate": 0.01, "optimizer": "adam", "seed": 3,
                     "early_stopping": {"metric": "val_loss", "patience": 3, "restore_best": True}},
        "resources": {"queue": "cpu"}, "exports": ["onnx"],
    }
    job_id = client.submit_job(spec)["id"]
    job = wait_for(lambda: (j := client.get_job(job_id))["state"] in ("succeeded", "failed") and j,
                   timeout=240, interval=1, what=f"job {job_id}")
    assert job["state"] == "succeeded", job["error"]
    mlflow = MlflowClient(stack_platform.mlflow_tracking_uri)
    last_epoch = mlflow.get_run(job["mlflow_run_id"]).data.metrics
    curve = [m.value for m in mlflow.get_metric_history(job["mlflow_run_id"], "val_loss")]
    # The premise: training stopped early, past its best epoch, so the run's summary holds worse figures.
    assert len(curve) < 60 and min(curve) == pytest.approx(job["metrics"]["val_loss"], abs=1e-9)
    assert last_epoch["val_loss"] > job["metrics"]["val_loss"]

    versions = f"{stack_platform.registry_url}/models/breast_cancer_es/versions"
    version = httpx.get(f"{versions}/{job['model_version']}", headers=auth("viewer"), timeout=30).json()
    assert version["metrics_source"] == "version"
    for key in ("val_loss", "val_accuracy"):
        assert version["metrics"][key] == pytest.approx(job["metrics"][key], abs=1e-9), key
    assert version["metrics"]["val_loss"] != pytest.approx(last_epoch["val_loss"])
    listed = httpx.get(versions, headers=auth("viewer"), timeout=30).json()["versions"]
    assert listed[0]["metrics"]["val_loss"] == pytest.approx(job["metrics"]["val_loss"], abs=1e-9)
    lineage = version["lineage"]
    assert lineage["job_id"] == job_id and lineage["dataset_rev"] == deployed["dataset_rev"]
    assert version["signature"] and version["exports"] == ["onnx"]
