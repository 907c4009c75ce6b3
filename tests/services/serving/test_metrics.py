"""Serving's metrics by model and version, read the way Prometheus reads them: GET /metrics."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.serving.core.metrics import ServingMetrics
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.services.serving.support import ROWS, metric, predict, serving
from tests.support import auth


def samples(base: str, name: str) -> list[Any]:
    text = httpx.get(f"{base}/metrics").text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_metrics_are_labelled_by_model_and_version_with_bounded_labels(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    name = unique_name("metrics")
    model_factory.register_classifier(name, seed=1)
    model_factory.register_classifier(name, seed=2)
    model_factory.set_production(name, "2")
    broken = unique_name("metrics-broken")
    model_factory.register_corrupt(broken)
    model_factory.set_production(broken, "1")

    with serving(isolated_platform) as base:
        for _ in range(5):
            assert predict(base, name, ROWS).status_code == 200
        assert predict(base, name, [[1.0, 2.0]]).status_code == 422  # refused: invalid_input
        v2_body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        infer = f"{base}/v2/models/{name}/infer"
        assert httpx.post(infer, json=v2_body, headers=auth("viewer")).status_code == 200
        # A version that is not loaded: counted under the version serving now, never under "7".
        missing = httpx.post(f"{base}/v2/models/{name}/versions/7/infer", json=v2_body,
                             headers=auth("viewer"))
        assert missing.status_code == 404
        for index in range(20):  # names nobody registered share one label value
            assert predict(base, f"nope-{index}-{name}", ROWS).status_code == 404

        labels = {"model": name, "version": "2"}
        assert metric(base, "shipyard_predictions_total", labels) == 6
        assert metric(base, "shipyard_prediction_rows_total", labels) == 5 * len(ROWS) + 1
        assert metric(base, "shipyard_prediction_duration_seconds_count", labels) == 6
        latency_sum = metric(base, "shipyard_prediction_duration_seconds_sum", labels)
        assert latency_sum is not None and 0 < latency_sum < 60
        # Sub-millisecond buckets: a tiny model's latency is not lumped into one bucket.
        buckets = {s.labels["le"] for s in samples(base, "shipyard_prediction_duration_seconds_bucket")}
        assert {"0.00025", "0.0005", "0.001", "10.0"} <= buckets
        assert metric(base, "shipyard_prediction_errors_total", {**labels, "reason": "invalid_input"}) == 1
        assert metric(base, "shipyard_prediction_errors_total", {**labels, "reason": "not_found"}) == 1
        unknown = [s for s in samples(base, "shipyard_prediction_errors_total")
                   if s.labels["model"] not in (name, broken)]
        assert [(s.labels["model"], s.labels["version"], s.value) for s in unknown] == [
            ("(unknown)", "(none)", 20.0)
        ]
        versions = {s.labels["version"] for s in samples(base, "shipyard_predictions_total")
                    if s.labels["model"] == name}
        assert versions == {"2"}

        batch_requests = metric(base, "shipyard_batch_requests_sum", labels)
        assert batch_requests == 6  # every answered request ran in one runtime call
        assert metric(base, "shipyard_batch_rows_sum", labels) == 5 * len(ROWS) + 1
        assert metric(base, "shipyard_prediction_in_flight", {"model": name}) == 0

        load_seconds = metric(base, "shipyard_model_load_duration_seconds", labels)
        assert load_seconds is not None and 0 < load_seconds < 120
        assert metric(base, "shipyard_model_load_failures_total", {"model": broken}) == 1
        assert metric(base, "shipyard_model_loaded_version", {"model": name}) == 2
        pending = metric(base, "shipyard_prediction_log_pending", {})
        assert pending is not None and pending >= 0
        # The failed model is known by name, but has no version to count under.
        assert predict(base, broken, ROWS).status_code == 503
        assert metric(base, "shipyard_prediction_errors_total",
                      {"model": broken, "version": "(none)", "reason": "unavailable"}) == 1


def test_serving_metrics_expose_what_prometheus_client_did() -> None:
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    counted = metrics.version("m", "3")
    assert metrics.version("m", "3") is counted
    counted.requests.inc()
    counted.rows.inc(4)
    counted.latency.observe(0.002)
    counted.batch_rows.observe(4)
    counted.batch_requests.observe(1)
    counted.in_flight.inc()
    counted.in_flight.dec()
    counted.error("invalid_input").inc()
    metrics.prediction_errors.labels("m", "3", "invalid_input").inc()  # the same child, one family
    metrics.prediction_errors.labels("(unknown)", "(none)", "not_found").inc()
    assert counted.error("invalid_input") is metrics.prediction_errors.labels("m", "3", "invalid_input")

    families = {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(generate_latest(registry).decode())
    }
    labels = {"model": "m", "version": "3"}
    assert ("shipyard_predictions_total", labels, 1.0) in families["shipyard_predictions"]
    assert ("shipyard_prediction_errors_total", {"model": "m", "version": "3", "reason": "invalid_input"},
            2.0) in families["shipyard_prediction_errors"]
    assert ("shipyard_prediction_in_flight", {"model": "m"}, 0.0) in families["shipyard_prediction_in_flight"]
    assert ("shipyard_batch_rows_sum", labels, 4.0) in families["shipyard_batch_rows"]
    assert ("shipyard_prediction_rows_total", labels, 4.0) in families["shipyard_prediction_rows"]
    assert ("shipyard_prediction_duration_seconds_bucket", {**labels, "le": "0.0025"},
            1.0) in families["shipyard_prediction_duration_seconds"]
