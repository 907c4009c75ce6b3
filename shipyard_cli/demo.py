"""``shipyard demo``: the whole loop on scikit-learn's breast_cancer, printed step by step.

Three development users take part: the pipeline trains and asks for production as
``dev-trainer`` (``dev-trainer-token``), ``dev-admin`` sets the model's gate, and
``dev-approver`` (``dev-approver-token``) approves the request; then serving answers with the new
version and the monitor judges drift.
"""

from __future__ import annotations

import json
import time
import uuid
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
# Retrain when more than a fifth of the features drift in two windows in a row; at most once a minute
# (a demo's cooldown, so that it can run again at once; an hour or a day is more usual).
DEMO_POLICY = {"drift_share_above": 0.2, "consecutive_windows": 2, "cooldown_s": 60}
RETRAIN_TIMEOUT_S = 600.0


def run_demo(platform: PlatformSettings, *, console: Console, keep_running: bool = False) -> dict[str, Any]:
    stack = Stack(platform)
    started_here = False
    if not any(record.alive() for record in stack.records()):
        console.rule("[bold]1. start the stack")
        stack.up(on_started=lambda r: console.print(f"  [green]✓[/green] {r.name:<9} pid {r.pid}"))
        started_here = True
    else:
        console.rule("[bold]1. stack already running")
    demo = Demo(platform, console)
    finished = False
    try:
        outcome = demo.run()
        finished = True
        return outcome
    finally:
        demo.close()
        stopping = started_here and not keep_running
        if stopping:
            console.rule("[bold]10. stop the stack")
            console.print("stopped: " + ", ".join(stack.down()))
        if finished:
            _print_ui(platform, console, stopped=stopping)


