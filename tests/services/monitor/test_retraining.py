"""Retraining that starts itself: policies, triggers, the one-at-a-time and cooldown rules, racing monitors.

Real components: an MLflow server (the production version), SQLite and PostgreSQL, the monitor's app
over HTTP. The trainer is a test double (:class:`TrainerDouble`): a small HTTP app with the trainer's
two pipeline routes that records every start and answers each run's state as the test sets it; the
real trainer, Prefect and the retrain flow are covered by ``tests/e2e/test_retraining.py``. The
windows are inserted as rows, the way the windows step writes them.
"""

from __future__ import annotations

import inspect
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from mlflow.tracking import MlflowClient
from prometheus_client import CollectorRegistry

from services.monitor.app import create_app
from services.monitor.context import Monitor, create_monitor
from services.monitor.retraining import service
from services.monitor.retraining.schemas import RetrainParameters
from services.monitor.retraining.service import check_policies, follow_triggers
from services.monitor.settings import MonitorSettings
from services.monitor.tables import PolicyRecord, TriggerRecord, WindowRecord
from shipyard_common.db import Database, utcnow
from shipyard_common.lineage import PRODUCTION
from shipyard_common.settings import PlatformSettings
from tests.support import auth, free_port, name_of, running_app, wait_for

DRIFT_POLICY: dict[str, Any] = {"drift_share_above": 0.3, "consecutive_windows": 3, "cooldown_s": 3600}


@dataclass
class TrainerDouble:
    """A test double for the trainer's ``POST /pipelines/retrain/runs`` and ``GET /pipelines/runs/{id}``:
    records each start (its parameters and token) and answers each run as ``runs`` says (default:
    scheduled). ``refuse`` makes starts answer 400 with that message."""

    starts: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    refuse: str | None = None

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/pipelines/{name}/runs")
        async def start(name: str, request: Request) -> JSONResponse:
            body = await request.json()
            if self.refuse:
                return JSONResponse({"error": {"code": "invalid_input", "message": self.refuse}}, 400)
            run_id = str(uuid.uuid4())
            self.starts.append(
                {
                    "pipeline": name,
                    "parameters": body["parameters"],
                    "run": run_id,
                    "authorization": request.headers.get("authorization"),
                }
            )
            return JSONResponse(
                {
                    "id": run_id,
                    "pipeline": name,
                    "state": "Scheduled",
                    "ui_url": f"http://prefect/runs/flow-run/{run_id}",
                },
                202,
            )

        @app.get("/pipelines/runs/{run_id}")
        async def read(run_id: str) -> JSONResponse:
            answer = {"state": "Scheduled", "state_type": "SCHEDULED", "final": False}
            return JSONResponse({"id": run_id, "ui_url": "x", **self.runs.get(run_id, answer)})

        return app

    def complete(self, run_id: str, version: str = "2", request_id: int = 7) -> None:
        self.runs[run_id] = {
            "state": "Completed",
            "state_type": "COMPLETED",
            "final": True,
            "result": {
                "job_id": "job-1",
                "model_version": version,
                "request": {"id": request_id, "state": "pending"},
                "cached": False,
                "dataset_rev": "abc",
                "metrics": {"val_accuracy": 0.97},
            },
        }

    def fail(self, run_id: str, message: str) -> None:
        self.runs[run_id] = {"state": "Failed", "state_type": "FAILED", "final": True, "message": message}


@pytest.fixture
def trainer() -> Iterator[tuple[TrainerDouble, str]]:
    double = TrainerDouble()
    with running_app(double.app()) as url:
        yield double, url


def production_model(platform: PlatformSettings, *, production: bool = True) -> str:
    """A registered model with one version, ``production`` pointing at it (or not)."""
    client = MlflowClient(tracking_uri=platform.mlflow_tracking_uri)
    name = f"retrain-{uuid.uuid4().hex[:10]}"
    run = client.create_run(experiment_id="0")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    if production:
        client.set_registered_model_alias(name, PRODUCTION, version.version)
    return name


def monitor_settings(
    platform: PlatformSettings, db_url: str, trainer_url: str, **options: Any
) -> MonitorSettings:
    return MonitorSettings(
        platform=platform.model_copy(update={"db_url": db_url, "trainer_url": trainer_url}),
        trainer_token="test-trainer",
        **options,
    )


