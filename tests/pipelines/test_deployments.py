"""The deployed flows through a real Prefect server and the deployments process (``pipelines.serve``),
against the whole stack: training end to end, the cache, retries while the trainer is down, schedules."""

from __future__ import annotations

import json
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from pipelines.flows import frame_to_csv, prefect_api
from pipelines.runs import (
    deployment_name,
    failure_message,
    read_result,
    read_run,
    start_pipeline,
    wait_for_run,
)
from shipyard_cli.main import app
from tests.support import auth, stop_process_group, wait_for

MODEL = "bc_pipeline"
SMALL = {"training": {"epochs": 3}, "model": {"hidden": [16]}}


@pytest.fixture(scope="module")
def csv_path(stack_platform) -> str:
    return str(frame_to_csv(load_breast_cancer(as_frame=True).frame, stack_platform, "bc_pipeline"))


def task_runs(platform, run_id: str) -> list:
    with prefect_api(platform), get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)


def jobs_of(platform, model: str) -> list[dict]:
    response = httpx.get(f"{platform.trainer_url}/jobs", params={"model_name": model, "limit": 100},
                         headers=auth("viewer"), timeout=30)
    response.raise_for_status()
    return response.json()


def requests_of(platform, model: str) -> list[dict]:
    response = httpx.get(f"{platform.registry_url}/requests", params={"model": model},
                         headers=auth("viewer"), timeout=30)
    response.raise_for_status()
    return response.json()


def run_to_end(platform, flow: str, parameters: dict, timeout_s: float = 240) -> str:
    run_id = start_pipeline(flow, parameters, platform)
    finished = wait_for_run(run_id, platform, timeout_s=timeout_s, poll_interval_s=0.5)
    assert finished.state is not None and finished.state.is_completed(), failure_message(run_id, platform)
    return run_id


def test_train_and_deploy_through_the_server_asks_for_production_and_a_rerun_trains_nothing(
    stack_platform, csv_path
):
    params = {"dataset_name": "bc_pipeline", "model_name": MODEL, "csv_path": csv_path,
              "spec_overrides": SMALL, "poll_interval_s": 0.5, "reason": "first model"}
    first = run_to_end(stack_platform, "train_and_deploy", params)
    [job] = jobs_of(stack_platform, MODEL)
    assert job["state"] == "succeeded"
    [request] = requests_of(stack_platform, MODEL)
    assert request["state"] == "pending" and request["alias"] == "production"
    assert request["version"] == str(job["model_version"])
    assert request["requested_by"].startswith("role:trainer#")  # the deployments process's token
    assert "holdout 114 rows" in request["reason"] and "(no production version)" in request["reason"]
    names = {t.name.rsplit("-", 1)[0]: t.state_name for t in task_runs(stack_platform, first)}
    assert names["train_model"] == "Completed" and names["evaluate"] == "Completed"
    model = httpx.get(f"{stack_platform.registry_url}/models/{MODEL}", headers=auth("viewer")).json()
    assert "production" not in model["aliases"]  # the flow asked; it moved nothing

    second = run_to_end(stack_platform, "train_and_deploy", params)
    assert len(jobs_of(stack_platform, MODEL)) == 1  # a cache hit: no second job
    states = {t.name.rsplit("-", 1)[0]: t.state_name for t in task_runs(stack_platform, second)}
    assert states["train_model"] == "Cached"
    assert len(requests_of(stack_platform, MODEL)) == 1  # the pending request is found, not doubled

    # Another person approves; then retrain warm-starts from production and compares with it.
    approved = httpx.post(f"{stack_platform.registry_url}/requests/{request['id']}/approve",
                          json={"reason": "looks right"}, headers=auth("approver"), timeout=30)
    assert approved.status_code == 200, approved.text
    retrain = run_to_end(stack_platform, "retrain", {
        "model_name": MODEL, "parent_version": request["version"], "reason": "drift on 3 features",
        "poll_interval_s": 0.5,
    })
    jobs = jobs_of(stack_platform, MODEL)
    retrained = next(j for j in jobs if j["id"] != job["id"])
    assert retrained["spec"]["init_from"] == {"model_name": MODEL, "version": request["version"]}
    assert retrained["spec"]["data"]["rev"] == job["spec"]["data"]["rev"]
    newest = next(r for r in requests_of(stack_platform, MODEL)
                  if r["version"] == str(retrained["model_version"]))
    assert newest["reason"].startswith(f"retrain from v{request['version']}: drift on 3 features")
    assert f"vs production v{request['version']} accuracy" in newest["reason"]
    # The run keeps what it did, for whoever started it (the monitor reads it over the trainer's API).
    result = read_result(retrain, stack_platform)
    assert result is not None and result["job_id"] == retrained["id"]
    assert result["model_version"] == str(retrained["model_version"])
    assert result["request"]["id"] == newest["id"]
    over_http = httpx.get(f"{stack_platform.trainer_url}/pipelines/runs/{retrain}", headers=auth("viewer"),
                          timeout=30).json()
    assert over_http["final"] is True and over_http["state_type"] == "COMPLETED"
    assert over_http["result"] == result and over_http["message"] is None

    # Batch scoring is a deployed pipeline too: the production version scores the dataset it was trained on.
    env = {**stack_platform.as_env(), "COLUMNS": "200"}
    scored = CliRunner().invoke(app, ["pipelines", "run", "batch_predict", "-p", "dataset=bc_pipeline",
                                      "-p", f"model_name={MODEL}", "-p", "chunk_rows=200", "--wait",
                                      "--timeout", "240"], env=env)
    assert scored.exit_code == 0, scored.output
    printed = json.loads(scored.output[scored.output.index("{"):])
    assert printed["model_version"] == request["version"] and printed["alias"] == "production"
    assert printed["rows"] == 569 and printed["chunks"] == 3 and printed["logged_rows"] == 569
    assert printed["output"] == f"bc_pipeline.{MODEL}.predictions" and len(printed["output_rev"]) == 40
    refused = CliRunner().invoke(app, ["pipelines", "run", "batch_predict", "-p", "dataset=../etc",
                                       "-p", f"model_name={MODEL}"], env=env)
    assert refused.exit_code != 0 and "dataset name '../etc' is not allowed" in refused.output