class Demo:
    """The demo's steps after the stack is up, each a method, as three development users."""

    def __init__(self, platform: PlatformSettings, console: Console) -> None:
        from sklearn.datasets import load_breast_cancer

        self.platform = platform
        self.console = console
        self.client = ShipyardClient(platform, token=DEV_ADMIN_TOKEN)
        self.approver = ShipyardClient(platform, token=DEV_APPROVER_TOKEN)
        self.frame = load_breast_cancer(as_frame=True).frame
        self.rng = np.random.default_rng(7)

    def close(self) -> None:
        self.client.close()
        self.approver.close()

    def run(self) -> dict[str, Any]:
        result = self.train()
        version = str(result["model_version"])
        request: dict[str, Any] | None = None
        moved: dict[str, Any] | None = None
        if result["request"]["id"] is None:  # a run before this one put this very version in production
            self.console.rule("[bold]3-4. nothing to approve")
            self.console.print(f"  v{version} is already {DEMO_MODEL}'s production version (an earlier run "
                               "of the demo trained this spec, and the flow reused its job): no request")
        else:
            request = self.request(result)
            moved = self.approve(request)
        features = self.serve(version)
        calm, live = self.calm_traffic(features)
        policy = self.set_policy()
        last = self.client.triggers(DEMO_MODEL, limit=1)
        stormy = self.shifted_traffic(features)
        retrained = self.retraining(after=int(last[0]["id"]) if last else 0)
        self.console.print(
            f"[bold]demo done[/bold]: v{version} "
            f"{'requested by alice, approved by bob' if moved else 'already in production'}, served; "
            f"drift unchanged={calm['dataset_drift']}, shifted={stormy['dataset_drift']}; live accuracy "
            f"{live['accuracy']:.3f}; the drift retrained {DEMO_MODEL} by itself: {_made(retrained)}"
        )
        return {"result": result, "request": request, "approved": moved, "calm": calm, "live": live,
                "policy": policy, "shifted": stormy, "retrained": retrained}

    def train(self) -> dict[str, Any]:
        from pipelines.flows import train_and_deploy

        self.console.rule("[bold]2. train_and_deploy as alice: DVC → trainer → registry → request")
        result = train_and_deploy(
            dataset_name="breast_cancer", frame=self.frame, model_name=DEMO_MODEL, platform=self.platform,
            token=DEV_TRAINER_TOKEN, promotion="request", reason=REQUEST_REASON,
        )
        summary = Table("step", "result")
        summary.add_row("dataset revision", str(result["dataset_rev"]))
        summary.add_row("job id", str(result["job_id"]))
        summary.add_row("validation accuracy", f"{result['metrics'].get('val_accuracy', float('nan')):.4f}")
        summary.add_row("model version", str(result["model_version"]))
        asked = result["request"]
        summary.add_row("promotion request", f"#{asked['id']} ({asked['state']})" if asked["id"] is not None
                        else f"none ({asked['state']}: v{result['model_version']} is production already)")
        self.console.print(summary)
        return dict(result)

    def request(self, result: dict[str, Any]) -> dict[str, Any]:
        self.console.rule("[bold]3. carol (admin) sets the gate; the request and its verdict")
        gate_rules = self.client.set_gate(DEMO_MODEL, DEMO_GATE, [PRODUCTION])
        self.console.print(f"  gate on {DEMO_MODEL}'s production: " + "; ".join(gate_rules["rules"]))
        request = self.client.get_request(result["request"]["id"])  # the gate's verdict now
        self.console.print(
            f"  request #{request['id']}: {DEMO_MODEL} {request['alias']} → v{request['version']}, "
            f"asked by {request['requested_by']}: {request['reason']!r} ({request['state']})"
        )
        print_gate(request.get("gate"), request["alias"], out=self.console)
        return request

    def approve(self, request: dict[str, Any]) -> dict[str, Any]:
        self.console.rule("[bold]4. bob (approver) approves it (not the requester)")
        moved = self.approver.approve(request["id"], APPROVE_REASON)
        was = f"v{moved['previous_version']}" if moved.get("previous_version") else "none"
        self.console.print(f"  request #{request['id']} approved by bob: {DEMO_MODEL} "
                           f"{moved['alias']} → v{moved['version']} (was {was})")
        return moved

    def serve(self, version: str) -> list[str]:
        self.console.rule("[bold]5. serving follows the production alias")
        wait_until_served(self.client, DEMO_MODEL, version)
        features: list[str] = json.loads(client_version_tags(self.client, DEMO_MODEL, version)[TAG_FEATURES])
        answer = self.client.predict(DEMO_MODEL, self.frame[features].iloc[:1].to_numpy(dtype=float).tolist())
        self.console.print(f"  prediction for row 0 by v{answer['model_version']}: {answer['outputs'][0]}")
        return features

    def calm_traffic(self, features: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        size = window_rows(self.client, DEMO_MODEL)
        self.console.rule(f"[bold]6. two windows of {size} unchanged rows, their true labels later → "
                          "drift? live accuracy?")
        sample = self.frame.sample(2 * size, replace=True, random_state=7)
        before = newest_window_id(self.client, DEMO_MODEL)
        ids = send_rows(self.client, DEMO_MODEL, sample[features].to_numpy(dtype=float), prefix="demo-calm")
        calm = wait_for_window(self.client, DEMO_MODEL, after=before)
        self.console.print(drift_table(calm))
        labels = [{"request_id": request_id, "row": row, "label": int(label)}
                  for (request_id, row), label in zip(ids, sample["target"], strict=True)]
        sent = self.client.send_feedback(labels)
        self.console.print(f"  {len(labels)} true labels sent as carol (POST /feedback): {sent}")
        live = wait_for_live(self.client, DEMO_MODEL, window_id=int(calm["window_id"]))
        window = live["performance_window_id"]
        self.console.print(f"  live accuracy of v{live['version']} on window #{window}:"
                           f" {live['accuracy']:.3f} over {live['labelled']} labelled rows"
                           f" (F1 {live['f1']:.3f})")
        return calm, live

    def set_policy(self) -> dict[str, Any]:
        self.console.rule("[bold]7. bob sets a retraining policy: drift in 2 windows in a row")
        policy = self.approver.put_policy(DEMO_MODEL, DEMO_POLICY)
        self.console.print(f"  {DEMO_MODEL} retrains by itself when more than "
                           f"{policy['drift_share_above']:.0%} of its features drift in "
                           f"{policy['consecutive_windows']} windows in a row, at most once a minute")
        return policy

    def shifted_traffic(self, features: list[str]) -> dict[str, Any]:
        self.console.rule(f"[bold]8. two windows with {SHIFTED_FEATURES} features shifted by 3σ → drift?")
        size = window_rows(self.client, DEMO_MODEL)
        rows = self.frame[features].sample(2 * size, replace=True, random_state=8).to_numpy(dtype=float)
        columns = self.rng.choice(len(features), size=SHIFTED_FEATURES, replace=False)
        rows[:, columns] += 3 * self.frame[features].to_numpy(dtype=float).std(axis=0)[columns]
        before = newest_window_id(self.client, DEMO_MODEL)
        send_rows(self.client, DEMO_MODEL, rows, prefix="demo-shifted")
        stormy = wait_for_window(self.client, DEMO_MODEL, after=before)
        self.console.print(drift_table(stormy))
        return stormy

    def retraining(self, *, after: int) -> dict[str, Any]:
        from shipyard_cli.retraining import trigger_table

        self.console.rule("[bold]9. the monitor starts the retrain flow by itself; the new version asks for "
                          "production")
        trigger = wait_for_trigger(self.client, DEMO_MODEL, after=after)
        self.console.print(trigger_table([trigger]))
        request_id = (trigger.get("outcome") or {}).get("request_id")
        if request_id:
            request = self.client.get_request(request_id)
            self.console.print(f"  request #{request_id} ({request['state']}): {request['reason']!r}; an "
                               f"approver decides (shipyard models approve {request_id} --reason …)")
        return trigger


def _made(trigger: dict[str, Any]) -> str:
    outcome = trigger.get("outcome") or {}
    if trigger["state"] != "completed":
        return f"trigger #{trigger['id']} {trigger['state']}: {trigger.get('message')}"
    return f"v{outcome.get('version')}, promotion request #{outcome.get('request_id')}"


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


def send_rows(
    client: ShipyardClient, model: str, rows: np.ndarray, batch: int = 10, prefix: str | None = None
) -> list[tuple[str, int]]:
    """Predict ``rows`` in requests of ``batch``; with ``prefix``, each request is named ``prefix-N``:
    the (request id, row) of every row, for its true label later."""
    sent: list[tuple[str, int]] = []
    for number, start in enumerate(range(0, len(rows), batch)):
        chunk = rows[start : start + batch]
        request_id = f"{prefix}-{uuid.uuid4().hex[:8]}-{number}" if prefix else None
        answer = client.predict(model, chunk.tolist(), request_id=request_id)
        sent.extend((str(answer.get("request_id") or request_id), row) for row in range(len(chunk)))
    return sent


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


def wait_for_live(
    client: ShipyardClient, model: str, *, window_id: int, timeout: float = 60
) -> dict[str, Any]:
    """``model``'s drift summary once window ``window_id``, or a newer one, has live metrics."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for summary in client.drift_summaries():
            if summary["model"] == model and (summary.get("performance_window_id") or 0) >= window_id:
                return summary
        time.sleep(0.5)
    raise ClientError(504, f"no live metrics for window #{window_id} of {model} within {timeout:.0f}s")


def wait_for_trigger(
    client: ShipyardClient, model: str, *, after: int, timeout: float = RETRAIN_TIMEOUT_S
) -> dict[str, Any]:
    """``model``'s first retraining trigger after trigger ``after``, once it ended (completed or failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        triggers = [t for t in client.triggers(model, limit=5) if int(t["id"]) > after]
        if triggers and triggers[-1]["state"] in ("completed", "failed"):
            return triggers[-1]
        time.sleep(1.0)
    raise ClientError(504, f"no retraining of {model} ended within {timeout:.0f}s ('shipyard retraining "
                           "triggers' shows where it is)")
