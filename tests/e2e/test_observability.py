"""Prometheus scraping the live stack: every dashboard panel's query and every alert's expression
parses and returns data.

A real Prometheus (Debian's ``prometheus``) is started beside the session's stack, from the same
configuration ``shipyard up --with-prometheus`` writes, scraping every second. Predictions (and one
refused request), labels for them and a training job that fails go through the stack; then each
query runs through Prometheus's HTTP API with Grafana's variables filled in (the deployed model and
version, the cpu queue, ``$__rate_interval`` = 5m).

"Returns data" is at least one sample with a finite value (a 0 counts: a rate of no errors is an
answer). An alert cannot be made to fire here, so each alert's expression is run without its
threshold: ``up{job="shipyard-worker"} == 0`` is checked as ``up{job="shipyard-worker"}``, i.e. what
the alert compares exists (every rule ends in one comparison against a number; tests/infra checks
that). That the rules fire at their thresholds is what ``promtool test rules`` checks
(``tests/infra/test_prometheus.py``). GPU panels are skipped where no GPU is: the worker exports GPU
series only when ``nvidia-smi`` finds one.
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sklearn.datasets import load_breast_cancer

from services.trainer.worker.metrics import read_gpus
from shipyard_cli.client import ShipyardClient
from shipyard_cli.demo import wait_until_served
from shipyard_cli.processes import url_port
from shipyard_cli.stack import Stack
from shipyard_common.settings import PlatformSettings
from tests.infra.support import alert_rules, dashboards, fill, panel_queries, variable_queries
from tests.services.trainer.support import job_spec
from tests.support import auth, free_port, missing_tool, wait_for

pytestmark = pytest.mark.e2e

MODEL = "breast_cancer"
FRAME = load_breast_cancer(as_frame=True).frame
BOARDS = dashboards()
PANEL_QUERIES = panel_queries(BOARDS)
ALERTS = alert_rules()
GPU_PRESENT = bool(read_gpus())
# Windows close once 200 rows are logged (the session stack's SHIPYARD_MONITOR_WINDOW); labels are
# scored by the monitor's loop every second. Waiting longer than this means something is missing.
DATA_WAIT_S = 60


def worker_metrics_port(platform: PlatformSettings) -> int:
    """Where the session stack's worker serves /metrics (its process record's health URL)."""
    [worker] = [record for record in Stack(platform).records() if record.name == "worker"]
    assert worker.health_url, "the worker has no metrics endpoint"
    return url_port(worker.health_url)


@pytest.fixture(scope="module")
def prometheus(stack_platform: PlatformSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on a free port scraping the session's stack every second, with Shipyard's rules; its
    process record and data live in a state folder of its own, so the session's stack is left as it was."""
    if shutil.which("prometheus") is None:
        missing_tool("prometheus is not installed (apt-get install prometheus; .ci/run does)")
    own = stack_platform.model_copy(update={"state_dir": tmp_path_factory.mktemp("prometheus-state")})
    stack = Stack(own, worker_metrics_port=worker_metrics_port(stack_platform), prometheus_port=free_port())
    component = stack.prometheus_component(scrape_interval="1s")
    assert component is not None
    record = stack.start_component(component)
    try:
        stack.wait_ready(record, timeout=60)
        base = f"http://127.0.0.1:{stack.prometheus_port}"
        # Ready is not scraping yet: targets reach the scrapers some seconds later. What happens before
        # a target's first scrape is in no counter's increase, so the traffic waits for them.
        wait_for(lambda: set(target_health(base).values()) == {"up"}, timeout=60, what="every target up")
        yield base
    finally:
        stack.down()


def target_health(prometheus: str) -> dict[str, str]:
    """Each scrape job's health (``up``, ``down``, ``unknown`` until its first scrape)."""
    body = httpx.get(f"{prometheus}/api/v1/targets", timeout=30).json()
    return {target["labels"]["job"]: target["health"] for target in body["data"]["activeTargets"]}


@dataclass(frozen=True)
class Traffic:
    version: str
    failed_job: str

    @property
    def variables(self) -> dict[str, str]:
        return {"model": MODEL, "version": self.version, "queue": "cpu"}


def predict(platform: PlatformSettings, rows: list[list[float]]) -> str:
    """One prediction request with a request id of ours; returns the id."""
    request_id = uuid.uuid4().hex
    headers = {**auth("trainer"), "X-Request-ID": request_id}
    response = httpx.post(f"{platform.serving_url}/v1/models/{MODEL}/predict", json={"inputs": rows},
                          headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return request_id


def send_predictions_and_labels(platform: PlatformSettings, *, rows: int, batch: int = 10) -> None:
    features = FRAME.drop(columns="target").to_numpy()
    labels = FRAME["target"].to_numpy()
    items = []
    for start in range(0, rows, batch):
        request_id = predict(platform, features[start:start + batch].tolist())
        items += [{"request_id": request_id, "row": i, "label": int(labels[start + i])} for i in range(batch)]
    response = httpx.post(f"{platform.monitor_url}/feedback", json=items, headers=auth("trainer"), timeout=30)
    assert response.status_code == 200, response.text


def fail_a_job(platform: PlatformSettings, dataset_rev: str) -> str:
    """A job that a worker starts and that fails at once: its target is no column of the dataset."""
    client = ShipyardClient(platform, token="test-trainer")
    try:
        spec = job_spec(rev=dataset_rev, model_name="observability_probe", data__target="no_such_column",
                        training__epochs=1)
        job_id = str(client.submit_job(spec)["id"])
        job = wait_for(lambda: (j := client.get_job(job_id))["state"] in ("succeeded", "failed") and j,
                       timeout=120, what="the probe job to end")
    finally:
        client.close()
    assert job["state"] == "failed" and "no_such_column" in job["error"], job
    return job_id


@pytest.fixture(scope="module")
def traffic(prometheus: str, stack_platform: PlatformSettings, deployed: dict[str, Any]) -> Traffic:
    """Predictions (300 rows: the monitor closes a window every 200), one refused request, labels for
    every row, and one failed job, all while Prometheus scrapes."""
    version = str(deployed["model_version"])
    client = ShipyardClient(stack_platform, token="test-admin")
    try:
        wait_until_served(client, MODEL, version)
    finally:
        client.close()
    send_predictions_and_labels(stack_platform, rows=300)
    refused = httpx.post(f"{stack_platform.serving_url}/v1/models/{MODEL}/predict",
                         json={"inputs": [[1.0, 2.0]]}, headers=auth("trainer"), timeout=30)
    assert refused.status_code == 422, refused.text
    return Traffic(version, fail_a_job(stack_platform, deployed["dataset_rev"]))


def instant(prometheus: str, expr: str) -> dict[str, Any]:
    """Prometheus's answer to an instant query (``status``, ``data`` or ``error``)."""
    body: dict[str, Any] = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30).json()
    return body


