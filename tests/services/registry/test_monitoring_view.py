"""The registry UI's model page shows what the monitor knows: drift, live accuracy, retraining triggers.

A real monitor app (uvicorn, its own loop) and a real registry on one SQLite platform database and
the session's MLflow server. Predictions and a closed window are written as serving and the window
step write them, labels are sent to the monitor over HTTP, and one loop pass scores them; the
triggers are rows as the retraining step writes them. Then the monitor is stopped: the page still
renders, and says the monitor is unavailable.
"""

from __future__ import annotations

import json
import re
import uuid
from contextlib import ExitStack
from datetime import timedelta
from typing import Any

import httpx
from sklearn.metrics import f1_score

from services.monitor.app import create_app as create_monitor_app
from services.monitor.loop import run_pass
from services.monitor.settings import MAX_WINDOW, MonitorSettings, WindowSpec
from services.monitor.tables import TriggerRecord, WindowRecord
from services.registry.app import create_app as create_registry_app
from services.registry.settings import RegistrySettings
from shipyard_common.db import Database, utcnow
from shipyard_common.lineage import TAG_DATASET, TAG_DATASET_REV, TAG_SIGNATURE, TAG_TASK
from shipyard_common.records import PredictionRecord
from tests.services.registry.model_factory import ModelFactory, tiny_classifier, unique_name
from tests.support import TOKENS, auth, free_port, running_app, test_platform

CLASSES = ["setosa", "versicolor", "virginica"]
REV = "0123456789abcdef0123456789abcdef01234567"


def sign_in(base: str, role: str) -> httpx.Client:
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=60)
    page = client.get("/ui/login").text
    csrf = re.search(r'name="csrf" value="([^"]*)"', page)
    assert csrf, "no csrf field on the login page"
    token = next(t for t, r in TOKENS.items() if r.value == role)
    answer = client.post("/ui/login", data={"token": token, "csrf": csrf.group(1), "next": "/ui/models"})
    assert answer.status_code == 303, answer.text
    return client


def register(factory: ModelFactory) -> str:
    name = unique_name("watched")
    tags = {TAG_TASK: "classification", TAG_SIGNATURE: json.dumps({"classes": CLASSES}),
            TAG_DATASET: "iris", TAG_DATASET_REV: REV}
    for seed in (1, 2):
        factory.register(name, tiny_classifier(seed), tags=tags)
    factory.set_production(name, "1")
    return name


def log_window(database: Database, model: str) -> tuple[int, list[dict[str, Any]], list[int], list[int]]:
    """Ten logged requests of five rows in one closed window that drifts; labels 30% wrong."""
    labels, truth, predicted, ids = [], [], [], []
    with database.session() as session:
        for r in range(10):
            request_id = uuid.uuid4().hex
            outputs = []
            for row in range(5):
                i = r * 5 + row
                outputs.append([0.8 if c == i % 3 else 0.1 for c in range(3)])
                true = (i + 1) % 3 if i % 10 in (0, 3, 8) else i % 3  # 15 of 50 wrong
                labels.append({"request_id": request_id, "row": row, "label": CLASSES[true]})
                truth.append(true)
                predicted.append(i % 3)
            record = PredictionRecord(request_id=request_id, model=model, version="1", role="production",
                                      inputs=[[1.0, 2.0, 3.0, 4.0]] * 5, outputs=outputs, latency_ms=1.0)
            session.add(record)
            session.flush()
            ids.append(record.id)
        now = utcnow()
        window = WindowRecord(model=model, version="1", kind="rows", first_prediction_id=min(ids),
                              last_prediction_id=max(ids), started_at=now - timedelta(minutes=10),
                              ended_at=now, requests=10, rows=50, status="ok", dataset="iris",
                              dataset_rev=REV, dataset_drift=True, drift_share=0.75, drifted_count=3,
                              features=[], quality={})
        session.add(window)
        session.flush()
        return window.id, labels, truth, predicted