@pytest.fixture
def make_monitor(platform: PlatformSettings) -> Iterator[Any]:
    made: list[Monitor] = []

    def make(db_url: str, trainer_url: str) -> Monitor:
        database = Database(db_url)
        database.create_tables()
        monitor = create_monitor(
            settings=monitor_settings(platform, db_url, trainer_url),
            database=database,
            registry=CollectorRegistry(),
        )
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        monitor.close()
        monitor.database.dispose()


def set_policy(monitor: Monitor, model: str, **values: Any) -> None:
    with monitor.database.session() as session:
        session.merge(PolicyRecord(model=model, **{"lock_version": 0, "created_at": utcnow(), **values}))


def add_windows(
    monitor: Monitor,
    model: str,
    shares: list[float | None],
    *,
    version: str = "1",
    status: str = "ok",
    **columns: Any,
) -> list[int]:
    now = utcnow()
    with monitor.database.session() as session:
        rows = [
            WindowRecord(
                model=model,
                version=version,
                kind="rows",
                started_at=now,
                ended_at=now,
                rows=200,
                status=status,
                drift_share=share,
                dataset_drift=share is not None and share > 0.25,
                **columns,
            )
            for share in shares
        ]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def triggers_of(monitor: Monitor, model: str) -> list[TriggerRecord]:
    with monitor.database.session() as session:
        return list(session.query(TriggerRecord).filter_by(model=model).order_by(TriggerRecord.id))


def sample(monitor: Monitor, name: str, **labels: str) -> float | None:
    metrics = monitor.metrics
    for metric in (metrics.triggers, metrics.trigger_outcomes, metrics.retraining_running):
        for family in metric.collect():
            for found in family.samples:
                if found.name == name and found.labels == labels:
                    return float(found.value)
    return None


# -- policies over HTTP --------------------------------------------------------------------------


def test_policies_are_validated_and_set_by_approvers_only(platform, trainer, tmp_path):
    _, trainer_url = trainer
    db_url = f"sqlite:///{tmp_path / 'monitor.db'}"
    model = production_model(platform)
    unpromoted = production_model(platform, production=False)
    with running_app(
        create_app(monitor_settings(platform, db_url, trainer_url, loop_interval_s=3600))
    ) as base:

        def put(name: str, body: dict[str, Any], role: str | None = "approver") -> httpx.Response:
            return httpx.put(
                f"{base}/policies/{name}", json=body, headers=auth(role) if role else None, timeout=30
            )

        refusals = [
            (put("no-such-model", DRIFT_POLICY), 404, "no registered model"),
            (put(unpromoted, DRIFT_POLICY), 409, "no production version"),
            (put(model, {"cooldown_s": 10}), 422, "at least one condition"),
            (put(model, {**DRIFT_POLICY, "drift_share_above": 1.5}), 422, "drift_share_above"),
            (put(model, {**DRIFT_POLICY, "consecutive_windows": 0}), 422, "consecutive_windows"),
            (put(model, {**DRIFT_POLICY, "cooldown_s": -1}), 422, "cooldown_s"),
            (put(model, {**DRIFT_POLICY, "accuracy_below": 0}), 422, "accuracy_below"),
            (put(model, {**DRIFT_POLICY, "parameters": {"epochs": 3}}), 422, "epochs"),
            (put(model, {**DRIFT_POLICY, "parameters": {"promotion": "production"}}), 422, "promotion"),
            (
                put(model, {**DRIFT_POLICY, "parameters": {"dataset_rev": "a", "csv_path": "b"}}),
                422,
                "at most one",
            ),
            (put(model, DRIFT_POLICY, role="trainer"), 403, "'approver' role"),
            (put(model, DRIFT_POLICY, role="viewer"), 403, "'approver' role"),
            (put(model, DRIFT_POLICY, role=None), 401, "token"),
        ]
        for response, status, words in refusals:
            assert response.status_code == status, response.text
            assert words in response.text, response.text

        body = {
            **DRIFT_POLICY,
            "accuracy_below": 0.8,
            "parameters": {"spec_overrides": {"training": {"epochs": 2}}},
        }
        created = put(model, body)
        assert created.status_code == 200, created.text
        policy = created.json()
        assert policy["model"] == model and policy["updated_by"] == name_of("approver")
        assert policy["parameters"] == {"spec_overrides": {"training": {"epochs": 2}}}
        assert put(model, {**body, "cooldown_s": 60}, role="admin").json()["cooldown_s"] == 60
        read = httpx.get(f"{base}/policies/{model}", headers=auth("viewer"), timeout=30).json()
        assert read["cooldown_s"] == 60 and read["drift_share_above"] == 0.3
        assert [p["model"] for p in httpx.get(f"{base}/policies", headers=auth("viewer")).json()] == [model]

        assert httpx.delete(f"{base}/policies/{model}", headers=auth("trainer")).status_code == 403
        assert httpx.delete(f"{base}/policies/{model}", headers=auth("approver")).status_code == 200
        assert httpx.get(f"{base}/policies/{model}", headers=auth("viewer")).status_code == 404
        assert httpx.delete(f"{base}/policies/{model}", headers=auth("approver")).status_code == 404