def has_data(answer: dict[str, Any]) -> bool:
    if answer.get("status") != "success":
        return False
    return any(math.isfinite(float(sample["value"][1])) for sample in answer["data"]["result"])


def all_queries(traffic: Traffic) -> dict[str, str]:
    queries = {str(q): fill(q.expr, traffic.variables) for q in PANEL_QUERIES if GPU_PRESENT or not q.gpu}
    queries.update({f"alert {rule.name}": rule.query for rule in ALERTS})
    return queries


@pytest.fixture(scope="module")
def answers(prometheus: str, traffic: Traffic, stack_platform: PlatformSettings) -> dict[str, dict[str, Any]]:
    """Every query's answer, once all have data or ``DATA_WAIT_S`` has passed (windows, live accuracy
    and the job's end reach Prometheus a few scrapes after the traffic). A request a second keeps the
    rates current meanwhile."""
    queries = all_queries(traffic)
    deadline = time.monotonic() + DATA_WAIT_S
    while True:
        found = {key: instant(prometheus, expr) for key, expr in queries.items()}
        if all(has_data(answer) for answer in found.values()) or time.monotonic() > deadline:
            return found
        predict(stack_platform, FRAME.drop(columns="target").iloc[:1].to_numpy().tolist())
        time.sleep(1)


def assert_answered(answers: dict[str, dict[str, Any]], key: str, expr: str) -> None:
    answer = answers[key]
    assert answer.get("status") == "success", f"{key}: {expr} does not parse: {answer.get('error')}"
    assert has_data(answer), f"{key}: {expr} returned no data: {answer['data']['result']}"


@pytest.mark.parametrize("query", PANEL_QUERIES, ids=str)
def test_panel_query_returns_data(query, answers, traffic):
    if query.gpu and not GPU_PRESENT:
        pytest.skip("no GPU here: the worker exports GPU series only where nvidia-smi finds one")
    assert_answered(answers, str(query), fill(query.expr, traffic.variables))


@pytest.mark.parametrize("rule", ALERTS, ids=lambda rule: rule.name)
def test_alert_expression_without_its_threshold_returns_data(rule, answers):
    assert_answered(answers, f"alert {rule.name}", rule.query)


@pytest.mark.parametrize("dashboard,variable,query", variable_queries(BOARDS), ids=lambda v: str(v))
def test_variable_lists_values(dashboard, variable, query, prometheus, traffic):
    """``label_values(metric{…}, label)`` as Grafana asks Prometheus: the label's values on that series."""
    inner = fill(query, traffic.variables).removeprefix("label_values(").removesuffix(")")
    selector, label = inner.rsplit(", ", 1)
    url = f"{prometheus}/api/v1/label/{label}/values"
    body = httpx.get(url, params={"match[]": selector}, timeout=30).json()
    assert body["status"] == "success", body
    assert traffic.variables[variable] in body["data"], f"{dashboard} ${variable}: {query} → {body['data']}"


def test_rules_load_and_evaluate_in_prometheus(prometheus, traffic):
    def evaluated() -> list[dict[str, Any]]:
        body = httpx.get(f"{prometheus}/api/v1/rules", params={"type": "alert"}, timeout=30).json()
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else []

    rules = wait_for(evaluated, timeout=30, what="every alert rule to be evaluated")
    assert {rule["name"] for rule in rules} == {rule.name for rule in ALERTS}
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


def test_every_part_of_the_stack_is_scraped_and_up(prometheus, traffic):
    assert target_health(prometheus) == {
        job: "up" for job in ("shipyard-trainer", "shipyard-registry", "shipyard-serving", "shipyard-monitor",
                              "shipyard-worker", "prometheus")
    }


def test_the_failed_job_is_counted_with_its_duration(prometheus, traffic, answers):
    for metric in ("shipyard_training_jobs_finished_total", "shipyard_training_job_duration_seconds_count"):
        answer = instant(prometheus, f'sum(increase({metric}{{state="failed"}}[10m]))')
        seen = instant(prometheus, f'{metric}{{state="failed"}}[10m]')["data"]["result"]
        values = {s["metric"].get("queue"): sorted({v for _, v in s["values"]}) for s in seen}
        assert float(answer["data"]["result"][0]["value"][1]) >= 1, f"{metric} took the values {values}"