def test_the_trainer_down_during_a_flow_is_retried_until_it_is_back(pipeline_stack, csv_path):
    platform = pipeline_stack.platform
    [trainer] = [r for r in pipeline_stack.records() if r.name == "trainer"]
    stop_process_group(trainer.pid)
    try:
        run_id = start_pipeline("train_and_deploy", {
            "dataset_name": "bc_pipeline", "model_name": f"{MODEL}_retry", "csv_path": csv_path,
            "spec_overrides": {**SMALL, "training": {"epochs": 2, "seed": 5}}, "poll_interval_s": 0.5,
        }, platform)
        wait_for(lambda: any(t.state_name == "AwaitingRetry" for t in task_runs(platform, run_id)),
                 timeout=120, interval=0.5, what="a task waiting to retry")
    finally:
        record = pipeline_stack.start_component(pipeline_stack.service_component("trainer"))
        pipeline_stack.wait_ready(record)
    finished = wait_for_run(run_id, platform, timeout_s=240, poll_interval_s=0.5)
    assert finished.state is not None and finished.state.is_completed(), failure_message(run_id, platform)
    [submit] = [t for t in task_runs(platform, run_id) if t.name.startswith("submit_job")]
    assert submit.run_count >= 2 and submit.state_name == "Completed"
    assert len(jobs_of(platform, f"{MODEL}_retry")) == 1


def test_a_failed_flow_names_the_task_and_why(stack_platform):
    run_id = start_pipeline("ingest", {"name": "nothing", "csv_path": "/no/such/file.csv"}, stack_platform)
    finished = wait_for_run(run_id, stack_platform, timeout_s=120, poll_interval_s=0.5)
    assert finished.state is not None and finished.state.is_failed()
    message = failure_message(run_id, stack_platform)
    assert "task read_csv" in message and "/no/such/file.csv" in message
    assert read_result(run_id, stack_platform) is None  # it returned nothing
    over_http = httpx.get(f"{stack_platform.trainer_url}/pipelines/runs/{run_id}", headers=auth("viewer"),
                          timeout=30).json()
    assert over_http["final"] is True and over_http["state_type"] == "FAILED" and over_http["result"] is None
    assert over_http["message"] == message