def add_triggers(database: Database, model: str) -> None:
    now = utcnow()
    with database.session() as session:
        session.add(TriggerRecord(
            model=model, version="1", cause="drift", reason="75% of features drifted in 3 windows",
            state="completed", flow_run_id="6f1c2d3e-0000-4000-8000-000000000001",
            outcome={"job_id": "job-4b1d2c", "version": "2", "request_id": 41}, window_ids=[1],
            created_at=now - timedelta(hours=2), updated_at=now - timedelta(hours=1), created_by="monitor"))
        session.add(TriggerRecord(
            model=model, version="1", cause="accuracy", reason="accuracy 0.70 below 0.85",
            state="failed", flow_run_id="6f1c2d3e-0000-4000-8000-000000000002", outcome={},
            message="the trainer refused the job: dataset iris has no revision abc", window_ids=[],
            created_at=now - timedelta(minutes=5), updated_at=now, created_by="monitor"))


def section(page: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}".*?(?=<div class="tile"|<section|\Z)', page, re.S)
    assert found, f"no #{element_id} on the page"
    return found.group(0)


def test_model_page_shows_drift_live_accuracy_and_triggers(tmp_path, redis_url, mlflow_server,
                                                           model_factory: ModelFactory) -> None:
    monitor_port = free_port()
    platform = test_platform(
        tmp_path / "state", redis_url=redis_url, mlflow_tracking_uri=mlflow_server,
        events_channel=f"test-events-{uuid.uuid4().hex[:10]}", monitor_url=f"http://127.0.0.1:{monitor_port}",
        serving_url=f"http://127.0.0.1:{free_port()}", trainer_url=f"http://127.0.0.1:{free_port()}",
    )
    database = Database(platform.database_url)
    database.create_tables()
    name = register(model_factory)
    window_id, labels, truth, predicted = log_window(database, name)
    add_triggers(database, name)
    monitor_app = create_monitor_app(MonitorSettings(platform=platform, window=WindowSpec(rows=MAX_WINDOW),
                                                     loop_interval_s=3600))
    with ExitStack() as stack:
        monitor = ExitStack()
        monitor_base = monitor.enter_context(running_app(monitor_app, port=monitor_port))
        stack.callback(monitor.close)
        base = stack.enter_context(running_app(create_registry_app(RegistrySettings(platform=platform))))
        sent = httpx.post(f"{monitor_base}/feedback", json=labels, headers=auth("trainer"), timeout=30)
        assert sent.status_code == 200 and sent.json()["matched"] == 50, sent.text
        run_pass(monitor=monitor_app.state.monitor)

        viewer = sign_in(base, "viewer")
        stack.callback(viewer.close)
        response = viewer.get(f"/ui/models/{name}")
        assert response.status_code == 200, response.text
        page = response.text
        drift = section(page, "drift-tile")
        assert ">drift<" in drift and "75% of features" in drift and "v1" in drift
        tile = section(page, "live-tile")
        expected_f1 = f1_score(truth, predicted, average="macro")
        assert "70%" in tile and f"F1 {expected_f1:.4f}" in tile and "50 labelled" in tile
        live = section(page, "monitoring")
        assert "0.7000" in live and f"{expected_f1:.4f}" in live and f"/ui/models/{name}/versions/1" in live
        triggers = section(page, "triggers")
        rows = re.findall(r'<tr class="trigger">.*?</tr>', triggers, re.S)
        assert len(rows) == 2
        failed, completed = rows  # newest first
        assert "accuracy" in failed and "state-failed" in failed and "has no revision abc" in failed
        assert "drift" in completed and "state-completed" in completed
        assert f"/ui/models/{name}/versions/2" in completed and "job job-4b1d" in completed
        assert "request #41" in completed and "6f1c2d3e" in completed
        assert "monitor unavailable" not in page
        # The window scored is the one the page shows.
        assert httpx.get(f"{monitor_base}/feedback/{name}", headers=auth("viewer"),
                         timeout=30).json()["versions"][0]["latest"]["window_id"] == window_id

        # The monitor stops: the page still renders (another user: nothing cached), saying so.
        monitor.close()
        approver = sign_in(base, "approver")
        stack.callback(approver.close)
        down = approver.get(f"/ui/models/{name}")
        assert down.status_code == 200, down.text
        for element in ("drift-tile", "live-tile", "monitoring", "triggers"):
            assert "monitor unavailable" in section(down.text, element), element
        assert f"/ui/models/{name}/versions/2" in down.text  # the registry's own parts are there
    database.dispose()