def test_the_parameters_a_policy_may_set_are_those_the_retrain_flow_takes():
    from pipelines.flows import retrain_flow

    taken = set(inspect.signature(retrain_flow.fn).parameters)
    set_by_the_monitor = {"model_name", "parent_version", "reason"}
    in_process_only = {"config"}
    assert set(RetrainParameters.model_fields) == taken - set_by_the_monitor - in_process_only


# -- the whole loop in the app -------------------------------------------------------------------


def test_a_flood_of_drifted_windows_starts_one_retraining_and_records_its_outcome(
    platform, trainer, tmp_path
):
    double, trainer_url = trainer
    db_url = f"sqlite:///{tmp_path / 'monitor.db'}"
    model = production_model(platform)
    calm = production_model(platform)
    settings = monitor_settings(platform, db_url, trainer_url, loop_interval_s=0.2)
    with running_app(create_app(settings)) as base:
        for name in (model, calm):
            body = {**DRIFT_POLICY, "parameters": {"spec_overrides": {"training": {"epochs": 2}}}}
            assert (
                httpx.put(f"{base}/policies/{name}", json=body, headers=auth("approver")).status_code == 200
            )
        database = Database(db_url)
        with database.session() as session:
            now = utcnow()
            for name, share in ((model, 0.6), (calm, 0.1)):
                session.add_all(
                    WindowRecord(
                        model=name,
                        version="1",
                        kind="rows",
                        started_at=now,
                        ended_at=now,
                        status="ok",
                        drift_share=share,
                    )
                    for _ in range(20)
                )

        def listed(**params: Any) -> list[dict[str, Any]]:
            page = httpx.get(f"{base}/triggers", params=params, headers=auth("viewer"), timeout=30).json()
            return list(page["triggers"])

        [started] = wait_for(lambda: listed(model=model, state="started"), timeout=20, what="a trigger")
        assert (
            started["cause"] == "drift" and started["version"] == "1" and started["created_by"] == "monitor"
        )
        assert "drift share above 0.3 in 3 window(s) in a row of v1" in started["reason"]
        assert len(started["window_ids"]) == 3
        assert started["flow_run_url"].endswith(started["flow_run_id"])
        [start] = double.starts
        assert start["pipeline"] == "retrain" and start["authorization"] == "Bearer test-trainer"
        assert start["parameters"] == {
            "model_name": model,
            "parent_version": "1",
            "reason": started["reason"],
            "spec_overrides": {"training": {"epochs": 2}},
        }
        metrics = httpx.get(f"{base}/metrics").text
        assert f'shipyard_retraining_running{{model="{model}"}} 1.0' in metrics

        double.complete(start["run"], version="2", request_id=41)
        done = wait_for(
            lambda: (t := listed(model=model)[0])["state"] == "completed" and t,
            timeout=20,
            what="the trigger completed",
        )
        assert done["outcome"] == {
            "job_id": "job-1",
            "version": "2",
            "request_id": 41,
            "request_state": "pending",
            "cached": False,
            "dataset_rev": "abc",
            "metrics": {"val_accuracy": 0.97},
        }
        assert done["finished_at"] is not None and done["message"] is None
        # More passes over the same flood, and more drifted windows: the cooldown holds.
        with database.session() as session:
            session.add_all(
                WindowRecord(
                    model=model,
                    version="1",
                    kind="rows",
                    started_at=now,
                    ended_at=now,
                    status="ok",
                    drift_share=0.7,
                )
                for _ in range(5)
            )
        wait_for(
            lambda: (m := httpx.get(f"{base}/metrics").text) and f'model="{model}"}} 0.0' in m,
            timeout=10,
            what="the running gauge back at 0",
        )
        threading.Event().wait(1.0)
        assert len(listed(model=model)) == 1 and len(double.starts) == 1
        assert listed(model=calm) == []
        metrics = httpx.get(f"{base}/metrics").text
        assert f'shipyard_retraining_triggers_total{{cause="drift",model="{model}"}} 1.0' in metrics
        assert f'shipyard_retraining_outcomes_total{{model="{model}",outcome="completed"}} 1.0' in metrics
        assert f'shipyard_retraining_running{{model="{model}"}} 0.0' in metrics
        one = httpx.get(f"{base}/triggers/{done['id']}", headers=auth("viewer")).json()
        assert one == done
        assert httpx.get(f"{base}/triggers/999999", headers=auth("viewer")).status_code == 404
        # Ids past a BIGINT are FastAPI's 422 (they overflowed the driver: a 500), ids within it a 404.
        for huge in ("99999999999999999999", str(2**63)):
            for path in (f"/triggers/{huge}", f"/windows/{model}?before={huge}",
                         f"/reports/{model}?before={huge}"):
                answer = httpx.get(f"{base}{path}", headers=auth("viewer"))
                assert answer.status_code == 422, (path, answer.text)
                assert answer.json()["error"]["code"] == "validation_error"
        assert httpx.get(f"{base}/triggers/{2**63 - 1}", headers=auth("viewer")).status_code == 404
        last = httpx.get(f"{base}/windows/{model}", params={"before": 2**63 - 1}, headers=auth("viewer"))
        assert last.status_code == 200, last.text
        for token in ("99999999999999999999", "9" * 5000, "²"):
            paged = httpx.get(f"{base}/triggers", params={"page_token": token}, headers=auth("viewer"))
            assert paged.status_code == 404 and "page_token" in paged.json()["error"]["message"]
        database.dispose()


