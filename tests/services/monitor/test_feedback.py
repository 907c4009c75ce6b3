"""Ground truth against real components: the monitor app, an MLflow server, SQLite and PostgreSQL.

Predictions are logged as serving's shipper writes them (one ``predictions`` row per request, a
batch of rows, class probabilities or values per row) and windows as the window step closes them
(a ``monitor_windows`` row over a range of prediction ids); labels arrive over HTTP, before or
after their predictions and windows, and one loop pass (``run_pass``) joins and scores them.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import f1_score
from sqlalchemy import select
from typer.testing import CliRunner

from services.monitor.app import create_app
from services.monitor.feedback import scoring
from services.monitor.feedback.schemas import MAX_LABELS
from services.monitor.feedback.service import LIVE_VERSIONS, PENDING_TTL
from services.monitor.loop import run_pass
from services.monitor.settings import MAX_WINDOW, MonitorSettings, WindowSpec
from services.monitor.tables import FeedbackRecord, WindowRecord
from shipyard_cli.main import app as cli
from shipyard_common.auth import Role, principal_name
from shipyard_common.db import Database, utcnow
from shipyard_common.lineage import SHADOW, TAG_SIGNATURE, TAG_TASK
from shipyard_common.records import PredictionRecord
from shipyard_common.settings import PlatformSettings
from tests.support import TOKENS, auth, running_app, token_of, wait_for

CLASSES = ["cat", "dog", "fish"]
BATCH = 5
REQUESTS = 10  # per window: 50 rows
# 15 of a window's 50 rows (multiples of 10, and 3 mod 5) get a wrong label: accuracy 0.70.
WRONG = set(range(0, 50, 10)) | set(range(3, 50, 5))


def register(platform: PlatformSettings, task: str, versions: int = 1) -> str:
    """A model whose versions carry the trainer's task and signature (classes in training order)."""
    client = MlflowClient(tracking_uri=platform.mlflow_tracking_uri)
    name = f"feedback-{uuid.uuid4().hex[:10]}"
    run = client.create_run(experiment_id="0")
    client.log_text(run.info.run_id, "a stand-in for model.onnx", "model/README.txt")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    signature = '{"classes": ["cat", "dog", "fish"]}' if task == "classification" else "{}"
    for _ in range(versions):
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                    tags={TAG_TASK: task, TAG_SIGNATURE: signature})
    return name


def probabilities(predicted: int) -> list[float]:
    return [0.8 if index == predicted else 0.1 for index in range(len(CLASSES))]


def log_requests(database: Database, model: str, version: str, answers: dict[str, list[Any]],
                 role: str = "production") -> list[int]:
    """One prediction record per request, as serving's shipper writes it; their ids."""
    with database.session() as session:
        records = [PredictionRecord(request_id=request_id, model=model, version=version, role=role,
                                    inputs=[[float(i)] for i in range(len(outputs))], outputs=outputs,
                                    latency_ms=1.0) for request_id, outputs in answers.items()]
        session.add_all(records)
        session.flush()
        return [record.id for record in records]


def close_window(database: Database, model: str, version: str, ids: list[int]) -> int:
    """A closed window over ``ids``, as the window step writes it."""
    now = utcnow()
    with database.session() as session:
        window = WindowRecord(model=model, version=version, kind="rows", first_prediction_id=min(ids),
                              last_prediction_id=max(ids), started_at=now - timedelta(minutes=5),
                              ended_at=now, requests=len(ids), rows=len(ids) * BATCH, status="ok")
        session.add(window)
        session.flush()
        return window.id


def window_of(database: Database, window_id: int) -> WindowRecord:
    with database.session() as session:
        found = session.get(WindowRecord, window_id)
        assert found is not None
        return found


