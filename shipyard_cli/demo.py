"""``shipyard demo``: the whole loop on scikit-learn's breast_cancer, printed step by step.

Three development users take part: the pipeline trains and asks for production as
``dev-trainer`` (``dev-trainer-token``), ``dev-admin`` sets the model's gate, and
``dev-approver`` (``dev-approver-token``) approves the request; then serving answers with the new
version and the monitor judges drift.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from shipyard_cli.client import ClientError, ShipyardClient, ui_url
from shipyard_cli.drift import drift_table
from shipyard_cli.stack import Stack
from shipyard_cli.views import print_gate
from shipyard_common.lineage import PRODUCTION, TAG_FEATURES
from shipyard_common.settings import DEV_ADMIN_TOKEN, DEV_APPROVER_TOKEN, DEV_TRAINER_TOKEN, PlatformSettings

DEMO_MODEL = "breast_cancer"
SHIFTED_FEATURES = 8
# The demo's gate: a floor, and no worse than production by more than two points on the same data.
DEMO_GATE = ["val_accuracy >= 0.9", "val_accuracy >= production - 0.02"]
REQUEST_REASON = "demo: nightly retrain of breast_cancer on the latest data"
APPROVE_REASON = "demo: gate passes and validation accuracy checked"


def run_demo(platform: PlatformSettings, *, console: Console, keep_running: bool = False) -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer

    from pipelines.flows import train_and_deploy

    stack = Stack(platform)
    started_here = False
    if not any(record.alive() for record in stack.records()):
        console.rule("[bold]1. start the stack")
        stack.up(on_started=lambda r: console.print(f"  [green]✓[/green] {r.name:<9} pid {r.pid}"))
        started_here = True
    else:
        console.rule("[bold]1. stack already running")
    client = ShipyardClient(platform, token=DEV_ADMIN_TOKEN)
    approver = ShipyardClient(platform, token=DEV_APPROVER_TOKEN)
    finished = False
    try:
        frame = load_breast_cancer(as_frame=True).frame
        console.rule("[bold]2. train_and_deploy as dev-trainer: DVC → trainer → registry → request")
        result = train_and_deploy(
            dataset_name="breast_cancer", frame=frame, model_name=DEMO_MODEL, platform=platform,
            token=DEV_TRAINER_TOKEN, promotion="request", reason=REQUEST_REASON,
        )
        version = str(result["model_version"])
        summary = Table("step", "result")
        summary.add_row("dataset revision", str(result["dataset_rev"]))
        summary.add_row("job id", str(result["job_id"]))
        summary.add_row("validation accuracy", f"{result['metrics'].get('val_accuracy', float('nan')):.4f}")
        summary.add_row("model version", version)
        summary.add_row("promotion request", f"#{result['request']['id']} ({result['request']['state']})")
        console.print(summary)

        console.rule("[bold]3. dev-admin sets the gate; the request and its verdict")
        gate_rules = client.set_gate(DEMO_MODEL, DEMO_GATE, [PRODUCTION])
        console.print(f"  gate on {DEMO_MODEL}'s production: " + "; ".join(gate_rules["rules"]))
        request = client.get_request(result["request"]["id"])  # the gate's verdict now
        console.print(
            f"  request #{request['id']}: {DEMO_MODEL} {request['alias']} → v{request['version']}, "
            f"asked by {request['requested_by']}: {request['reason']!r} ({request['state']})"
        )
        print_gate(request.get("gate"), request["alias"], out=console)

        console.rule("[bold]4. dev-approver approves it (not the requester)")
        moved = approver.approve(request["id"], APPROVE_REASON)
        was = f"v{moved['previous_version']}" if moved.get("previous_version") else "none"
        console.print(f"  request #{request['id']} approved by dev-approver: {DEMO_MODEL} "
                      f"{moved['alias']} → v{moved['version']} (was {was})")

        console.rule("[bold]5. serving follows the production alias")
        wait_until_served(client, DEMO_MODEL, version)
        features = json.loads(client_version_tags(client, DEMO_MODEL, version)[TAG_FEATURES])
        rng = np.random.default_rng(7)
        answer = client.predict(DEMO_MODEL, frame[features].iloc[:1].to_numpy(dtype=float).tolist())
        console.print(f"  prediction for row 0 by v{answer['model_version']}: {answer['outputs'][0]}")

        size = window_rows(client, DEMO_MODEL)
        console.rule(f"[bold]6. two windows of {size} unchanged rows → drift?")
        calm_rows = frame[features].sample(2 * size, replace=True, random_state=7).to_numpy(dtype=float)
        before = newest_window_id(client, DEMO_MODEL)
        send_rows(client, DEMO_MODEL, calm_rows)
        calm = wait_for_window(client, DEMO_MODEL, after=before)
        console.print(drift_table(calm))

        console.rule(f"[bold]7. two windows with {SHIFTED_FEATURES} features shifted by 3σ → drift?")
        shifted = calm_rows.copy()
        columns = rng.choice(len(features), size=SHIFTED_FEATURES, replace=False)
        shifted[:, columns] += 3 * frame[features].to_numpy(dtype=float).std(axis=0)[columns]
        before = newest_window_id(client, DEMO_MODEL)
        send_rows(client, DEMO_MODEL, shifted)
        stormy = wait_for_window(client, DEMO_MODEL, after=before)
        console.print(drift_table(stormy))
        console.print(
            f"[bold]demo done[/bold]: v{version} requested by dev-trainer, approved by dev-approver, served; "
            f"drift unchanged={calm['dataset_drift']}, shifted={stormy['dataset_drift']}"
        )
        finished = True
        return {"result": result, "request": request, "approved": moved, "calm": calm, "shifted": stormy}
    finally:
        client.close()
        approver.close()
        stopping = started_here and not keep_running
        if stopping:
            console.rule("[bold]8. stop the stack")
            console.print("stopped: " + ", ".join(stack.down()))
        if finished:
            _print_ui(platform, console, stopped=stopping)


def _print_ui(platform: PlatformSettings, console: Console, *, stopped: bool) -> None:
    url = ui_url(platform)
    if stopped:
        console.print(
            f"registry UI: {url} (the stack is stopped now; to keep it open, run "
            "[bold].venv/bin/shipyard up[/bold], or [bold].venv/bin/shipyard demo --keep-running[/bold])"
        )
    else:
        console.print(f"registry UI: {url} (the stack keeps running; [bold].venv/bin/shipyard down[/bold] "
                      "stops it)")


def client_version_tags(client: ShipyardClient, model: str, version: str) -> dict[str, str]:
    for entry in client.list_versions(model):
        if str(entry["version"]) == version:
            return dict(entry.get("tags") or {})
    raise ClientError(404, f"version {version} of {model} is not in the registry")


def wait_until_served(client: ShipyardClient, model: str, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for entry in client.serving_models():
                if entry.get("name") == model and str(entry.get("version")) == version:
                    return
        except ClientError:
            pass
        time.sleep(0.5)
    raise ClientError(503, f"serving did not load {model} v{version} within {timeout:.0f}s")


def send_rows(client: ShipyardClient, model: str, rows: np.ndarray, batch: int = 10) -> None:
    for start in range(0, len(rows), batch):
        client.predict(model, rows[start : start + batch].tolist())


def window_rows(client: ShipyardClient, model: str) -> int:
    """How many rows close one of ``model``'s windows (the monitor's setting for it)."""
    spec = client.windows(model, limit=1)["window"]
    if "rows" not in spec:
        raise ClientError(409, f"the monitor cuts {model}'s windows by time ({spec}); the demo needs "
                               "windows by rows (SHIPYARD_MONITOR_WINDOW='{\"rows\": 200}')")
    return int(spec["rows"])


def newest_window_id(client: ShipyardClient, model: str) -> int:
    """The id of ``model``'s newest closed window (0 before the first)."""
    items = client.windows(model, limit=1)["items"]
    return int(items[0]["id"]) if items else 0


def wait_for_window(
    client: ShipyardClient, model: str, *, after: int, windows: int = 2, timeout: float = 90
) -> dict[str, Any]:
    """The drift of the newest window once ``windows`` windows have closed after window ``after``.

    Rows sent to fill two windows make the second one theirs alone, whatever was pending before;
    the monitor's loop closes them once the prediction log holds them (a few seconds).
    """
    deadline = time.monotonic() + timeout
    while True:
        items = client.windows(model, limit=windows)["items"]
        fresh = [item for item in items if int(item["id"]) > after]
        if len(fresh) >= windows:
            newest = fresh[0]
            if newest["status"] != "ok":
                raise ClientError(409, f"window #{newest['id']} of {model} is {newest['status']}: "
                                       f"{newest['message']}")
            return client.drift(model, version=str(newest["version"]))
        if time.monotonic() > deadline:
            raise ClientError(504, f"{windows} windows of {model} did not close within {timeout:.0f}s "
                                   f"({len(fresh)} did)")
        time.sleep(0.5)