def test_a_scheduled_deployment_fires_and_its_runs_are_visible(stack_platform, csv_path):
    env = {**stack_platform.as_env(), "COLUMNS": "200"}
    runner = CliRunner()
    scheduled = runner.invoke(app, ["pipelines", "schedule", "ingest", "--interval", "3",
                                    "-p", "name=bc_scheduled", "-p", f"csv_path={csv_path}"], env=env)
    assert scheduled.exit_code == 0, scheduled.output
    assert "every 3s" in scheduled.output
    try:
        with prefect_api(stack_platform), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(deployment_name("ingest"))

            def completed_runs() -> list:
                # Completed ones only: the scheduler keeps many future runs ahead of the finished ones.
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
                    sort=FlowRunSort.START_TIME_DESC, limit=50)
                return [r for r in runs if r.state_name == "Completed" and r.auto_scheduled
                        and r.parameters.get("name") == "bc_scheduled"]

            # The scheduler's loop, the worker's poll and the run itself: seconds on an idle machine,
            # over 30 s on a loaded CI one.
            [run, *_] = wait_for(completed_runs, timeout=120, interval=1, what="a scheduled run")
        assert read_run(str(run.id), stack_platform).state_name == "Completed"
        listed = runner.invoke(app, ["pipelines", "list"], env=env)
        assert listed.exit_code == 0, listed.output
        assert "every 3s" in listed.output and "Completed" in listed.output
    finally:
        removed = runner.invoke(app, ["pipelines", "unschedule", "ingest"], env=env)
    assert removed.exit_code == 0 and "1 schedule(s) removed" in removed.output


def test_starting_a_run_returns_its_id_at_once(stack_platform, csv_path):

    run_id = start_pipeline("ingest", {"name": "bc_at_once", "csv_path": csv_path}, stack_platform)
    # At once: the run is created, not run (the deployments process runs it), so when its id comes back
    # it has not ended; by state type, as Prefect names sub-states ("Submitting" is a pending run).
    created = read_run(run_id, stack_platform)
    assert created.state_type.name in ("SCHEDULED", "PENDING", "RUNNING"), created.state_name
    assert wait_for_run(run_id, stack_platform, timeout_s=120, poll_interval_s=0.5).state_name == "Completed"


def test_a_pipeline_started_over_http_answers_its_run_id_at_once(stack_platform, csv_path):

    runs = f"{stack_platform.trainer_url}/pipelines"
    body = {"parameters": {"name": "bc_http", "csv_path": csv_path}}
    answer = httpx.post(f"{runs}/ingest/runs", json=body, headers=auth("trainer"), timeout=30)
    assert answer.status_code == 202, answer.text
    run = answer.json()
    assert run["pipeline"] == "ingest" and run["ui_url"].endswith(run["id"])
    # Created, not run (the deployments process runs it): it has not ended when its id comes back.
    created = httpx.get(f"{runs}/runs/{run['id']}", headers=auth("viewer"), timeout=30).json()
    assert created["final"] is False, created

    def state() -> str:
        return str(httpx.get(f"{runs}/runs/{run['id']}", headers=auth("viewer"), timeout=30).json()["state"])

    wait_for(lambda: state() == "Completed", timeout=120, interval=0.5, what="the run started over HTTP")
    ended = httpx.get(f"{runs}/runs/{run['id']}", headers=auth("viewer"), timeout=30).json()
    assert ended["final"] is True and ended["state_type"] == "COMPLETED"
    assert ended["result"]["dataset"] == "bc_http" and ended["result"]["rows"] == 569
    assert len(ended["result"]["rev"]) == 40
    refusals = [
        (httpx.post(f"{runs}/nope/runs", json=body, headers=auth("trainer")), 404, "no pipeline 'nope'"),
        (httpx.post(f"{runs}/ingest/runs", json=body, headers=auth("viewer")), 403, "'trainer' role"),
        (httpx.post(f"{runs}/ingest/runs", json=body), 401, "token"),
        (httpx.post(f"{runs}/ingest/runs", json={"parameters": {"name": 3, "surprise": 1}},
                    headers=auth("trainer"), timeout=30), 400, "parameters"),
        (httpx.get(f"{runs}/runs/not-a-run", headers=auth("viewer")), 404, "UUID"),
    ]
    for response, status, words in refusals:
        assert response.status_code == status and words in response.json()["error"]["message"], response.text
