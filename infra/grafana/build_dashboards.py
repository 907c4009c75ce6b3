"""Shipyard's Grafana dashboards, written from this file into ``dashboards/*.json``.

    python infra/grafana/build_dashboards.py        # after changing a panel here

The JSON files are what Grafana provisions; ``tests/infra/test_grafana.py`` fails when they differ
from what this file builds, and ``tests/e2e/test_observability.py`` runs every panel's query against a
live stack. Panels read the metric names of ``services/*/metrics.py`` and ``services/trainer/api/metrics.py``.

Every panel reads the ``${datasource}`` variable (default: the provisioned ``shipyard-prometheus``);
panels by model and version filter with the ``$model`` and ``$version`` variables (regexes: "All"
is ``.*``). Panels on GPU metrics say so in their description: their series exist only where a
worker has a GPU.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PROVISIONED_DATASOURCE = "shipyard-prometheus"
GPU_NOTE = "Only where a worker has a GPU: without one, the worker exports no GPU series."
SCHEMA_VERSION = 39
MV = 'model=~"$model", version=~"$version"'
M = 'model=~"$model"'
Q = 'queue=~"$queue"'
BY_VERSION = "{{model}} v{{version}}"


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    targets: tuple[Target, ...]
    kind: str = "timeseries"
    width: int = 12
    options: dict[str, Any] = field(default_factory=dict)
    mappings: tuple[dict[str, Any], ...] = ()


def rate(metric: str, selector: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}[$__rate_interval]))"


def quantile(q: float, metric: str, selector: str, by: str, window: str = "$__rate_interval") -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[{window}])))"


# -- variables ---------------------------------------------------------------------------------------

def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {"text": "Prometheus", "value": PROVISIONED_DATASOURCE}, "hide": 0,
        "refresh": 1, "regex": "", "options": [],
    }


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "definition": query, "query": {"query": query, "refId": f"{name}-values"},
        "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"text": ["All"], "value": ["$__all"]}, "hide": 0, "refresh": 2, "sort": 1,
        "regex": "", "options": [],
    }


def model_version_variables(models_from: str) -> list[dict[str, Any]]:
    return [
        datasource_variable(),
        query_variable("model", "Model", f"label_values({models_from}, model)"),
        query_variable("version", "Version", f"label_values(shipyard_predictions_total{{{M}}}, version)"),
    ]


# -- layout ------------------------------------------------------------------------------------------

def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "mappings": list(panel.mappings)}
    if panel.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
    options: dict[str, Any] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                               "tooltip": {"mode": "multi", "sort": "desc"}}
    options.update(panel.options)
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr, "legendFormat": t.legend,
             "range": True, "instant": False}
            for i, t in enumerate(panel.targets)
        ],
    }


def dashboard(uid: str, title: str, description: str, variables: list[dict[str, Any]],
              panels: list[Panel]) -> dict[str, Any]:
    laid_out, x, y = [], 0, 0
    for panel_id, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y = 0, y + 8
        laid_out.append(panel_json(panel, panel_id, x, y))
        x += panel.width
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["shipyard"],
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": "now-3h", "to": "now"},
        "timezone": "browser",
        "version": 1,
        "annotations": {"list": []},
        "links": [{"title": "Shipyard", "type": "dashboards", "tags": ["shipyard"], "asDropdown": True}],
        "templating": {"list": variables},
        "panels": laid_out,
    }


# -- serving -----------------------------------------------------------------------------------------

SERVER_SIDE = 'reason!~"invalid_input|bad_request|validation_error|not_found|payload_too_large"'


def serving() -> dict[str, Any]:
    errors = f"shipyard_prediction_errors_total{{{MV}, {SERVER_SIDE}}}"
    answered = f"sum by (model, version) (rate(shipyard_predictions_total{{{MV}}}[$__rate_interval]))"
    panels = [
        Panel("Requests / s", "Prediction requests answered, every protocol.", "reqps",
              (Target(rate("shipyard_predictions_total", MV, "model, version"), BY_VERSION),)),
        Panel("Rows predicted / s", "Input rows (the batch dimension) predicted.", "short",
              (Target(rate("shipyard_prediction_rows_total", MV, "model, version"), BY_VERSION),)),
        Panel("Latency p50 / p99",
              "Time to validate, run (batching wait included) and log one request.", "s",
              (Target(quantile(0.5, "shipyard_prediction_duration_seconds", MV, "model, version"),
                      f"p50 {BY_VERSION}"),
               Target(quantile(0.99, "shipyard_prediction_duration_seconds", MV, "model, version"),
                      f"p99 {BY_VERSION}"))),
        Panel("Errors / s by reason",
              "Requests refused or failed, by error code (invalid_input is the client's, runtime_error "
              "serving's).", "reqps",
              (Target(rate("shipyard_prediction_errors_total", MV, "model, version, reason"),
                      f"{BY_VERSION} {{{{reason}}}}"),)),
        Panel("Server-side error share",
              "Errors that are not the client's per answered request: the ShipyardServingErrorRate "
              "alert fires above 5%.", "percentunit",
              (Target(f"(sum by (model, version) (rate({errors}[$__rate_interval])) or {answered} * 0)"
                      f" / {answered}", BY_VERSION),)),
        Panel("Batch size: rows per runtime call p50 / p99",
              "Rows merged into one model call (several requests' rows when batched).", "short",
              (Target(quantile(0.5, "shipyard_batch_rows", MV, "model, version"), f"p50 {BY_VERSION}"),
               Target(quantile(0.99, "shipyard_batch_rows", MV, "model, version"), f"p99 {BY_VERSION}"))),
        Panel("Requests per runtime call (mean)", "How many requests the batcher merges into one call.",
              "short",
              (Target(f"{rate('shipyard_batch_requests_sum', MV, 'model, version')}"
                      f" / {rate('shipyard_batch_requests_count', MV, 'model, version')}", BY_VERSION),)),
        Panel("In flight", "Requests being validated, run or logged now.", "short",
              (Target(f"sum by (model) (shipyard_prediction_in_flight{{{M}}})", "{{model}}"),)),
        Panel("Version served", "The registry version each model is served at.", "none",
              (Target(f"max by (model) (shipyard_model_loaded_version{{{M}}})", "{{model}}"),),
              kind="stat", width=6, options={"reduceOptions": {"calcs": ["lastNotNull"]}}),
        Panel("Prediction log backlog",
              "Answered requests not yet written to the database (per serving process); the "
              "ShipyardPredictionLogLag alert fires above 5000.", "short",
              (Target("sum by (instance) (shipyard_prediction_log_pending)", "{{instance}}"),), width=6),
        Panel("HTTP requests / s by route and status", "Every request serving answered, health checks too.",
              "reqps",
              (Target(rate("shipyard_http_requests_total", 'job="shipyard-serving"', "route, status"),
                      "{{route}} {{status}}"),)),
    ]
    return dashboard("shipyard-serving", "Shipyard / Serving",
                     "Prediction traffic, latency, errors and batching by model and version.",
                     model_version_variables("shipyard_predictions_total"), panels)


# -- training ----------------------------------------------------------------------------------------

def training() -> dict[str, Any]:
    durations = 'queue=~"$queue", state=~"succeeded|failed"'
    panels = [
        Panel("Queue depth", "Jobs queued in the database, and their messages waiting on Redis.", "short",
              (Target(f'sum by (queue) (shipyard_training_jobs{{state="queued", {Q}}})',
                      "{{queue}} jobs queued"),
               Target(f"sum by (queue) (shipyard_training_queue_messages{{{Q}}})",
                      "{{queue}} messages on Redis"))),
        Panel("Running jobs", "Jobs a worker is running now.", "short",
              (Target(f'sum by (queue) (shipyard_training_jobs{{state="running", {Q}}})', "{{queue}}"),)),
        Panel("Oldest queued job has waited",
              "The ShipyardTrainingQueueBacklog alert fires past 30 minutes.", "s",
              (Target(f"max by (queue) (shipyard_training_queued_oldest_age_seconds{{{Q}}})", "{{queue}}"),)),
        Panel("Jobs ended in the past hour", "By final state: succeeded, failed, cancelled.", "short",
              (Target(f"sum by (state) (increase(shipyard_training_jobs_finished_total{{{Q}}}[1h]))",
                      "{{state}}"),)),
        Panel("Failed jobs in the past hour", "Jobs that ended failed, by queue.", "short",
              (Target(f'sum by (queue) (increase(shipyard_training_jobs_finished_total{{state="failed", {Q}}}'
                      "[1h]))", "{{queue}}"),)),
        Panel("Job duration p50 / p90 (jobs ended in the past hour)",
              "From a worker starting a job to its end; succeeded and failed jobs.", "s",
              (Target(quantile(0.5, "shipyard_training_job_duration_seconds", durations, "queue", "1h"),
                      "p50 {{queue}}"),
               Target(quantile(0.9, "shipyard_training_job_duration_seconds", durations, "queue", "1h"),
                      "p90 {{queue}}"))),
        Panel("Workers up", "Workers Prometheus scrapes and finds alive (ShipyardWorkerDown: one is not).",
              "short",
              (Target('sum by (job) (up{job="shipyard-worker"})', "up"),
               Target("count by (queues) (shipyard_worker_info)", "consuming {{queues}}"))),
        Panel("GPU memory", GPU_NOTE, "bytes",
              (Target("max by (instance, gpu) (shipyard_gpu_memory_used_bytes)",
                      "used {{instance}} gpu {{gpu}}"),
               Target("max by (instance, gpu) (shipyard_gpu_memory_total_bytes)",
                      "total {{instance}} gpu {{gpu}}"))),
        Panel("GPU utilisation", GPU_NOTE, "percentunit",
              (Target("max by (instance, gpu) (shipyard_gpu_utilization_ratio)",
                      "{{instance}} gpu {{gpu}}"),)),
    ]
    variables = [datasource_variable(),
                 query_variable("queue", "Queue", "label_values(shipyard_training_jobs, queue)")]
    return dashboard("shipyard-training", "Shipyard / Training",
                     "The job queues, running and ended jobs, their durations and the workers' GPUs.",
                     variables, panels)


# -- models ------------------------------------------------------------------------------------------

DRIFT_MAPPINGS = ({"type": "value", "options": {"0": {"text": "no drift", "color": "green", "index": 0},
                                                "1": {"text": "drift", "color": "red", "index": 1}}},)


def models() -> dict[str, Any]:
    panels = [
        Panel("Version in production", "The registry version serving answers with, over time.", "none",
              (Target(f"max by (model) (shipyard_model_loaded_version{{{M}}})", "{{model}}"),),
              kind="state-timeline", width=24),
        Panel("Drift share", "Share of features Evidently finds drifted in the newest closed window.",
              "percentunit",
              (Target(f"max by (model, version) (shipyard_drift_share{{{MV}}})", BY_VERSION),)),
        Panel("Drift verdicts", "The monitor's verdicts on the newest window: inputs (ShipyardDatasetDrift) "
              "and predictions.", "none",
              (Target(f"max by (model, version) (shipyard_dataset_drift{{{MV}}})", f"inputs {BY_VERSION}"),
               Target(f"max by (model, version) (shipyard_prediction_drift{{{MV}}})",
                      f"predictions {BY_VERSION}")),
              kind="state-timeline", mappings=DRIFT_MAPPINGS),
        Panel("Feature drift score",
              "Evidently's score per feature (p-value for K-S: low is drifted; distance for Wasserstein: "
              "high is).", "none",
              (Target(f"max by (model, version, feature) (shipyard_feature_drift_score{{{MV}}})",
                      "{{feature}} v{{version}}"),)),
        Panel("Drifted features", "Features Evidently finds drifted in the newest window.", "short",
              (Target(f"sum by (model, version) (shipyard_feature_drifted{{{MV}}})", BY_VERSION),)),
        Panel("Prediction drift score", "Drift of the model's outputs against its training predictions.",
              "none",
              (Target(f"max by (model, version) (shipyard_prediction_drift_score{{{MV}}})", BY_VERSION),)),
        Panel("Live accuracy / F1",
              "On the labels received for the newest window (ShipyardLiveAccuracyBelowFloor: under 80%).",
              "percentunit",
              (Target(f"max by (model, version) (shipyard_live_accuracy{{{MV}}})", f"accuracy {BY_VERSION}"),
               Target(f"max by (model, version) (shipyard_live_f1{{{MV}}})", f"F1 {BY_VERSION}"))),
        Panel("Labels", "Rows with labels in the newest window, and labels received in the past hour.",
              "short",
              (Target(f"max by (model, version) (shipyard_live_labelled_rows{{{MV}}})",
                      f"labelled rows {BY_VERSION}"),
               Target(f"sum by (model, matched) (increase(shipyard_feedback_labels_total{{{M}}}[1h]))",
                      "received {{model}} matched={{matched}}"))),
        Panel("Windows computed in the past hour", "Closed windows, by status (ok, too_few_rows …).", "short",
              (Target(f"sum by (model, version, status) (increase(shipyard_windows_total{{{MV}}}[1h]))",
                      f"{BY_VERSION} {{{{status}}}}"),)),
        Panel("Window size and backlog", "Rows in the newest closed window; logged rows not yet in one.",
              "short",
              (Target(f"max by (model, version) (shipyard_window_rows{{{MV}}})", f"window {BY_VERSION}"),
               Target(f"max by (model, version) (shipyard_window_pending_rows{{{MV}}})",
                      f"pending {BY_VERSION}"))),
        Panel("Data quality",
              "Shares of the newest window's input values that are missing, out of the training data's "
              "range or unseen categories, and of its rows whose width is not the model's.", "percentunit",
              (Target(f"max by (model, version) (shipyard_window_missing_share{{{MV}}})",
                      f"missing {BY_VERSION}"),
               Target(f"max by (model, version) (shipyard_window_out_of_range_share{{{MV}}})",
                      f"out of range {BY_VERSION}"),
               Target(f"max by (model, version) (shipyard_window_unseen_category_share{{{MV}}})",
                      f"unseen categories {BY_VERSION}"),
               Target(f"max by (model, version) (shipyard_window_schema_mismatch_share{{{MV}}})",
                      f"wrong width {BY_VERSION}"))),
        Panel("Retraining triggers in the past hour", "Retrainings the monitor started, by cause.", "short",
              (Target(f"sum by (model, cause) (increase(shipyard_retraining_triggers_total{{{M}}}[1h]))",
                      "{{model}} {{cause}}"),)),
        Panel("Retraining outcomes", "Retrainings that ended in the past hour, and those running now.",
              "short",
              (Target(f"sum by (model, outcome) (increase(shipyard_retraining_outcomes_total{{{M}}}[1h]))",
                      "{{model}} {{outcome}}"),
               Target(f"max by (model) (shipyard_retraining_running{{{M}}})", "{{model}} running"))),
    ]
    return dashboard("shipyard-models", "Shipyard / Models",
                     "Drift, live accuracy, production versions and retraining, by model and version.",
                     model_version_variables("shipyard_model_loaded_version"), panels)


def build() -> dict[str, dict[str, Any]]:
    """Each dashboard file's name → its JSON."""
    return {"serving.json": serving(), "training.json": training(), "models.json": models()}


def render(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, board in build().items():
        (OUT / name).write_text(render(board))
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