# -- the rules, one pass at a time ---------------------------------------------------------------


def test_drift_needs_its_windows_in_a_row_of_the_production_version(
    make_monitor, platform, trainer, tmp_path
):
    _, trainer_url = trainer
    monitor = make_monitor(f"sqlite:///{tmp_path / 'm.db'}", trainer_url)
    model = production_model(platform)
    set_policy(monitor, model, **DRIFT_POLICY)
    add_windows(monitor, model, [0.5, 0.5])
    add_windows(monitor, model, [0.9, 0.9, 0.9], version="9")  # not production
    add_windows(monitor, model, [0.5, 0.2, 0.5, 0.5])  # a calm window breaks the streak
    assert check_policies(monitor=monitor) == 0
    add_windows(monitor, model, [0.3])  # the threshold is "above": 0.3 itself does not count
    assert check_policies(monitor=monitor) == 0
    first = add_windows(monitor, model, [0.31, 0.5])
    add_windows(monitor, model, [None], status="too_few_rows")  # not a verdict: skipped
    assert check_policies(monitor=monitor) == 0
    last = add_windows(monitor, model, [0.5])
    assert check_policies(monitor=monitor) == 1
    [trigger] = triggers_of(monitor, model)
    assert trigger.cause == "drift" and trigger.window_ids == [*first, *last]
    assert "(windows " in trigger.reason and "0.31, 0.50, 0.50)" in trigger.reason


def test_windows_that_fired_once_never_fire_again(make_monitor, platform, trainer, tmp_path):
    double, trainer_url = trainer
    monitor = make_monitor(f"sqlite:///{tmp_path / 'm.db'}", trainer_url)
    model = production_model(platform)
    set_policy(monitor, model, **{**DRIFT_POLICY, "cooldown_s": 0})
    add_windows(monitor, model, [0.5] * 4)
    assert check_policies(monitor=monitor) == 1
    assert check_policies(monitor=monitor) == 0  # one at a time: the first still runs
    double.complete(double.starts[0]["run"])
    assert follow_triggers(monitor=monitor) == 1
    assert check_policies(monitor=monitor) == 0  # no cooldown, but no new windows either
    add_windows(monitor, model, [0.5] * 2)
    assert check_policies(monitor=monitor) == 0  # 2 new ones, 3 needed
    add_windows(monitor, model, [0.5])
    assert check_policies(monitor=monitor) == 1
    assert [t.state for t in triggers_of(monitor, model)] == ["completed", "started"]


