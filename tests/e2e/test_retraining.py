"""Retraining that starts itself, on the shared stack: every component real and in its own process.

A model of its own (``bc_retrain``, trained by the ``train_and_deploy`` flow on the dataset the first
deployment versioned, and approved to production), so that ``breast_cancer``'s production and its
windows stay as the other files left them. Rows go through serving; the monitor's loop closes the
windows (200 rows each), checks the policy and starts the ``retrain`` deployment through the trainer;
the deployments process runs the flow, which trains, registers and asks for production.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sklearn.datasets import load_breast_cancer
from sqlalchemy import select
from typer.testing import CliRunner

from services.monitor.tables import WindowRecord
from shipyard_cli.client import ShipyardClient
from shipyard_cli.demo import send_rows, wait_until_served
from shipyard_cli.main import app as cli
from shipyard_common.db import Database
from shipyard_common.lineage import TAG_FEATURES
from shipyard_common.settings import PlatformSettings
from tests.support import auth, wait_for

pytestmark = pytest.mark.e2e

MODEL = "bc_retrain"
WINDOW_ROWS = 200  # the stack's SHIPYARD_MONITOR_WINDOW


@pytest.fixture(scope="module")
def client(stack_platform: PlatformSettings) -> Iterator[ShipyardClient]:
    client = ShipyardClient(stack_platform, token="test-admin")
    yield client
    client.close()


@pytest.fixture(scope="module")
def served(deployed: dict, stack_platform: PlatformSettings, client: ShipyardClient) -> str:
    """bc_retrain's first version, trained by the flow (as test-trainer), approved, served: its version."""
    from pipelines.flows import train_and_deploy

    result = train_and_deploy(
        dataset_name="breast_cancer", dataset_rev=deployed["dataset_rev"], model_name=MODEL,
        spec_overrides={"training": {"epochs": 5}, "model": {"hidden": [16]}},
        platform=stack_platform, token="test-trainer", poll_interval_s=0.5,
    )
    approved = httpx.post(f"{stack_platform.registry_url}/requests/{result['request']['id']}/approve",
                          json={"reason": "e2e retraining"}, headers=auth("approver"), timeout=30)
    approved.raise_for_status()
    version = str(result["model_version"])
    wait_until_served(client, MODEL, version)
    return version


def cli_run(platform: PlatformSettings, token: str, *args: str) -> Any:
    env = {**platform.as_env(), "SHIPYARD_API_TOKEN": token, "COLUMNS": "250"}
    return CliRunner().invoke(cli, ["retraining", *args], env=env)


def ok_windows(platform: PlatformSettings, version: str) -> list[WindowRecord]:
    database = Database(platform.database_url)
    try:
        with database.session() as session:
            query = (select(WindowRecord)
                     .where(WindowRecord.model == MODEL, WindowRecord.version == version,
                            WindowRecord.status == "ok")
                     .order_by(WindowRecord.id))
            return list(session.scalars(query))
    finally:
        database.dispose()


def triggers(platform: PlatformSettings) -> list[dict[str, Any]]:
    page = httpx.get(f"{platform.monitor_url}/triggers", params={"model": MODEL}, headers=auth("viewer"),
                     timeout=30)
    page.raise_for_status()
    return list(page.json()["triggers"])


def requests_of(platform: PlatformSettings) -> list[dict[str, Any]]:
    answer = httpx.get(f"{platform.registry_url}/requests", params={"model": MODEL}, headers=auth("viewer"),
                       timeout=30)
    answer.raise_for_status()
    return list(answer.json())


def test_shifted_traffic_starts_one_retraining_that_asks_for_production_and_calm_traffic_none(
    served, client, stack_platform
):
    p = stack_platform
    made = cli_run(p, "test-approver", "policy", "set", MODEL, "--drift-share-above", "0.2", "--windows", "2",
                   "--cooldown", "3600", "-p", 'spec_overrides={"training": {"epochs": 2}}',
                   "-p", "poll_interval_s=0.5")
    assert made.exit_code == 0, made.output
    features = json.loads(client.get_version(MODEL, served)["tags"][TAG_FEATURES])
    frame = load_breast_cancer(as_frame=True).frame
    versions_before = {str(v["version"]) for v in client.list_versions(MODEL)}
    requests_before = requests_of(p)

    # Unshifted traffic: two windows, no drift, no retraining.
    calm = frame[features].sample(2 * WINDOW_ROWS, random_state=5).to_numpy(dtype=float)
    send_rows(client, MODEL, calm)
    windows = wait_for(lambda: len(w := ok_windows(p, served)) >= 2 and w, timeout=60, interval=0.5,
                       what="two calm windows")
    assert not any(w.dataset_drift for w in windows), [w.drift_share for w in windows]
    time.sleep(3)  # three more passes of the loop over them
    assert triggers(p) == []
    assert {str(v["version"]) for v in client.list_versions(MODEL)} == versions_before
    assert requests_of(p) == requests_before

    # Shifted traffic, three windows of it: one retraining.
    shifted = frame[features].sample(3 * WINDOW_ROWS, random_state=6, replace=True).to_numpy(dtype=float)
    shifted[:, :8] += 3 * frame[features].to_numpy(dtype=float).std(axis=0)[:8]
    send_rows(client, MODEL, shifted)
    [trigger] = wait_for(lambda: triggers(p), timeout=90, interval=0.5, what="a retraining trigger")
    assert trigger["cause"] == "drift" and trigger["version"] == served and trigger["created_by"] == "monitor"
    drifted = {w.id: w for w in ok_windows(p, served)}
    assert len(trigger["window_ids"]) == 2
    assert all(drifted[i].drift_share > 0.2 for i in trigger["window_ids"])

    done = wait_for(lambda: (t := triggers(p)[0])["state"] in ("completed", "failed") and t, timeout=300,
                    interval=1, what="the retraining's end")
    assert done["state"] == "completed", done["message"]
    outcome = done["outcome"]
    assert outcome["version"] not in versions_before and outcome["job_id"]
    request = httpx.get(f"{p.registry_url}/requests/{outcome['request_id']}", headers=auth("viewer"),
                        timeout=30).json()
    assert request["state"] == "pending" and request["version"] == outcome["version"]
    assert request["model"] == MODEL and request["alias"] == "production"
    assert request["reason"].startswith(f"retrain from v{served}: drift share above 0.2")
    # The pipelines' token: another person approves.
    assert request["requested_by"].startswith("role:trainer#")
    job = client.get_job(outcome["job_id"])
    assert job["spec"]["init_from"] == {"model_name": MODEL, "version": served}
    assert job["spec"]["training"]["epochs"] == 2  # the policy's parameters reached the flow

    # The flood goes on (all three shifted windows closed): the cooldown holds, still one.
    wait_for(lambda: len(ok_windows(p, served)) >= 5, timeout=60, interval=0.5, what="the last window")
    time.sleep(3)
    assert len(triggers(p)) == 1
    assert str(client.get_model(MODEL)["aliases"]["production"]) == served  # nothing moved production
    metrics = httpx.get(f"{p.monitor_url}/metrics", timeout=30).text
    assert f'shipyard_retraining_triggers_total{{cause="drift",model="{MODEL}"}} 1.0' in metrics
    assert f'shipyard_retraining_outcomes_total{{model="{MODEL}",outcome="completed"}} 1.0' in metrics
    assert f'shipyard_retraining_running{{model="{MODEL}"}} 0.0' in metrics
    listed = cli_run(p, "test-viewer", "triggers", MODEL)
    assert listed.exit_code == 0, listed.output
    assert f"v{outcome['version']}, promotion request #{request['id']}" in listed.output
