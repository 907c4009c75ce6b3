"""The registry's web UI pages against the bare MLflow REST calls that fetch the same data.

Run from the repository root:  .venv/bin/python bench/registry_ui.py [--help]

Starts a real MLflow server (SQLite store) and the registry service (``python -m services.registry``,
its own SQLite database) under a temporary folder, fills MLflow with ``--models`` models of
``--versions`` versions each (a run per version with params and metrics, the trainer's lineage and
metric tags on the version), signs in to the UI, then times, in alternating order for ``--rounds``
rounds after a warm-up, ``--repeat`` passes over the three pages (medians over the passes):

- models page ``GET /ui/models`` vs ``registered-models/search`` (one page, the UI's page size);
- a model page ``GET /ui/models/{m}`` vs ``registered-models/get`` + ``model-versions/search``
  (the UI's page of versions, newest first);
- the compare page ``GET /ui/models/{m}/compare?a=&b=`` vs ``registered-models/get`` +
  2 × ``model-versions/get`` + 2 × ``runs/get``.

One HTTP client (httpx, keep-alive) times both sides, so the ratio is the UI's own cost. Goal
(issue 10): each page ≤ 1.5× MLflow's own calls (ratio of medians) and p95 < 300 ms. Serving and
the monitor are not started: the pages show them as unknown (their peers answer "connection
refused" at once).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shipyard_cli.processes import Component  # noqa: E402
from shipyard_cli.stack import Stack  # noqa: E402
from shipyard_common.processes import free_port, stop_process_group  # noqa: E402
from shipyard_common.settings import PlatformSettings  # noqa: E402

TOKEN = "bench-viewer-token"
GOAL_RATIO = 1.5
GOAL_P95_MS = 300.0
PAGE_SIZE = 50


def populate(tracking_uri: str, models: int, versions: int, threads: int) -> list[str]:
    """``models`` × ``versions`` versions, each with its own run (params, metrics) and the trainer's tags."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # one line per version created otherwise
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.create_experiment("bench-registry-ui")
    names = [f"bench-model-{i:03d}" for i in range(models)]

    def one_model(name: str) -> None:
        client.create_registered_model(name)
        for v in range(1, versions + 1):
            run = client.create_run(experiment).info.run_id
            accuracy = 0.8 + 0.15 * v / versions
            now = int(time.time() * 1000)
            client.log_batch(
                run,
                metrics=[Metric("val_accuracy", accuracy, now, 0), Metric("val_loss", 1 - accuracy, now, 0)],
                params=[
                    Param(k, str(v * i))
                    for i, k in enumerate(("lr", "epochs", "batch_size", "hidden", "seed"), start=1)
                ],
            )
            tags = {
                "shipyard.dataset": "bench",
                "shipyard.dataset_rev": f"rev{v % 3}",
                "shipyard.metric.val_accuracy": repr(accuracy),
                "shipyard.metric.val_loss": repr(1 - accuracy),
                "shipyard.format": "onnx",
                "shipyard.formats": '["onnx"]',
                "shipyard.signature": json.dumps({"inputs": [{"name": "input", "shape": [-1, 4 + v % 2]}]}),
            }
            client.create_model_version(name, source=f"runs:/{run}/model", run_id=run, tags=tags)
        client.set_registered_model_alias(name, "production", str(versions - 1))

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for done, _ in enumerate(pool.map(one_model, names), start=1):
            if done % 10 == 0 or done == models:
                print(f"  filled {done}/{models} models ({time.monotonic() - started:.0f} s)", flush=True)
    return names


def sign_in(http: httpx.Client, base: str) -> None:
    """Sign in through the login form as a browser does (the form's CSRF field included)."""
    page = http.get(f"{base}/ui/login")
    page.raise_for_status()
    fields = dict(re.findall(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', page.text))
    signed = http.post(f"{base}/ui/login", data={**fields, "token": TOKEN}, follow_redirects=True)
    signed.raise_for_status()
    assert "shipyard_session" in http.cookies, "the sign-in did not set a session cookie"


def timed(call: Callable[[], None]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=40, help="requests per side per page in one pass")
    parser.add_argument("--repeat", type=int, default=5, help="passes over the three pages")
    parser.add_argument("--threads", type=int, default=8, help="parallel writers while filling MLflow")
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="shipyard-bench-registry-"))
    platform = PlatformSettings(
        env="test",
        state_dir=state,
        tokens={TOKEN: "viewer"},
        log_json=False,
        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
        registry_url=f"http://127.0.0.1:{free_port()}",
        serving_url=f"http://127.0.0.1:{free_port()}",
        monitor_url=f"http://127.0.0.1:{free_port()}",
    )
    stack = Stack(platform)
    records = []
    try:
        mlflow = stack.start_component(stack.mlflow_component())
        records.append(mlflow)
        stack.wait_ready(mlflow, timeout=180)
        print(f"filling MLflow with {args.models} models × {args.versions} versions …", flush=True)
        names = populate(platform.mlflow_tracking_uri, args.models, args.versions, args.threads)
        port = int(platform.registry_url.rsplit(":", 1)[1])
        registry = stack.start_component(
            Component(
                name="registry",
                argv=[sys.executable, "-m", "services.registry"],
                port=port,
                env={"SHIPYARD_REGISTRY_PORT": str(port), "SHIPYARD_REGISTRY_PAGE_SIZE": str(PAGE_SIZE)},
                health_url=f"{platform.registry_url}/readyz",
            )
        )
        records.append(registry)
        stack.wait_ready(registry, timeout=120)
        run(platform, names, args)
    finally:
        for record in reversed(records):
            stop_process_group(record.pid)


