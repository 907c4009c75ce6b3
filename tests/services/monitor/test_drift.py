"""The monitor against real components: an MLflow server, a DVC repository, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_breast_cancer

from services.monitor.app import create_app
from services.monitor.settings import MonitorSettings
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database
from shipyard_common.lineage import (
    PRODUCTION,
    TAG_DATASET,
    TAG_DATASET_REV,
    TAG_FEATURES,
    TAG_TARGET,
    TAG_TASK,
)
from shipyard_common.records import PredictionRecord
from shipyard_common.settings import PlatformSettings
from tests.support import auth, running_app, wait_for

SHIFTED = 8


@dataclass(frozen=True)
class Reference:
    data_repo: Path
    dvc_remote: Path
    rev: str
    frame: pd.DataFrame
    features: list[str]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """breast_cancer versioned once for the module: DVC is slow and the data never changes."""
    root = tmp_path_factory.mktemp("monitor-data")
    repo = DataRepo(root / "data", root / "remote")
    frame = load_breast_cancer(as_frame=True).frame
    version = repo.add("breast_cancer", frame)
    features = [column for column in frame.columns if column != "target"]
    return Reference(repo.path, repo.remote, version.rev, frame, features)


def monitor_platform(
    platform: PlatformSettings, reference: Reference, db_url: str | None = None
) -> PlatformSettings:
    update: dict[str, object] = {"data_repo": reference.data_repo, "dvc_remote": reference.dvc_remote}
    if db_url:
        update["db_url"] = db_url
    return platform.model_copy(update=update)


def register_production(
    platform: PlatformSettings, reference: Reference, *, tags: dict[str, str] | None = None
) -> str:
    """A registered model whose production version carries the lineage the trainer writes."""
    client = MlflowClient(tracking_uri=platform.mlflow_tracking_uri)
    name = f"drift-{uuid.uuid4().hex[:10]}"
    run = client.create_run(experiment_id="0")
    client.log_text(run.info.run_id, "a stand-in for model.onnx", "model/README.txt")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    lineage = {
        TAG_DATASET: "breast_cancer",
        TAG_DATASET_REV: reference.rev,
        TAG_FEATURES: json.dumps(reference.features),
        TAG_TARGET: "target",
        TAG_TASK: "classification",
    }
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
        tags=lineage if tags is None else tags,
    )
    client.set_registered_model_alias(name, PRODUCTION, version.version)
    return name


def log_predictions(db_url: str, model: str, rows: np.ndarray, batch: int = 10) -> None:
    """Rows as serving logs them: one record per request, each holding a batch of rows."""
    database = Database(db_url)
    database.create_tables()
    with database.session() as session:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch].tolist()
            session.add(PredictionRecord(
                request_id=uuid.uuid4().hex, model=model, version="1", inputs=chunk,
                outputs=[[0.5, 0.5]] * len(chunk), latency_ms=1.0,
            ))
    database.dispose()


def calm_rows(reference: Reference, n: int = 200, seed: int = 3) -> np.ndarray:
    return reference.frame[reference.features].sample(n, random_state=seed).to_numpy(dtype=float)


def shifted_rows(reference: Reference, n: int = 200) -> np.ndarray:
    rows = calm_rows(reference, n, seed=4)
    spread = reference.frame[reference.features].to_numpy(dtype=float).std(axis=0)
    rows[:, :SHIFTED] += 3 * spread[:SHIFTED]
    return rows


@pytest.fixture
def serve_monitor() -> Iterator[object]:
    stack: list = []

    def start(platform: PlatformSettings, **options: object) -> str:
        context = running_app(create_app(MonitorSettings(platform=platform, **options)))
        stack.append(context)
        return context.__enter__()

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def drift(base: str, model: str, **params: object) -> httpx.Response:
    return httpx.get(f"{base}/drift/{model}", params=params, headers=auth("viewer"), timeout=60)


def test_rows_from_the_reference_show_no_drift(platform, db_url, reference, serve_monitor):
    platform = monitor_platform(platform, reference, db_url)
    model = register_production(platform, reference)
    log_predictions(db_url, model, calm_rows(reference))
    base = serve_monitor(platform)

    response = drift(base, model)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["model"] == model and report["version"] == "1"
    assert report["reference"] == {"dataset": "breast_cancer", "rev": reference.rev, "rows": 569}
    assert report["current_rows"] == 200
    assert report["dataset_drift"] is False
    assert [f["name"] for f in report["features"]] == reference.features
    assert report["drift_share"] == sum(f["drifted"] for f in report["features"]) / len(reference.features)
    for feature in report["features"]:
        # 569 reference rows: Evidently picks the K-S test, whose score is a p-value.
        assert feature["method"] == "K-S p_value" and feature["threshold"] == 0.05
        assert feature["drifted"] == (feature["score"] < feature["threshold"])


def test_shifted_features_are_flagged_and_exported(platform, db_url, reference, serve_monitor):
    platform = monitor_platform(platform, reference, db_url)
    model = register_production(platform, reference)
    log_predictions(db_url, model, calm_rows(reference))
    log_predictions(db_url, model, shifted_rows(reference))
    base = serve_monitor(platform)

    # The window holds only the newest rows: the shifted ones.
    report = drift(base, model, window=200).json()
    assert report["current_rows"] == 200
    assert report["dataset_drift"] is True
    drifted = {f["name"] for f in report["features"] if f["drifted"]}
    assert set(reference.features[:SHIFTED]) <= drifted
    assert report["drift_share"] >= SHIFTED / len(reference.features)

    everything = drift(base, model, window=100000).json()
    assert everything["current_rows"] == 400 and everything["dataset_drift"] is True

    # The gauges hold the latest computation: this request's, or the refresher's on the same
    # 400 rows (its default window of 500 covers them all).
    gauges = scrape(base)
    assert gauges[("shipyard_dataset_drift", (("model", model),))] == 1.0
    assert gauges[("shipyard_drift_share", (("model", model),))] == everything["drift_share"]
    for feature in everything["features"]:
        key = ("shipyard_feature_drift_score", (("feature", feature["name"]), ("model", model)))
        assert gauges[key] == pytest.approx(feature["score"])


def test_background_refresh_fills_the_gauges(platform, reference, serve_monitor):
    platform = monitor_platform(platform, reference)
    model = register_production(platform, reference)
    log_predictions(platform.database_url, model, shifted_rows(reference))
    base = serve_monitor(platform, refresh_interval_s=0.5)

    # Nobody asks for /drift: the refresher alone must compute it.
    key = ("shipyard_dataset_drift", (("model", model),))
    wait_for(lambda: scrape(base).get(key) == 1.0, timeout=60, what="the background refresh to export drift")
    # The newest verdict is readable without computing anything (the registry's pages show it).
    [latest] = [v for v in httpx.get(f"{base}/drift", headers=auth("viewer"), timeout=10).json()
                if v["model"] == model]
    assert latest["dataset_drift"] is True and latest["current_rows"] == 200 and latest["computed_at"]
    assert httpx.get(f"{base}/drift", timeout=10).status_code == 401
    ready = httpx.get(f"{base}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "mlflow": "ok"}


def test_requests_that_cannot_be_answered_get_clear_errors(platform, reference, serve_monitor):
    platform = monitor_platform(platform, reference)
    model = register_production(platform, reference)
    log_predictions(platform.database_url, model, calm_rows(reference, n=12))
    unlabelled = register_production(platform, reference, tags={})
    base = serve_monitor(platform)

    cases = {
        "unknown model": (drift(base, f"nope-{uuid.uuid4().hex[:6]}"), 404, "not in the registry"),
        "too few rows": (drift(base, model), 409, "has 12 logged prediction rows; drift needs at least 30"),
        "window 0": (drift(base, model, window=0), 422, "window"),
        "window too large": (drift(base, model, window=100001), 422, "window"),
        "no lineage": (drift(base, unlabelled), 409, "lineage"),
        "no token": (httpx.get(f"{base}/drift/{model}", timeout=30), 401, "token"),
    }
    for case, (response, status, message) in cases.items():
        assert response.status_code == status, (case, response.text)
        assert message in response.json()["error"]["message"], (case, response.text)

    client = MlflowClient(tracking_uri=platform.mlflow_tracking_uri)
    client.delete_registered_model_alias(model, PRODUCTION)
    response = drift(base, model)
    assert response.status_code == 404 and "no 'production' version" in response.json()["error"]["message"]


def test_an_empty_database_is_not_an_error(platform, reference, serve_monitor):
    base = serve_monitor(monitor_platform(platform, reference))
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{base}/metrics", timeout=10).status_code == 200
