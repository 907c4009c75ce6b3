"""``batch_predict`` on real components: a Prefect server, DVC with a local remote, an MLflow server
and the platform's SQLite database (the prediction log the monitor reads).

The flow runs in this process (as ``shipyard predict-batch`` runs it); a failure is injected with
the flow's test-only hook, :func:`pipelines.batch.inject_fault`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import select
from typer.testing import CliRunner

from pipelines.batch import BATCH_ROLE, Chunk, batch_predict, inject_fault
from shipyard_cli.main import app as cli
from shipyard_common.datasets import DataRepo
from shipyard_common.datasets.predictions import PredictionsRepo
from shipyard_common.db import Database
from shipyard_common.lineage import TAG_FEATURES, TAG_SIGNATURE, TAG_TASK
from shipyard_common.records import PredictionRecord
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import (
    N_FEATURES,
    ModelFactory,
    run_directly,
    tiny_classifier,
    unique_name,
)
from tests.support import test_platform

ROWS = 50_000
CHUNK = 5_000
FEATURES = [f"f{i}" for i in range(N_FEATURES)]
CLASSES = ["low", "mid", "high"]


def scene(tmp_path: Path, mlflow_server: str, prefect_url: str, rows: int, **settings: Any) -> dict[str, Any]:
    """``rows`` rows with an id column in a data repository of the test's own (its remote as the
    platform ``settings`` say), and a classifier as production."""
    platform = test_platform(tmp_path / "state", mlflow_tracking_uri=mlflow_server,
                             prefect_api_url=prefect_url, **settings)
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(rng.normal(size=(rows, N_FEATURES)).round(4), columns=FEATURES)
    frame.insert(0, "id", rng.permutation(rows) + 10_000_000)
    rev = DataRepo.from_settings(platform).add("scores-in", frame).rev
    name = unique_name("batch")
    factory = ModelFactory(mlflow_server)
    registered = factory.register(name, tiny_classifier(3), tags={
        TAG_FEATURES: json.dumps(FEATURES), TAG_TASK: "classification",
        TAG_SIGNATURE: json.dumps({"classes": CLASSES}), "shipyard.dataset": "train",
        "shipyard.dataset_rev": "r1"})
    factory.set_production(name, registered.version)
    return {"platform": platform, "frame": frame, "rev": rev, "model": name, "bytes": registered.model_bytes}


def logged_rows(platform: PlatformSettings, model: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The prediction log's batch records of ``model``: their ids, and their rows and outputs in the
    order of the chunks and parts the ids name."""
    database = Database(platform.database_url)
    with database.session() as session:
        found = session.execute(select(PredictionRecord.request_id, PredictionRecord.role,
                                       PredictionRecord.inputs, PredictionRecord.outputs)
                                .where(PredictionRecord.model == model)).all()
    database.dispose()
    assert {role for _, role, _, _ in found} == {BATCH_ROLE}
    ordered = sorted(found, key=lambda r: tuple(int(p) for p in r[0].rsplit("-", 2)[1:]))
    inputs = np.vstack([np.asarray(r[2], dtype=np.float32) for r in ordered])
    outputs = np.vstack([np.asarray(r[3], dtype=np.float32) for r in ordered])
    return [r[0] for r in ordered], inputs, outputs


