"""Hyperparameter sweeps end to end: the API (and CLI), a Celery worker process, Optuna's study in the
platform database, MLflow's parent and child runs, the best trial's registered version."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from services.trainer.app import create_app
from shipyard_cli.main import app as cli
from shipyard_common.auth import Role
from shipyard_common.datasets import DataRepo
from tests.services.trainer.support import WorkerProcess, job_spec, trainer_settings
from tests.support import TOKENS, auth, running_app, test_platform, wait_for

ENDED = ("succeeded", "failed", "cancelled")


def start_stack(
    state: Path, redis_url: str, mlflow_server: str, **platform: Any
) -> Iterator[dict[str, Any]]:
    """An API (its reconciler every second), one worker and breast_cancer, on the given database."""
    settings = trainer_settings(test_platform(state, redis_url=redis_url, mlflow_tracking_uri=mlflow_server,
                                              **platform), reconcile_interval_s=1)
    frame = load_breast_cancer(as_frame=True).frame
    rev = DataRepo(settings.platform.data_repo_path, settings.platform.dvc_remote_path).add(
        "breast_cancer", frame).rev
    worker = WorkerProcess(settings, state / "worker.log")
    try:
        with running_app(create_app(settings)) as base:
            yield {"settings": settings, "base": base, "rev": rev, "worker": worker}
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str
) -> Iterator[dict[str, Any]]:
    """On SQLite."""
    yield from start_stack(tmp_path_factory.mktemp("sweeps-sqlite"), redis_url, mlflow_server)


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str,
             postgres_url: str) -> Iterator[dict[str, Any]]:
    """On PostgreSQL."""
    yield from start_stack(tmp_path_factory.mktemp("sweeps-pg"), redis_url, mlflow_server,
                           db_url=postgres_url)


def sweep_spec(rev: str, model_name: str, **changes: Any) -> dict[str, Any]:
    base = job_spec(rev=rev, model_name=model_name, model={"type": "mlp", "hidden": [16]},
                    training__epochs=4, training__batch_size=64)
    return {"base": base, "strategy": "random", "objective": {"metric": "val_accuracy"}, "trials": 6,
            "parallelism": 2, "seed": 7,
            "space": {"training.learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                      "model.hidden": {"type": "choice", "values": [[16], [32, 16]]}},
            **changes}


def run_sweep(stack: dict[str, Any], spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    created = httpx.post(f"{stack['base']}/sweeps", json=spec, headers=auth(Role.TRAINER), timeout=60)
    assert created.status_code == 201, created.text
    sweep_id = created.json()["id"]

    def ended() -> dict[str, Any] | None:
        sweep = httpx.get(f"{stack['base']}/sweeps/{sweep_id}", headers=auth(Role.VIEWER)).json()
        return sweep if sweep["state"] in ENDED else None

    try:
        return wait_for(ended, timeout=timeout, interval=1, what=f"sweep {sweep_id} to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{stack['worker'].log_tail()}") from None


def get_job(stack: dict[str, Any], job_id: str) -> dict[str, Any]:
    return httpx.get(f"{stack['base']}/jobs/{job_id}", headers=auth(Role.VIEWER)).json()


def test_a_random_sweep_of_six_trials_registers_its_best(stack):
    # val_loss: a continuous objective, so that one trial is best (accuracy ties on 114 rows).
    sweep = run_sweep(stack, sweep_spec(stack["rev"], "bc-sweep", objective={"metric": "val_loss"}))
    assert sweep["objective"]["direction"] == "minimize"  # the metric's own
    assert sweep["state"] == "succeeded", (sweep["error"], stack["worker"].log_tail())
    trials = sweep["trials"]
    assert [t["number"] for t in trials] == list(range(6)) and {t["state"] for t in trials} == {"complete"}
    assert len({t["params"]["training.learning_rate"] for t in trials}) == 6  # six different draws
    assert all(1e-3 <= t["params"]["training.learning_rate"] <= 3e-2 for t in trials)

    uri = stack["settings"].platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(sweep["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.info.run_id for run in children) == sorted(t["mlflow_run_id"] for t in trials)
    best_child = min(children, key=lambda run: run.data.metrics["val_loss"])
    best = sweep["best"]
    assert best["mlflow_run_id"] == best_child.info.run_id
    assert best["value"] == best_child.data.metrics["val_loss"]  # the objective is the child's metric
    assert best["value"] == min(t["value"] for t in trials)

    version = client.get_model_version("bc-sweep", sweep["model_version"])
    assert version.run_id == best["mlflow_run_id"] and version.tags["shipyard.sweep_id"] == sweep["id"]
    assert len(client.search_model_versions("name = 'bc-sweep'")) == 1  # trials register nothing
    assert get_job(stack, best["job_id"])["model_version"] == sweep["model_version"]
    assert parent.info.status == "FINISHED"

    plot = httpx.get(f"{stack['base']}/sweeps/{sweep['id']}/plot.svg", headers=auth(Role.VIEWER))
    assert plot.status_code == 200 and plot.headers["content-type"].startswith("image/svg+xml")
    assert plot.text.count('class="trial complete"') == 6 and 'class="best-so-far"' in plot.text


def test_pruning_stops_a_trial_with_a_tiny_learning_rate_early(pg_stack):
    """Grid, one trial at a time: 0.03 trains its 15 epochs, then 1e-7 lags it at once and is pruned."""
    spec = sweep_spec(pg_stack["rev"], "bc-prune", strategy="grid", trials=2, parallelism=1,
                      objective={"metric": "val_loss"},
                      space={"training.learning_rate": {"type": "choice", "values": [0.03, 1e-7]}},
                      pruning={"pruner": "median", "startup_trials": 1})
    spec["base"]["training"]["epochs"] = 15
    sweep = run_sweep(pg_stack, spec)
    assert sweep["state"] == "succeeded", (sweep["error"], pg_stack["worker"].log_tail())
    good, tiny = sweep["trials"]
    assert good["params"] == {"training.learning_rate": 0.03} and good["state"] == "complete"
    assert tiny["params"] == {"training.learning_rate": 1e-7} and tiny["state"] == "pruned"
    job = get_job(pg_stack, tiny["job_id"])
    assert job["state"] == "cancelled" and job["error"].startswith("pruned by sweep"), job["error"]
    assert job["progress"]["epoch"] < 15 and job["model_version"] is None  # stopped early
    assert get_job(pg_stack, good["job_id"])["progress"]["epoch"] == 15
    assert tiny["value"] > good["value"]  # its last val_loss, worse than the finished trial's
    assert sweep["best"]["number"] == 0 and sweep["model_version"] is not None
    uri = pg_stack["settings"].platform.mlflow_tracking_uri
    assert MlflowClient(tracking_uri=uri).get_run(tiny["mlflow_run_id"]).info.status == "KILLED"


def test_cross_validation_is_a_sweeps_objective(stack):
    """evaluation.kfold in the base: each trial's objective is its cv_accuracy_mean, as its run logged it."""
    spec = sweep_spec(stack["rev"], "bc-cv", strategy="grid", trials=2,
                      objective={"metric": "cv_accuracy_mean"},
                      space={"training.learning_rate": {"type": "choice", "values": [0.01, 0.003]}})
    spec["base"]["evaluation"] = {"kfold": 3}
    sweep = run_sweep(stack, spec)
    assert sweep["state"] == "succeeded", (sweep["error"], stack["worker"].log_tail())
    assert sweep["objective"] == {"metric": "cv_accuracy_mean", "direction": "maximize"}
    uri = stack["settings"].platform.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri)
    for trial in sweep["trials"]:
        assert trial["state"] == "complete"
        assert trial["value"] == get_job(stack, trial["job_id"])["metrics"]["cv_accuracy_mean"]
        assert trial["value"] == client.get_run(trial["mlflow_run_id"]).data.metrics["cv_accuracy_mean"]
    assert sweep["best"]["value"] == max(t["value"] for t in sweep["trials"]) > 0.85


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"space": {"data.rev": {"type": "choice", "values": ["latest"]}}}, "space.data.rev",
     "fixed for every trial"),
    ({"space": {"training.learnin_rate": {"type": "float", "low": 0.001, "high": 0.1}}},
     "space.training.learnin_rate", "Extra inputs are not permitted"),
    ({"space": {"training.learning_rate": {"type": "float", "low": 0.0, "high": 0.1}}},
     "space.training.learning_rate", "greater than 0"),
    ({"strategy": "grid", "space": {"training.learning_rate": {"type": "float", "low": 0.01, "high": 0.1}}},
     "space.training.learning_rate", "needs a step"),
    ({"objective": {"metric": "cv_accuracy_mean"}}, "objective.metric", "needs evaluation"),
    ({"objective": {"metric": "val_mae"}}, "objective.metric", "not computed for classification"),
])
def test_a_space_a_trial_could_not_run_is_refused_naming_the_field(stack, change, field, message):
    response = httpx.post(f"{stack['base']}/sweeps", json=sweep_spec(stack["rev"], "bc-bad", **change),
                          headers=auth(Role.TRAINER))
    assert response.status_code == 422, response.text
    assert field in response.text and message in response.text