def test_accuracy_below_the_floor_on_enough_labels_fires(make_monitor, platform, trainer, tmp_path):
    _, trainer_url = trainer
    monitor = make_monitor(f"sqlite:///{tmp_path / 'm.db'}", trainer_url)
    model = production_model(platform)
    set_policy(monitor, model, accuracy_below=0.8, min_labelled=50, cooldown_s=0)
    add_windows(monitor, model, [0.0], labelled=10, accuracy=0.4)  # too few labels to judge
    add_windows(monitor, model, [0.0], labelled=80, accuracy=0.9)
    assert check_policies(monitor=monitor) == 0
    [window] = add_windows(monitor, model, [0.0], labelled=60, accuracy=0.7)
    assert check_policies(monitor=monitor) == 1
    [trigger] = triggers_of(monitor, model)
    assert trigger.cause == "accuracy" and trigger.window_ids == [window]
    assert "live accuracy 0.700 below 0.8 on 60 labelled rows of v1" in trigger.reason


def test_a_schedule_fires_after_its_interval(make_monitor, platform, trainer, tmp_path):
    double, trainer_url = trainer
    monitor = make_monitor(f"sqlite:///{tmp_path / 'm.db'}", trainer_url)
    model = production_model(platform)
    set_policy(monitor, model, schedule_interval_s=1, cooldown_s=0)
    assert check_policies(monitor=monitor) == 0
    wait_for(lambda: check_policies(monitor=monitor) == 1, timeout=5, interval=0.2, what="the schedule")
    double.complete(double.starts[0]["run"])
    follow_triggers(monitor=monitor)
    assert check_policies(monitor=monitor) == 0  # counted from the last retraining
    wait_for(lambda: check_policies(monitor=monitor) == 1, timeout=5, interval=0.2, what="the schedule again")
    assert [t.cause for t in triggers_of(monitor, model)] == ["schedule", "schedule"]


def test_a_trigger_that_cannot_start_is_recorded_and_retried_after_a_backoff(
    make_monitor, platform, tmp_path
):
    monitor = make_monitor(
        f"sqlite:///{tmp_path / 'm.db'}", f"http://127.0.0.1:{free_port()}"
    )  # nobody there
    model = production_model(platform)
    set_policy(monitor, model, **{**DRIFT_POLICY, "cooldown_s": 2})
    add_windows(monitor, model, [0.5] * 3)
    for _ in range(3):
        assert check_policies(monitor=monitor) == 0
    [failed] = triggers_of(monitor, model)  # one try within the backoff, not one per pass
    assert failed.state == "failed" and "the trainer cannot be reached" in (failed.message or "")
    assert failed.finished_at is not None and failed.active_model is None
    assert sample(monitor, "shipyard_retraining_outcomes_total", model=model, outcome="failed") == 1.0
    # After the backoff (min(cooldown, 60 s): here 2 s) it tries again, with the same windows.

    def tried_again() -> bool:
        check_policies(monitor=monitor)
        return len(triggers_of(monitor, model)) == 2

    wait_for(tried_again, timeout=10, interval=0.2, what="a second try")
    second = triggers_of(monitor, model)[1]
    assert second.window_ids == failed.window_ids and second.state == "failed"
    assert second.created_at - failed.created_at >= timedelta(seconds=2)


def test_a_refused_start_and_a_failed_run_are_recorded_with_why(make_monitor, platform, trainer, tmp_path):
    double, trainer_url = trainer
    monitor = make_monitor(f"sqlite:///{tmp_path / 'm.db'}", trainer_url)
    model = production_model(platform)
    set_policy(monitor, model, **{**DRIFT_POLICY, "cooldown_s": 0})
    add_windows(monitor, model, [0.5] * 3)
    double.refuse = "the Prefect server refused the run's parameters"
    assert check_policies(monitor=monitor) == 0
    [refused] = triggers_of(monitor, model)
    assert refused.state == "failed" and refused.message == (
        "the trainer refused the retraining: 400 the Prefect server refused the run's parameters"
    )
    double.refuse = None
    assert check_policies(monitor=monitor) == 1  # the backoff is min(cooldown, 60 s) = 0 here
    double.fail(double.starts[0]["run"], "task train_model failed: the job failed: CUDA out of memory")
    assert follow_triggers(monitor=monitor) == 1
    ran = triggers_of(monitor, model)[1]
    assert ran.state == "failed" and "CUDA out of memory" in (ran.message or "")
    assert sample(monitor, "shipyard_retraining_outcomes_total", model=model, outcome="failed") == 2.0
    assert follow_triggers(monitor=monitor) == 0  # recorded once


