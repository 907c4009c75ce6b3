"""Windows, drift, data quality and reports against real components: an MLflow server, a DVC
repository, SQLite and PostgreSQL. Passes of the loop are run by the test (``run_pass``), except in
the HTTP test, where the app's own loop closes the windows."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_breast_cancer
from sqlalchemy import update

from services.monitor.app import create_app
from services.monitor.loop import run_pass
from services.monitor.settings import MonitorSettings, WindowSpec
from services.monitor.tables import WindowRecord
from services.monitor.windows import queries
from services.monitor.windows.cutting import period_floor
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database, utcnow
from shipyard_common.errors import NotFound
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
from tests.services.monitor.support import gauge, monitor_maker, windows
from tests.support import auth, running_app, wait_for

SHIFTED = 8


@dataclass(frozen=True)
class Data:
    data_repo: Path
    dvc_remote: Path
    rev: str
    frame: pd.DataFrame
    features: list[str]
    mixed_rev: str
    mixed: pd.DataFrame


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    """breast_cancer, and a small frame with a categorical column, versioned once for the module."""
    root = tmp_path_factory.mktemp("monitor-data")
    repo = DataRepo(root / "data", root / "remote")
    frame = load_breast_cancer(as_frame=True).frame
    rng = np.random.default_rng(0)
    mixed = pd.DataFrame({"x": rng.normal(size=300), "colour": rng.choice(["red", "green", "blue"], 300),
                          "y": rng.normal(size=300)})
    mixed_rev = repo.add("mixed", mixed).rev
    features = [column for column in frame.columns if column != "target"]
    rev = repo.add("breast_cancer", frame).rev
    return Data(repo.path, repo.remote, rev, frame, features, mixed_rev, mixed)


def register(platform: PlatformSettings, data: Data, *, tags: dict[str, str] | None = None,
             versions: int = 1) -> str:
    """A registered model whose versions carry the trainer's lineage; the last one is production."""
    client = MlflowClient(tracking_uri=platform.mlflow_tracking_uri)
    name = f"win-{uuid.uuid4().hex[:10]}"
    client.create_registered_model(name)
    lineage = {TAG_DATASET: "breast_cancer", TAG_DATASET_REV: data.rev,
               TAG_FEATURES: json.dumps(data.features), TAG_TARGET: "target", TAG_TASK: "classification"}
    for _ in range(versions):
        run = client.create_run(experiment_id="0")
        client.set_terminated(run.info.run_id)
        version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model",
                                              run_id=run.info.run_id, tags=lineage if tags is None else tags)
    client.set_registered_model_alias(name, PRODUCTION, version.version)
    return name


def log(db_url: str, model: str, rows: Any, outputs: Any = None, *, at: datetime | None = None,
        batch: int = 10, version: str = "1") -> None:
    """Rows as serving logs them: one record per request, each a batch, answered ``at`` (a minute ago)."""
    database = Database(db_url)
    database.create_tables()
    rows = [[plain(value) for value in row] for row in rows]
    outputs = [[0.5, 0.5]] * len(rows) if outputs is None else [[float(v) for v in o] for o in outputs]
    created = at or utcnow() - timedelta(minutes=1)
    with database.session() as session:
        for start in range(0, len(rows), batch):
            session.add(PredictionRecord(
                request_id=uuid.uuid4().hex, model=model, version=version, inputs=rows[start:start + batch],
                outputs=outputs[start:start + batch], latency_ms=1.0, created_at=created,
            ))
    database.dispose()


def plain(value: Any) -> Any:
    """A value as serving's log writes it: NaN as null, numpy numbers as Python's."""
    if value is None or isinstance(value, str):
        return value
    return None if math.isnan(value) else float(value)