def test_submitting_needs_a_trainer_token_and_an_unknown_sweep_is_404(stack):
    spec = sweep_spec(stack["rev"], "bc-auth")
    assert httpx.post(f"{stack['base']}/sweeps", json=spec).status_code == 401
    assert httpx.post(f"{stack['base']}/sweeps", json=spec, headers=auth(Role.VIEWER)).status_code == 403
    missing = httpx.get(f"{stack['base']}/sweeps/nope", headers=auth(Role.VIEWER))
    assert missing.status_code == 404 and "no sweep" in missing.text


def test_cancelling_a_sweep_cancels_its_running_trials_and_registers_nothing(stack):
    spec = sweep_spec(stack["rev"], "bc-cancel", trials=3, parallelism=1)
    spec["base"]["training"]["epochs"] = 500
    created = httpx.post(f"{stack['base']}/sweeps", json=spec, headers=auth(Role.TRAINER), timeout=60)
    assert created.status_code == 201, created.text
    sweep_id, job_id = created.json()["id"], created.json()["trials"][0]["job_id"]
    wait_for(lambda: get_job(stack, job_id)["progress"]["epoch"] >= 1, timeout=120, what="trial 0 training")

    cancelled = httpx.post(f"{stack['base']}/sweeps/{sweep_id}/cancel", headers=auth(Role.TRAINER))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
    assert [t["state"] for t in cancelled.json()["trials"]] == ["cancelled"]
    job = wait_for(lambda: (j := get_job(stack, job_id))["state"] == "cancelled" and j, timeout=30)
    assert job["model_version"] is None and job["progress"]["epoch"] < 500
    again = httpx.post(f"{stack['base']}/sweeps/{sweep_id}/cancel", headers=auth(Role.TRAINER))
    assert again.status_code == 409 and "already ended as 'cancelled'" in again.text
    time.sleep(2)  # a reconciler round: a cancelled sweep asks for no more trials
    later = httpx.get(f"{stack['base']}/sweeps/{sweep_id}", headers=auth(Role.VIEWER)).json()
    assert len(later["trials"]) == 1 and later["state"] == "cancelled"
    uri = stack["settings"].platform.mlflow_tracking_uri
    parent = MlflowClient(tracking_uri=uri).get_run(cancelled.json()["mlflow_run_id"])
    assert parent.info.status == "KILLED"


def test_the_cli_submits_follows_and_shows_a_sweep(stack, tmp_path):
    env = {"SHIPYARD_TRAINER_URL": stack["base"], "COLUMNS": "200",
           "SHIPYARD_API_TOKEN": next(t for t, r in TOKENS.items() if r == Role.TRAINER),
           "SHIPYARD_STATE_DIR": str(tmp_path / "cli-state")}
    path = tmp_path / "sweep.yaml"
    spec = sweep_spec(stack["rev"], "bc-cli", trials=2, strategy="tpe")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))

    result = CliRunner().invoke(cli, ["sweeps", "submit", str(path), "--follow"], env=env)
    assert result.exit_code == 0, result.output
    sweep_id = result.output.split()[1]
    assert "trial 0 complete" in result.output and "trial 1 complete" in result.output
    assert "registered as bc-cli v1" in " ".join(result.output.split())
    shown = CliRunner().invoke(cli, ["sweeps", "show", sweep_id], env=env)
    assert shown.exit_code == 0 and "val_accuracy" in shown.output and "best: trial" in shown.output
    listed = CliRunner().invoke(cli, ["sweeps", "list"], env=env)
    assert listed.exit_code == 0 and sweep_id in listed.output