def test_a_run_that_starts_running_is_recorded_and_a_stale_pending_trigger_is_failed(
    make_monitor, platform, trainer, tmp_path
):
    double, trainer_url = trainer
    monitor = make_monitor(f"sqlite:///{tmp_path / 'm.db'}", trainer_url)
    model = production_model(platform)
    set_policy(monitor, model, **DRIFT_POLICY)
    add_windows(monitor, model, [0.5] * 3)
    assert check_policies(monitor=monitor) == 1
    double.runs[double.starts[0]["run"]] = {"state": "Running", "state_type": "RUNNING", "final": False}
    assert follow_triggers(monitor=monitor) == 1
    assert triggers_of(monitor, model)[0].state == "running"
    assert follow_triggers(monitor=monitor) == 0

    other = production_model(platform)
    with monitor.database.session() as session:
        old = utcnow() - timedelta(seconds=service.STALE_PENDING_S + 5)
        session.add(
            TriggerRecord(
                model=other,
                version="1",
                cause="manual",
                reason="x",
                state="pending",
                active_model=other,
                created_at=old,
                updated_at=old,
            )
        )
    assert follow_triggers(monitor=monitor) == 1
    [stale] = triggers_of(monitor, other)
    assert stale.state == "failed" and "stopped before it started" in (stale.message or "")


# -- racing monitors ------------------------------------------------------------------------------


def test_two_monitors_racing_on_one_database_start_one_retraining(make_monitor, platform, trainer, db_url):
    double, trainer_url = trainer
    first, second = make_monitor(db_url, trainer_url), make_monitor(db_url, trainer_url)
    model = production_model(platform)
    set_policy(first, model, **{**DRIFT_POLICY, "cooldown_s": 3600})
    add_windows(first, model, [0.6] * 20)
    barrier = threading.Barrier(2)
    started: list[int] = []
    errors: list[BaseException] = []

    def race(monitor: Monitor) -> None:
        try:
            for _ in range(10):
                barrier.wait(timeout=30)
                started.append(check_policies(monitor=monitor))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(m,)) for m in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sum(started) == 1 and len(double.starts) == 1
    assert len(triggers_of(first, model)) == 1


# -- by hand --------------------------------------------------------------------------------------


def test_a_manual_retraining_is_one_at_a_time_and_lists_page_by_page(platform, trainer, tmp_path):
    double, trainer_url = trainer
    db_url = f"sqlite:///{tmp_path / 'monitor.db'}"
    model = production_model(platform)
    with running_app(
        create_app(monitor_settings(platform, db_url, trainer_url, loop_interval_s=0.2))
    ) as base:

        def post(body: dict[str, Any], role: str = "trainer") -> httpx.Response:
            return httpx.post(f"{base}/triggers", json=body, headers=auth(role), timeout=30)

        body = {"model": model, "reason": "new labels arrived", "parameters": {"dataset_rev": "v2"}}
        assert post(body, role="viewer").status_code == 403
        assert post({**body, "model": "nope"}).status_code == 404
        assert post({**body, "parameters": {"surprise": 1}}).status_code == 422
        first = post(body)
        assert first.status_code == 202, first.text
        trigger = first.json()
        assert trigger["state"] == "started" and trigger["cause"] == "manual"
        assert trigger["created_by"] == name_of("trainer")
        assert trigger["parameters"] == {
            "dataset_rev": "v2",
            "model_name": model,
            "parent_version": "1",
            "reason": "new labels arrived",
        }
        busy = post(body)
        assert busy.status_code == 409 and f"trigger {trigger['id']}" in busy.json()["error"]["message"]

        def completed(trigger_id: int) -> bool:
            answer = httpx.get(f"{base}/triggers/{trigger_id}", headers=auth("viewer"), timeout=30).json()
            return bool(answer["state"] == "completed")

        double.complete(double.starts[0]["run"], version="2")
        wait_for(lambda: completed(trigger["id"]), timeout=10, what="the first completed")
        again = post({**body, "reason": "again"})  # no cooldown for a person, once the first ended
        assert again.status_code == 202, again.text
        double.complete(double.starts[1]["run"], version="3")
        wait_for(lambda: completed(again.json()["id"]), timeout=10, what="the second completed")

        def page(token: str | None = None) -> dict[str, Any]:
            params: dict[str, Any] = {"model": model, "max_results": 1}
            if token:
                params["page_token"] = token
            return dict(httpx.get(f"{base}/triggers", params=params, headers=auth("viewer")).json())

        one = page()
        two = page(one["next_page_token"])
        assert [t["reason"] for t in one["triggers"] + two["triggers"]] == ["again", "new labels arrived"]
        assert two["next_page_token"] is None
        by_state = httpx.get(f"{base}/triggers", params={"state": "failed"}, headers=auth("viewer")).json()
        assert by_state["triggers"] == []
        assert (
            httpx.get(f"{base}/triggers", params={"state": "odd"}, headers=auth("viewer")).status_code == 422
        )