def run(platform: PlatformSettings, names: list[str], args: argparse.Namespace) -> None:
    ui, api = platform.registry_url, f"{platform.mlflow_tracking_uri}/api/2.0/mlflow"
    model = names[len(names) // 2]
    a, b = str(args.versions - 1), str(args.versions)
    with httpx.Client(timeout=60) as http:
        sign_in(http, ui)
        versions = json.loads(
            json.dumps(
                {"filter": f"name = '{model}'", "max_results": PAGE_SIZE, "order_by": ["version_number DESC"]}
            )
        )

        def bare_compare() -> None:
            http.get(f"{api}/registered-models/get", params={"name": model}).raise_for_status()
            for version in (a, b):
                found = http.get(f"{api}/model-versions/get", params={"name": model, "version": version})
                found.raise_for_status()
                http.get(
                    f"{api}/runs/get", params={"run_id": found.json()["model_version"]["run_id"]}
                ).raise_for_status()

        pages: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
            "models page": (
                lambda: _ok(http.get(f"{ui}/ui/models")),
                lambda: _ok(http.get(f"{api}/registered-models/search", params={"max_results": PAGE_SIZE})),
            ),
            "model page": (
                lambda: _ok(http.get(f"{ui}/ui/models/{model}")),
                lambda: (
                    _ok(http.get(f"{api}/registered-models/get", params={"name": model})),
                    _ok(http.get(f"{api}/model-versions/search", params=versions)),
                ),
            ),
            "compare page": (
                lambda: _ok(http.get(f"{ui}/ui/models/{model}/compare", params={"a": a, "b": b})),
                bare_compare,
            ),
        }
        for page, bare in pages.values():
            for _ in range(3):  # warm-up: connections, caches, imports
                page()
                bare()
        results: dict[str, list[dict[str, Any]]] = {label: [] for label in pages}
        for _ in range(args.repeat):  # whole passes over the pages, so a noisy moment hits one pass
            for label, (page, bare) in pages.items():
                results[label].append(_row(label, _times(page, bare, args.rounds)))
    _report(results, args)


def _times(page: Callable[[], None], bare: Callable[[], None], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"page": [], "bare": []}
    for round_ in range(rounds):
        order = [("page", page), ("bare", bare)] if round_ % 2 == 0 else [("bare", bare), ("page", page)]
        for side, call in order:
            times[side].append(timed(call))
    return times


def _ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise SystemExit(f"{response.request.url} answered {response.status_code}: {response.text[:300]}")


def _row(label: str, times: dict[str, list[float]]) -> dict[str, Any]:
    page, bare = times["page"], times["bare"]
    ratio = statistics.median(page) / statistics.median(bare)
    return {
        "label": label,
        "page_p50": statistics.median(page),
        "page_p95": percentile(page, 0.95),
        "bare_p50": statistics.median(bare),
        "bare_p95": percentile(bare, 0.95),
        "ratio": ratio,
    }


def _report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print(f"\n{args.models} models × {args.versions} versions, {args.repeat} passes of {args.rounds} rounds "
          f"per page, page size {PAGE_SIZE}; medians over the passes")
    print("| page | UI p50 ms | UI p95 ms | MLflow calls p50 ms | MLflow p95 ms | UI ÷ MLflow (p50) "
          "| per pass | goal met |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for label, passes in results.items():
        mid = {key: statistics.median(p[key] for p in passes)
               for key in ("page_p50", "page_p95", "bare_p50", "bare_p95", "ratio")}
        ok = mid["ratio"] <= GOAL_RATIO and mid["page_p95"] < GOAL_P95_MS
        each = ", ".join(f"{p['ratio']:.2f}" for p in passes)
        print(f"| {label} | {mid['page_p50']:.1f} | {mid['page_p95']:.1f} | {mid['bare_p50']:.1f} | "
              f"{mid['bare_p95']:.1f} | {mid['ratio']:.2f} | {each} | {'yes' if ok else 'no'} |")


if __name__ == "__main__":
    main()