def gauges(client: TestClient | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (httpx.get(f"{client}/metrics", timeout=30) if isinstance(client, str)
            else client.get("/metrics")).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def live(model: str, version: str) -> tuple[tuple[str, str], ...]:
    return (("model", model), ("version", version))


@dataclass
class Monitor:
    client: TestClient
    app: Any
    database: Database
    platform: PlatformSettings

    def send(self, labels: list[dict[str, Any]], role: str = "trainer") -> Any:
        return self.client.post("/feedback", json=labels, headers=auth(role))

    def run_pass(self) -> None:
        run_pass(monitor=self.app.state.monitor)

    def summary(self, model: str) -> dict[str, Any]:
        response = self.client.get(f"/feedback/{model}", headers=auth("viewer"))
        assert response.status_code == 200, response.text
        return dict(response.json())


def quiet_settings(platform: PlatformSettings, **options: Any) -> MonitorSettings:
    # Windows of the largest size: the window step never closes one over these tests' rows, the
    # tests close theirs as it would.
    return MonitorSettings(platform=platform, window=WindowSpec(rows=MAX_WINDOW), **options)


@pytest.fixture
def monitor(platform: PlatformSettings, db_url: str) -> Iterator[Monitor]:
    """The monitor app on ``db_url``, without its loop: each test runs the passes itself."""
    platform = platform.model_copy(update={"db_url": db_url})
    app = create_app(quiet_settings(platform, loop_interval_s=3600))
    database = app.state.monitor.database
    database.create_tables()
    # No lifespan, so no loop: only this test's passes run.
    # TestClient says Host: testserver, which no service answers to (shipyard_common.edge).
    yield Monitor(TestClient(app, base_url="http://localhost"), app, database, platform)
    app.state.monitor.close()
    database.dispose()


def classification_answers(n: int, wrong: set[int], shift: int = 0) -> tuple[
    dict[str, list[Any]], list[dict[str, Any]], list[int], list[int]
]:
    """``n`` requests of BATCH rows; labels that are wrong for the rows whose index is in ``wrong``.

    The answers predict class ``(i + shift) % 3`` for row i; the truth is class ``i % 3``, except
    for the ``wrong`` rows, whose label is the next class.
    """
    answers: dict[str, list[Any]] = {}
    labels, truth, predicted = [], [], []
    for r in range(n):
        request_id = uuid.uuid4().hex
        answers[request_id] = []
        for row in range(BATCH):
            i = r * BATCH + row
            answers[request_id].append(probabilities((i + shift) % 3))
            true = (i + 1) % 3 if i in wrong else i % 3
            labels.append({"request_id": request_id, "row": row, "label": CLASSES[true]})
            truth.append(true)
            predicted.append((i + shift) % 3)
    return answers, labels, truth, predicted


def test_delayed_labels_give_the_live_accuracy_they_should(monitor: Monitor) -> None:
    """30% wrong labels give accuracy 0.70; late labels re-score closed windows; early ones wait."""
    db = monitor.database
    model = register(monitor.platform, "classification", versions=2)
    first, first_labels, first_truth, first_predicted = classification_answers(REQUESTS, wrong=WRONG)
    wrong_first = sum(t != p for t, p in zip(first_truth, first_predicted, strict=True))
    assert wrong_first == 15  # 30% of 50
    second, second_labels, second_truth, second_predicted = classification_answers(REQUESTS, wrong=set())

    # Window 1 is logged and closed (with a shadow v2 answering the same requests); its labels and
    # window 2's (not logged yet: serving ships its log asynchronously) arrive together.
    ids = log_requests(db, model, "1", first)
    shadow_answers = {request_id: [probabilities(0)] * BATCH for request_id in first}
    shadow_ids = log_requests(db, model, "2", shadow_answers, role=SHADOW)
    window_1 = close_window(db, model, "1", ids)
    shadow_window = close_window(db, model, "2", shadow_ids)
    response = monitor.send(first_labels + second_labels)
    assert response.status_code == 200, response.text
    assert response.json() == {"received": 100, "created": 100, "replaced": 0, "unchanged": 0,
                               "matched": 50, "pending": 50}
    # Stored, not scored: the request computes nothing.
    assert window_of(db, window_1).performance_at is None and window_of(db, window_1).labelled == 0

    monitor.run_pass()
    scored = window_of(db, window_1)
    assert scored.labelled == 50 and scored.accuracy == pytest.approx(0.70, abs=1e-12)
    assert scored.f1 == pytest.approx(f1_score(first_truth, first_predicted, average="macro"), abs=1e-12)
    assert scored.mae is None and scored.performance_at is not None
    # The shadow answered class 0 for every row: its own accuracy from the same labels.
    shadow = window_of(db, shadow_window)
    assert shadow.labelled == 50
    assert shadow.accuracy == pytest.approx(sum(t == 0 for t in first_truth) / 50, abs=1e-12)
    metrics = gauges(monitor.client)
    assert metrics[("shipyard_live_accuracy", live(model, "1"))] == pytest.approx(0.70)
    assert metrics[("shipyard_live_labelled_rows", live(model, "1"))] == 50
    assert metrics[("shipyard_feedback_labels_total", (("matched", "true"), ("model", model)))] == 50

    # Window 2's predictions are logged: its labels are joined now and counted once it closes.
    second_ids = log_requests(db, model, "1", second)
    monitor.run_pass()
    with db.session() as session:
        waiting = session.scalars(select(FeedbackRecord.prediction_id).where(
            FeedbackRecord.request_id.in_(list(second)))).all()
    assert len(waiting) == 50 and all(waiting)
    window_2 = close_window(db, model, "1", second_ids)
    monitor.run_pass()
    assert window_of(db, window_2).accuracy == 1.0 and window_of(db, window_2).labelled == 50
    assert window_of(db, window_1).accuracy == pytest.approx(0.70, abs=1e-12)  # untouched
    assert gauges(monitor.client)[("shipyard_live_accuracy", live(model, "1"))] == 1.0  # the newest window

    # Late corrections to five of window 1's wrong labels re-score the closed window: 0.80.
    fixed = [i for i in range(50) if first_truth[i] != first_predicted[i]][:5]
    corrected = [dict(first_labels[i], label=CLASSES[first_predicted[i]]) for i in fixed]
    response = monitor.send(corrected)
    assert response.json()["replaced"] == 5 and response.json()["matched"] == 5
    assert monitor.send(corrected).json()["unchanged"] == 5  # sent again: idempotent
    monitor.run_pass()
    assert window_of(db, window_1).accuracy == pytest.approx(0.80, abs=1e-12)
    truth = [first_predicted[i] if i in fixed else t for i, t in enumerate(first_truth)]
    assert window_of(db, window_1).f1 == pytest.approx(f1_score(truth, first_predicted, average="macro"))

    # The summary: per version, over every labelled row (exactly as sklearn on all of them), and per window.
    summary = monitor.summary(model)
    v1 = next(v for v in summary["versions"] if v["version"] == "1")
    all_truth, all_predicted = truth + second_truth, first_predicted + second_predicted
    assert v1["task"] == "classification" and v1["overall"]["labelled"] == 100
    assert v1["overall"]["accuracy"] == pytest.approx(0.90)
    assert v1["overall"]["f1"] == pytest.approx(f1_score(all_truth, all_predicted, average="macro"))
    assert [w["window_id"] for w in v1["windows"]] == [window_2, window_1]
    assert v1["latest"]["window_id"] == window_2
    assert [v["version"] for v in summary["versions"]] == ["2", "1"]
    assert summary["joined"] == 100 and summary["rejected"] == 0


def test_labels_that_cannot_be_scored_are_kept_with_the_reason(monitor: Monitor) -> None:
    db = monitor.database
    model = register(monitor.platform, "classification")
    answers, labels, _, _ = classification_answers(2, wrong=set())
    ids = log_requests(db, model, "1", answers)
    window = close_window(db, model, "1", ids)
    first, second = list(answers)
    bad = [{"request_id": first, "row": 0, "label": "bird"},            # not a class
           {"request_id": second, "row": BATCH + 2, "label": "cat"}]    # no such row
    good = [label for label in labels if label["request_id"] != first or label["row"] != 0]
    assert monitor.send(bad + good).status_code == 200
    # A label whose request was never logged, received long ago: no longer waited for.
    with db.session() as session:
        session.add(FeedbackRecord(request_id=uuid.uuid4().hex, row=0, label="cat",
                                   created_at=utcnow() - PENDING_TTL - timedelta(hours=1)))

    monitor.run_pass()
    scored = window_of(db, window)
    assert scored.labelled == len(good) == 9 and scored.accuracy == 1.0
    summary = monitor.summary(model)
    assert summary["joined"] == 11 and summary["rejected"] == 2
    reasons = {(r["request_id"], r["row"]): r["error"] for r in summary["recent_rejected"]}
    assert "'bird' is not one of the version's classes ('cat', 'dog', 'fish')" in reasons[(first, 0)]
    assert "there is no row 7" in reasons[(second, BATCH + 2)]
    with db.session() as session:
        unmatched = session.scalars(select(FeedbackRecord).where(FeedbackRecord.model.is_(None))).all()
    assert [r.error for r in unmatched if r.error] and all(
        "no prediction with this request id was logged" in (r.error or "") for r in unmatched if r.error)
    metrics = gauges(monitor.client)
    assert metrics[("shipyard_feedback_labels_total", (("matched", "false"), ("model", model)))] == 2

    # A corrected label replaces the refused one and is scored.
    assert monitor.send([{"request_id": first, "row": 0, "label": "cat"}]).json()["replaced"] == 1
    monitor.run_pass()
    assert window_of(db, window).labelled == 10
    assert monitor.summary(model)["rejected"] == 1


def test_regression_labels_give_mae_and_rmse(monitor: Monitor) -> None:
    db = monitor.database
    model = register(monitor.platform, "regression")
    answers = {uuid.uuid4().hex: [[float(10 * r + row)] for row in range(BATCH)] for r in range(4)}
    ids = log_requests(db, model, "1", answers)
    window = close_window(db, model, "1", ids)
    errors = [1.0, -1.0, 2.0, -2.0, 0.5] * 4
    labels = []
    for r, request_id in enumerate(answers):
        for row in range(BATCH):
            value = 10 * r + row + errors[r * BATCH + row]
            # A CSV's labels are text: a number as text is read as the number.
            labels.append({"request_id": request_id, "row": row, "label": str(value) if row == 4 else value})
    assert monitor.send(labels).json()["matched"] == 20
    monitor.run_pass()
    scored = window_of(db, window)
    assert scored.labelled == 20 and scored.accuracy is None and scored.f1 is None
    assert scored.mae == pytest.approx(sum(abs(e) for e in errors) / 20)
    assert scored.rmse == pytest.approx(math.sqrt(sum(e * e for e in errors) / 20))
    metrics = gauges(monitor.client)
    assert metrics[("shipyard_live_mae", live(model, "1"))] == pytest.approx(scored.mae)
    assert metrics[("shipyard_live_rmse", live(model, "1"))] == pytest.approx(scored.rmse)
    assert ("shipyard_live_accuracy", live(model, "1")) not in metrics
    overall = monitor.summary(model)["versions"][0]["overall"]
    assert overall["mae"] == pytest.approx(scored.mae) and overall["rmse"] == pytest.approx(scored.rmse)


def test_live_gauges_are_kept_for_the_versions_labelled_last(monitor: Monitor) -> None:
    model = f"many-{uuid.uuid4().hex[:8]}"
    versions = [str(v) for v in range(1, LIVE_VERSIONS + 2)]

    def labelled_window(version: str) -> None:  # scored already: the pass only sets the gauges
        now = utcnow()
        with monitor.database.session() as session:
            session.add(WindowRecord(model=model, version=version, kind="rows", started_at=now,
                                     ended_at=now, status="ok", labelled=10, accuracy=int(version) / 10,
                                     f1=0.5, performance_at=now))

    def shown() -> set[str]:
        metrics = gauges(monitor.client)
        return {v for v in versions if ("shipyard_live_accuracy", live(model, v)) in metrics}

    for version in versions[:-1]:
        labelled_window(version)
    monitor.run_pass()
    assert shown() == set(versions[:-1])
    labelled_window(versions[-1])
    monitor.run_pass()
    assert shown() == set(versions[1:])  # the version labelled longest ago lost its series
    newest = gauges(monitor.client)[("shipyard_live_accuracy", live(model, versions[-1]))]
    assert newest == pytest.approx(int(versions[-1]) / 10)


def test_what_a_post_accepts_and_who_may_send(platform: PlatformSettings) -> None:
    app = create_app(quiet_settings(platform, loop_interval_s=3600))
    app.state.monitor.database.create_tables()
    client = TestClient(app, base_url="http://localhost")
    one = [{"request_id": "r-1", "label": "cat"}]
    assert client.post("/feedback", json=one).status_code == 401
    refused = client.post("/feedback", json=one, headers=auth("viewer"))
    assert refused.status_code == 403 and "'trainer'" in refused.json()["error"]["message"]
    assert client.post("/feedback", json=one, headers=auth("admin")).json()["pending"] == 1

    too_many = [{"request_id": f"r-{i}", "label": 1} for i in range(MAX_LABELS + 1)]
    answer = client.post("/feedback", json=too_many, headers=auth("trainer"))
    assert answer.status_code == 422 and f"at most {MAX_LABELS} items" in answer.json()["error"]["message"]
    repeated = client.post("/feedback", json=[*one, {"request_id": "r-1", "row": 0, "label": "dog"}],
                           headers=auth("trainer"))
    assert repeated.status_code == 422 and "labels 0 and 1 both label row 0" in repeated.text
    for label in (None, True, [1], {"a": 1}, ""):
        bad = client.post("/feedback", json=[{"request_id": "r-2", "label": label}], headers=auth("trainer"))
        assert bad.status_code == 422, label
    assert client.post("/feedback", json=[{"request_id": "r-2", "row": -1, "label": 1}],
                       headers=auth("trainer")).status_code == 422
    # Nothing of the refused calls was stored; the stored label records who sent it.
    with app.state.monitor.database.session() as session:
        stored = session.scalars(select(FeedbackRecord)).all()
    assert [(r.request_id, r.label) for r in stored] == [("r-1", "cat")]
    assert stored[0].created_by == principal_name(token_of("admin"), Role.ADMIN)
    app.state.monitor.close()
    app.state.monitor.database.dispose()


def test_scores_over_windows_combine_exactly_as_sklearn_on_all_rows() -> None:
    import random

    rng = random.Random(7)
    parts, truth, predicted = [], [], []
    for size in (13, 40, 7):
        t = [rng.randrange(4) for _ in range(size)]
        p = [rng.randrange(4) if rng.random() < 0.5 else x for x in t]
        parts.append(scoring.score("classification", list(zip(t, p, strict=True))))
        truth += t
        predicted += p
    combined = scoring.combine(parts)
    assert combined.labelled == 60
    assert combined.accuracy == pytest.approx(sum(a == b for a, b in zip(truth, predicted, strict=True)) / 60)
    assert combined.f1 == pytest.approx(f1_score(truth, predicted, average="macro"))
    # "1", 1 and 1.0 name the same class; text must match a name.
    assert scoring.true_class("1", (0, 1, 2), 3) == 1 and scoring.true_class(2.0, ("0", "1", "2"), 3) == 2
    with pytest.raises(scoring.Unscorable):
        scoring.true_class(3, None, 3)


def test_the_real_loop_scores_labels_sent_with_the_cli(platform: PlatformSettings, tmp_path: Path) -> None:
    """The monitor served by uvicorn with its own loop; ``shipyard feedback`` sends a CSV of labels
    over HTTP, and the loop's scores show up in the summary and the gauges."""
    database = Database(platform.database_url)
    database.create_tables()
    model = register(platform, "classification")
    answers, labels, _, _ = classification_answers(REQUESTS, wrong=WRONG)
    window = close_window(database, model, "1", log_requests(database, model, "1", answers))
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("request_id,row,label\n" + "".join(
        f"{label['request_id']},{label['row']},{label['label']}\n" for label in labels))
    with running_app(create_app(quiet_settings(platform, loop_interval_s=0.2))) as base:
        env = {"SHIPYARD_MONITOR_URL": base, "COLUMNS": "200",
               "SHIPYARD_API_TOKEN": next(t for t, r in TOKENS.items() if r == Role.VIEWER)}
        refused = CliRunner().invoke(cli, ["feedback", str(csv_file)], env=env, catch_exceptions=False)
        assert refused.exit_code == 1 and "needs the 'trainer' role" in refused.output
        env["SHIPYARD_API_TOKEN"] = next(t for t, r in TOKENS.items() if r == Role.TRAINER)
        sent = CliRunner().invoke(cli, ["feedback", str(csv_file)], env=env, catch_exceptions=False)
        assert sent.exit_code == 0, sent.output
        counts = sent.output.split("\n")[3].split("│")[1:-1]
        assert [int(c.strip()) for c in counts] == [50, 50, 0, 0, 50, 0], sent.output
        summary = wait_for(lambda: [v for v in httpx.get(f"{base}/feedback/{model}", headers=auth("viewer"),
                                                             timeout=30).json()["versions"]],
                           timeout=30, what="the loop to score the labels")
        assert summary[0]["latest"]["window_id"] == window
        assert summary[0]["overall"]["accuracy"] == pytest.approx(0.70)
        assert gauges(base)[("shipyard_live_accuracy", live(model, "1"))] == pytest.approx(0.70)
    database.dispose()