def test_the_cli_sets_shows_and_deletes_a_policy_and_lists_and_starts_triggers(platform, trainer, tmp_path):
    from typer.testing import CliRunner

    from shipyard_cli.main import app as cli

    double, trainer_url = trainer
    db_url = f"sqlite:///{tmp_path / 'monitor.db'}"
    model = production_model(platform)
    settings = monitor_settings(platform, db_url, trainer_url, loop_interval_s=0.2)
    with running_app(create_app(settings)) as base:
        env = {**platform.model_copy(update={"monitor_url": base}).as_env(), "COLUMNS": "250"}
        runner = CliRunner()

        def run(*args: str, token: str = "test-approver") -> Any:
            return runner.invoke(cli, ["retraining", *args], env={**env, "SHIPYARD_API_TOKEN": token})

        made = run(
            "policy",
            "set",
            model,
            "--drift-share-above",
            "0.3",
            "--windows",
            "2",
            "--cooldown",
            "600",
            "-p",
            'spec_overrides={"training": {"epochs": 2}}',
        )
        assert made.exit_code == 0, made.output
        assert "drift share > 0.3 in 2 windows" in made.output and "600s" in made.output
        refused = run("policy", "set", model, "--cooldown", "5")
        assert refused.exit_code == 1 and "at least one condition" in refused.output
        shown = run("policy", "show")
        assert shown.exit_code == 0 and model in shown.output and "epochs" in shown.output
        assert run("triggers", model).output.strip() == "no retraining triggers"

        started = run("trigger", model, "--reason", "fresh labels", token="test-trainer")
        assert started.exit_code == 0, started.output
        assert "manual" in started.output and "flow run" in started.output
        assert double.starts[0]["parameters"]["spec_overrides"] == {"training": {"epochs": 2}}  # the policy's
        busy = run("trigger", model, "--reason", "again", token="test-trainer")
        assert busy.exit_code == 1 and "already started" in busy.output
        double.complete(double.starts[0]["run"], version="5", request_id=9)
        listed = wait_for(
            lambda: (r := run("triggers", model)) and "completed" in r.output and r,
            timeout=10,
            what="the trigger completed",
        )
        assert "v5, promotion request #9" in listed.output and "fresh labels" in listed.output

        assert run("policy", "delete", model, token="test-trainer").exit_code == 1  # approvers only
        removed = run("policy", "delete", model)
        assert removed.exit_code == 0 and "policy removed" in removed.output
        assert run("policy", "show", model).exit_code == 1


def test_every_watched_model_has_its_retraining_series_at_zero_before_any_trigger(
    make_monitor, trainer, tmp_path
):
    """A dashboard shows 0 for a model that never retrained, and ``increase()`` sees its first trigger."""
    _, trainer_url = trainer
    monitor = make_monitor(f"sqlite:///{tmp_path / 'm.db'}", trainer_url)
    add_windows(monitor, "watched", [0.1])
    set_policy(monitor, "governed", **DRIFT_POLICY)
    follow_triggers(monitor=monitor)
    for model in ("watched", "governed"):
        assert sample(monitor, "shipyard_retraining_running", model=model) == 0
        for cause in ("drift", "accuracy", "schedule", "manual"):
            assert sample(monitor, "shipyard_retraining_triggers_total", model=model, cause=cause) == 0
        for outcome in ("completed", "failed"):
            assert sample(monitor, "shipyard_retraining_outcomes_total", model=model, outcome=outcome) == 0
    assert sample(monitor, "shipyard_retraining_running", model="unwatched") is None