def test_50000_rows_are_written_once_also_after_a_failure_in_the_middle(
    tmp_path: Path, mlflow_server: str, prefect_url: str
) -> None:
    setup = scene(tmp_path, mlflow_server, prefect_url, ROWS)
    platform, frame, model = setup["platform"], setup["frame"], setup["model"]
    attempts: dict[int, int] = {}

    def fault(chunk: Chunk, attempt: int) -> None:
        attempts[chunk.index] = attempt
        if chunk.index == 2 and attempt == 1:
            raise RuntimeError("injected: chunk 2 fails once (a retry passes)")
        if chunk.index == 4:
            raise RuntimeError("injected: chunk 4 keeps failing")

    kwargs = {"dataset": "scores-in", "model_name": model, "chunk_rows": CHUNK, "id_column": "id",
              "platform": platform}
    with inject_fault(fault), pytest.raises(RuntimeError, match="chunk 4 keeps failing"):
        batch_predict(**kwargs)
    # Chunk 2 retried once and passed; chunk 4 tried three times; the other chunks went on meanwhile.
    assert attempts == {**{i: 1 for i in range(ROWS // CHUNK)}, 2: 2, 4: 3}
    repo = PredictionsRepo(platform.data_repo_path, platform.dvc_remote_path)
    assert not (repo.path / "predictions").exists()  # nothing committed while a chunk is missing

    result = batch_predict(**kwargs)

    assert result["skipped_chunks"] == 9 and result["chunks"] == ROWS // CHUNK
    assert result["logged_rows"] == 0  # chunk 4's rows were logged before it failed, and not again
    assert result["dataset_rev"] == setup["rev"] and result["model_version"] == "1"
    shutil.rmtree(repo.path / ".dvc" / "cache")  # the output must come back from the DVC remote
    written, manifest = repo.read_predictions(result["output"], result["output_rev"])
    assert len(written) == ROWS
    assert sorted(written["id"]) == sorted(frame["id"])  # each row id exactly once
    assert written["row"].tolist() == list(range(ROWS))
    assert (written["id"].to_numpy() == frame["id"].to_numpy()).all()
    expected = run_directly(setup["bytes"], frame[FEATURES].to_numpy(dtype=np.float32).tolist())
    scores = written[[f"probabilities_{j}" for j in range(len(CLASSES))]].to_numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert written["prediction"].tolist() == [CLASSES[i] for i in expected.argmax(axis=1)]
    assert (manifest["dataset"], manifest["dataset_rev"]) == ("scores-in", setup["rev"])
    assert (manifest["model"], manifest["model_version"], manifest["alias"]) == (model, "1", "production")
    assert len(manifest["chunks"]) == ROWS // CHUNK

    ids, inputs, outputs = logged_rows(platform, model)  # what the monitor reads
    assert len(ids) == len(set(ids)) == ROWS // 1000
    np.testing.assert_allclose(inputs, frame[FEATURES].to_numpy(dtype=np.float32))
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)

    run = MlflowClient(tracking_uri=platform.mlflow_tracking_uri).get_run(result["mlflow_run_id"])
    assert run.data.tags["shipyard.dataset_rev"] == setup["rev"]
    assert run.data.tags["shipyard.model_version"] == "1"
    assert run.data.tags["shipyard.output_rev"] == result["output_rev"]
    assert manifest["mlflow_run_id"] == result["mlflow_run_id"]

    again = batch_predict(**kwargs)  # everything written: nothing scored, logged or committed again
    assert (again["skipped_chunks"], again["logged_rows"]) == (10, 0)
    assert again["output_rev"] == result["output_rev"]
    assert len(logged_rows(platform, model)[0]) == ROWS // 1000
    client = MlflowClient(tracking_uri=platform.mlflow_tracking_uri)
    runs = client.search_runs([run.info.experiment_id], f"tags.`shipyard.model` = '{model}'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]


def test_the_cli_says_what_is_wrong_with_the_input(
    tmp_path: Path, mlflow_server: str, prefect_url: str
) -> None:
    setup = scene(tmp_path, mlflow_server, prefect_url, 100)
    platform, model = setup["platform"], setup["model"]
    bare = unique_name("bare")
    ModelFactory(mlflow_server).register(bare, tiny_classifier(1), tags={TAG_FEATURES: json.dumps(FEATURES)})
    wrong = unique_name("wrong")
    ModelFactory(mlflow_server).register(wrong, tiny_classifier(1),
                                         tags={TAG_FEATURES: json.dumps(["f0", "f1", "x", "y"])})
    ModelFactory(mlflow_server).set_production(wrong, "1")
    env = {**platform.as_env(), "COLUMNS": "300"}

    def shipyard(*args: str) -> Any:
        return CliRunner().invoke(cli, ["predict-batch", *args], env=env, catch_exceptions=False)

    unknown_rev = shipyard("scores-in", model, "--rev", "deadbeef")
    no_alias = shipyard("scores-in", bare)
    columns = shipyard("scores-in", wrong)
    no_dataset = shipyard("nothing-here", model)

    outputs = [" ".join(r.output.split()) for r in (unknown_rev, no_alias, columns, no_dataset)]
    assert [r.exit_code for r in (unknown_rev, no_alias, columns, no_dataset)] == [1, 1, 1, 1], outputs
    assert "dataset 'scores-in' has no revision 'deadbeef'" in outputs[0]
    assert f"model '{bare}' has no alias 'production' (its aliases: none)" in outputs[1]
    assert "lacks column(s) ['x', 'y']" in outputs[2]
    assert "dataset 'nothing-here' does not exist" in outputs[3]

    scored = shipyard("scores-in", model, "--chunk-rows", "40", "--output", "cli-scores")
    assert scored.exit_code == 0, scored.output
    assert (f"100 rows of scores-in@{setup['rev'][:12]} scored by {model} v1: cli-scores at "
            in " ".join(scored.output.split()))
    assert "(0 of 3 chunks already written)" in scored.output


def test_the_rows_reach_a_postgresql_prediction_log_too(
    tmp_path: Path, mlflow_server: str, prefect_url: str, postgres_url: str
) -> None:
    setup = scene(tmp_path, mlflow_server, prefect_url, 2_500)
    platform = setup["platform"].model_copy(update={"db_url": postgres_url})

    result = batch_predict(dataset="scores-in", model_name=setup["model"], chunk_rows=1_000,
                           platform=platform)

    assert (result["rows"], result["chunks"], result["logged_rows"]) == (2_500, 3, 2_500)
    ids, inputs, outputs = logged_rows(platform, setup["model"])
    assert len(ids) == 3  # 1,000 + 1,000 + 500 rows
    np.testing.assert_allclose(inputs, setup["frame"][FEATURES].to_numpy(dtype=np.float32))
    expected = run_directly(setup["bytes"], setup["frame"][FEATURES].to_numpy(dtype=np.float32).tolist())
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)


def test_an_s3_remote_gets_the_input_and_the_predictions(
    tmp_path: Path, mlflow_server: str, prefect_url: str, moto_endpoint: str
) -> None:
    import boto3

    prefix = f"batch-{tmp_path.name}"
    setup = scene(tmp_path, mlflow_server, prefect_url, 2_000, dvc_s3_bucket="shipyard-datasets",
                  dvc_s3_prefix=prefix, dvc_s3_endpoint_url=moto_endpoint, dvc_s3_access_key_id="test-key",
                  dvc_s3_secret_access_key="test-secret", dvc_s3_region="us-east-1")
    platform = setup["platform"]
    bucket = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="test-key",
                          aws_secret_access_key="test-secret", region_name="us-east-1")

    def objects() -> int:
        return int(bucket.list_objects_v2(Bucket="shipyard-datasets", Prefix=prefix).get("KeyCount", 0))

    held = objects()
    assert held >= 1  # the input dataset's version
    shutil.rmtree(DataRepo.from_settings(platform).path / ".dvc" / "cache")  # the input comes from S3

    result = batch_predict(dataset="scores-in", model_name=setup["model"], chunk_rows=1_000,
                           platform=platform)

    assert (result["rows"], result["chunks"]) == (2_000, 2)
    assert objects() >= held + 3  # two chunks' Parquet files and the manifest
    assert not platform.dvc_remote_path.exists()  # nothing went to the local folder remote
    repo = PredictionsRepo.from_settings(platform)
    shutil.rmtree(repo.path / ".dvc" / "cache")
    written, manifest = repo.read_predictions(result["output"], result["output_rev"])
    expected = run_directly(setup["bytes"], setup["frame"][FEATURES].to_numpy(dtype=np.float32).tolist())
    scores = written[[f"probabilities_{j}" for j in range(len(CLASSES))]].to_numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert manifest["rows"] == 2_000