def calm(data: Data, n: int = 200, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the training data, and the one-hot answers of a model that is always right."""
    sample = data.frame.sample(n, random_state=seed)
    return sample[data.features].to_numpy(dtype=float), np.eye(2)[sample["target"].to_numpy()]


def shifted(data: Data, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rows, _ = calm(data, n, seed=4)
    rows[:, :SHIFTED] += 3 * data.frame[data.features].to_numpy(dtype=float).std(axis=0)[:SHIFTED]
    return rows, np.tile([0.1, 0.9], (n, 1))  # and the model answers class 1, whatever comes


@pytest.fixture
def make_monitor(platform: PlatformSettings, data: Data) -> Iterator[Any]:
    with monitor_maker(platform, data_repo=data.data_repo, dvc_remote=data.dvc_remote) as make:
        yield make


def test_calm_then_shifted_rows_make_two_windows_by_rows(make_monitor, db_url, data):
    monitor = make_monitor(db_url)
    model = register(monitor.settings.platform, data)
    log(db_url, model, *calm(data))
    log(db_url, model, *shifted(data))
    log(db_url, model, calm(data, 50)[0])  # the open window

    run_pass(monitor=monitor)
    first, second = windows(monitor, model)
    assert (first.status, first.kind, first.rows, first.requests) == ("ok", "rows", 200, 20)
    assert second.first_prediction_id == first.last_prediction_id + 1
    assert first.dataset_drift is False and first.prediction_drift is False
    assert [f["name"] for f in first.features] == data.features
    for feature in first.features:
        # 569 reference rows: Evidently picks the K-S test, whose score is a p-value.
        assert feature["method"] == "K-S p_value" and feature["threshold"] == 0.05
        assert feature["drifted"] == (feature["score"] < feature["threshold"])
    assert first.drift_share == sum(f["drifted"] for f in first.features) / len(data.features)
    assert first.quality["missing_share"] == 0 and first.quality["schema_mismatch_share"] == 0

    assert second.dataset_drift is True and second.prediction_drift is True
    assert set(data.features[:SHIFTED]) <= {f["name"] for f in second.features if f["drifted"]}
    assert second.quality["out_of_range_share"] > 0  # 3σ pushes some values past the training max
    assert gauge(monitor, "shipyard_dataset_drift", model=model, version="1") == 1.0
    assert gauge(monitor, "shipyard_drift_share", model=model, version="1") == second.drift_share
    assert gauge(monitor, "shipyard_prediction_drift", model=model, version="1") == 1.0
    assert gauge(monitor, "shipyard_windows_total", model=model, version="1", status="ok") == 2
    assert gauge(monitor, "shipyard_window_pending_rows", model=model, version="1") == 50
    name = data.features[0]
    score = gauge(monitor, "shipyard_feature_drift_score", model=model, version="1", feature=name)
    assert score == pytest.approx(second.features[0]["score"])

    # Stored, then read: nothing is computed for a read, and a pass with nothing due closes nothing.
    run_pass(monitor=monitor)
    assert len(windows(monitor, model)) == 2
    drift = queries.get_drift(monitor=monitor, model=model, version=None)
    assert drift.window_id == second.id and drift.reference.rev == data.rev and drift.reference.rows == 569
    assert drift.prediction is not None and drift.prediction.drifted
    assert monitor.references.loads == 1  # two windows, one read of the revision
    page = queries.list_windows(monitor=monitor, model=model, version="1", status=None, before=None, limit=1)
    assert [w.id for w in page.items] == [second.id] and page.next_before == second.id
    assert (monitor.settings.report_path / second.report_path).is_file()


def test_windows_by_time_report_empty_and_small_periods(make_monitor, db_url, data):
    # Periods close when the clock less the grace passes their end: a grace of the current second
    # less one puts the next such moment a minute away, so no period closes while the test runs.
    monitor = make_monitor(db_url, min_rows=30, window_grace_s=(utcnow().second - 1) % 60)
    model = register(monitor.settings.platform, data)
    monitor.settings.windows[model] = WindowSpec(seconds=60)
    start = period_floor(utcnow(), 60) - timedelta(minutes=10)
    rows, answers = calm(data, 100)
    log(db_url, model, rows[:40], outputs=answers[:40], at=start + timedelta(seconds=5))
    # Two periods with nothing logged, then a period of 5 rows, one of 40, and the current one.
    log(db_url, model, rows[40:45], outputs=answers[40:45], at=start + timedelta(minutes=3, seconds=1))
    log(db_url, model, rows[45:85], outputs=answers[45:85], at=start + timedelta(minutes=4, seconds=59))
    log(db_url, model, rows[85:], at=utcnow())

    run_pass(monitor=monitor)
    found = [(w.status, w.rows, w.started_at - start, w.ended_at - start) for w in windows(monitor, model)]
    minute = timedelta(minutes=1)
    assert found[:4] == [
        ("ok", 40, 0 * minute, minute), ("empty", 0, minute, 3 * minute),
        ("too_few_rows", 5, 3 * minute, 4 * minute), ("ok", 40, 4 * minute, 5 * minute),
    ]
    # The periods closed by now hold nothing more: one empty window for them; the current one is open.
    assert [w.status for w in windows(monitor, model)[4:]] == ["empty"]
    assert windows(monitor, model)[1].message == "no predictions were logged in this window (2 periods)"
    assert gauge(monitor, "shipyard_window_pending_rows", model=model, version="1") == 15
    log(db_url, model, rows[:5], at=utcnow())  # counted on top of what the last pass counted
    run_pass(monitor=monitor)
    assert gauge(monitor, "shipyard_window_pending_rows", model=model, version="1") == 20
    assert gauge(monitor, "shipyard_windows_total", model=model, version="1", status="empty") == 2


def test_bad_batches_are_reported_as_such(make_monitor, platform, data):
    monitor = make_monitor(window={"rows": 50})
    db_url = monitor.settings.platform.database_url
    model = register(monitor.settings.platform, data)
    width = len(data.features)
    rows, answers = calm(data, 100)
    log(db_url, model, [[None] * width] * 50)                       # an all-NaN batch
    log(db_url, model, rows[:50, :-1])                              # another width: a schema change
    wild = rows[50:].copy()
    wild[:10] = np.nan                                              # 10 rows of nothing
    wild[10:20, 0] = data.frame[data.features[0]].max() * 10        # 10 values out of range
    log(db_url, model, wild, outputs=answers[50:])
    log(db_url, model, [row[:-1] for row in rows[:45]] + list(rows[:5]))  # 45 rows of another width
    run_pass(monitor=monitor)

    nan, narrow, mixed, mostly_narrow = windows(monitor, model)
    assert (nan.status, nan.rows) == ("all_missing", 50) and nan.quality["missing_share"] == 1.0
    assert narrow.status == "schema_change" and narrow.quality["widths"] == {str(width - 1): 50}
    assert narrow.quality["schema_mismatch_share"] == 1.0 and "none of the 50 rows" in narrow.message
    assert mixed.status == "ok" and mixed.quality["missing_share"] == pytest.approx(10 / 50)
    assert mixed.quality["out_of_range"] == {data.features[0]: pytest.approx(10 / 40)}
    assert mostly_narrow.status == "schema_change" and mostly_narrow.quality["checked_rows"] == 5
    assert gauge(monitor, "shipyard_window_schema_mismatch_share", model=model, version="1") == 0.9
    for status, count in (("all_missing", 1), ("schema_change", 2), ("ok", 1)):
        assert gauge(monitor, "shipyard_windows_total", model=model, version="1", status=status) == count

    # A version without lineage: its windows are errors with a reason, and the loop goes on.
    orphan = register(monitor.settings.platform, data, tags={})
    log(db_url, orphan, rows[:50])
    run_pass(monitor=monitor)
    [error] = windows(monitor, orphan)
    assert error.status == "error" and "lacks the lineage tags" in error.message


def test_unseen_categories_and_one_read_per_revision(make_monitor, data):
    monitor = make_monitor(window={"rows": 100})
    db_url = monitor.settings.platform.database_url
    tags = {TAG_DATASET: "mixed", TAG_DATASET_REV: data.mixed_rev, TAG_FEATURES: json.dumps(["x", "colour"]),
            TAG_TARGET: "y", TAG_TASK: "regression"}
    model = register(monitor.settings.platform, data, tags=tags, versions=2)
    sample = data.mixed.sample(100, random_state=1)
    rows = [[x, colour] for x, colour in zip(sample["x"], sample["colour"], strict=True)]
    rows[:20] = [[x, "purple"] for x, _ in rows[:20]]
    for version in ("1", "2"):
        log(db_url, model, rows, outputs=[[y] for y in sample["y"]], version=version)
    run_pass(monitor=monitor)

    one, two = windows(monitor, model)
    assert one.status == two.status == "ok" and {one.version, two.version} == {"1", "2"}
    assert one.quality["unseen_categories"] == {"colour": {"share": 0.2, "values": ["purple"]}}
    assert one.quality["unseen_category_share"] == 0.2
    kinds = {f["name"]: f["kind"] for f in one.features}
    assert kinds == {"x": "numerical", "colour": "categorical"}
    assert one.prediction_drift is False and one.quality["prediction_drift"]["kind"] == "numerical"
    # Two versions on one revision, two windows: the revision was read and described once.
    assert monitor.references.loads == 1

    # v1 has no alias: the 40 rows it has left are its last window; v2's wait for 60 more.
    for version in ("1", "2"):
        log(db_url, model, rows[:40], outputs=[[y] for y in sample["y"][:40]], version=version)
    run_pass(monitor=monitor)
    [last] = windows(monitor, model)[2:]
    assert (last.version, last.rows, last.status) == ("1", 40, "ok")
    assert gauge(monitor, "shipyard_window_pending_rows", model=model, version="2") == 40
    run_pass(monitor=monitor)  # nothing left of v1: its series go
    assert gauge(monitor, "shipyard_window_rows", model=model, version="1") is None
    assert gauge(monitor, "shipyard_window_rows", model=model, version="2") == 100
    assert (model, "1") not in monitor.windows.known


@pytest.fixture
def served_monitor(platform: PlatformSettings, data: Data) -> Iterator[tuple[str, PlatformSettings]]:
    platform = platform.model_copy(update={"data_repo": data.data_repo, "dvc_remote": data.dvc_remote})
    settings = MonitorSettings(platform=platform, loop_interval_s=0.2, window={"rows": 100}, window_grace_s=0)
    with running_app(create_app(settings)) as base:
        yield base, platform


def get(base: str, path: str, role: str | None = "viewer", **params: Any) -> httpx.Response:
    return httpx.get(f"{base}{path}", params=params, headers=auth(role) if role else {}, timeout=60)


def shipyard(base: str, *args: str, tmp_path: Path) -> Any:
    from typer.testing import CliRunner

    from shipyard_cli.main import app as cli

    env = {"SHIPYARD_MONITOR_URL": base, "SHIPYARD_STATE_DIR": str(tmp_path / "cli"), "COLUMNS": "250",
           "SHIPYARD_API_TOKEN": "test-viewer"}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_the_api_reads_what_the_loop_stored(served_monitor, data, tmp_path):
    base, platform = served_monitor
    model = register(platform, data)
    waiting = register(platform, data)
    assert "no window has closed yet" in get(base, f"/drift/{waiting}").json()["error"]["message"]
    log(platform.database_url, model, *calm(data, 100))

    page = wait_for(lambda: get(base, f"/windows/{model}").json()["items"], timeout=60, what="a window")
    [window] = page
    assert window["status"] == "ok" and window["rows"] == 100 and window["report_url"]
    drift = get(base, f"/drift/{model}").json()
    assert drift["window_id"] == window["id"] and drift["dataset_drift"] is False
    [summary] = [s for s in get(base, "/drift").json() if s["model"] == model]
    assert summary["window_id"] == summary["latest_window_id"] == window["id"]
    assert (summary["status"], summary["current_rows"], summary["labelled"]) == ("ok", 100, None)
    [listed] = get(base, f"/reports/{model}").json()["items"]
    assert listed["url"] == window["report_url"] == f"/reports/{model}/{window['id']}"
    html = get(base, listed["url"])
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "<html" in html.text.lower()
    assert "metric_results" in get(base, listed["url"], format="json").json()
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    assert f'shipyard_windows_total{{model="{model}",status="ok",version="1"}} 1.0' in metrics

    printed = shipyard(base, "drift", model, "--windows", "5", tmp_path=tmp_path)
    assert printed.exit_code == 0, printed.output
    assert f"{model} v1, window #{window['id']}" in printed.output
    assert "dataset drift = False" in printed.output
    assert data.features[0] in printed.output and "predictions" in printed.output
    assert "newest windows" in printed.output and window["report_url"] in printed.output
    missing = shipyard(base, "drift", waiting, tmp_path=tmp_path)
    assert missing.exit_code == 1 and "no window has closed yet" in missing.output

    # A report path in the database that leads outside the report folder is never served.
    database = Database(platform.database_url)
    with database.session() as session:
        session.execute(update(WindowRecord).where(WindowRecord.id == window["id"])
                        .values(report_path="../../../../etc/passwd"))
    database.dispose()
    cases = {
        "traversal": (get(base, listed["url"]), 404, "outside the report folder"),
        "unknown model": (get(base, f"/drift/nope-{uuid.uuid4().hex[:6]}"), 404, "not in the registry"),
        "unknown windows": (get(base, f"/windows/nope-{uuid.uuid4().hex[:6]}"), 404, "not in the registry"),
        "bad window id": (get(base, f"/reports/{model}/abc"), 422, "window_id"),
        "window id 0": (get(base, f"/reports/{model}/0"), 422, "window_id"),
        "window of another model": (get(base, f"/reports/{waiting}/{window['id']}"), 404, "no window"),
        "bad limit": (get(base, f"/windows/{model}", limit=0), 422, "limit"),
        "bad status": (get(base, f"/windows/{model}", status="fine"), 400, "status must be one of"),
        "no token": (get(base, f"/drift/{model}", role=None), 401, "token"),
    }
    for case, (response, status, message) in cases.items():
        assert response.status_code == status, (case, response.text)
        assert message in json.dumps(response.json()["error"]), (case, response.text)


def test_a_report_path_outside_the_folder_is_refused(tmp_path):
    from services.monitor.windows.reports import resolve

    assert resolve(tmp_path, "window-1.json.gz") == (tmp_path / "window-1.json.gz").resolve()
    for bad in ("../x", "/etc/passwd", "a/../../x", "."):
        with pytest.raises(NotFound):
            resolve(tmp_path, bad)
