"""The serving service on a real MLflow server, Redis and database, with real ONNX models."""

from __future__ import annotations

import threading
import uuid

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from services.registry.app import create_app as create_registry_app
from services.registry.settings import RegistrySettings
from services.serving.app import create_app
from services.serving.settings import ServingSettings
from shipyard_common.db import Database
from shipyard_common.events import EventBus, ModelAliasMoved
from shipyard_common.records import PredictionRecord
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import (
    N_FEATURES,
    ModelFactory,
    RegisteredVersion,
    run_directly,
    unique_name,
)
from tests.services.serving.support import ROWS, metric, model_status, predict, serving
from tests.support import auth, running_app, wait_for


def wait_served(base: str, name: str, version: str, timeout: float = 10) -> None:
    wait_for(lambda: model_status(base, name)["version"] == version, timeout=timeout,
             what=f"{name} v{version} served")


def assert_answers_like(
    response: httpx.Response, version: RegisteredVersion, rows: list[list[float]]
) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == version.name and body["model_version"] == version.version
    np.testing.assert_allclose(body["outputs"], run_directly(version.model_bytes, rows), rtol=1e-6)


@pytest.fixture
def two_versions(model_factory: ModelFactory) -> tuple[RegisteredVersion, RegisteredVersion]:
    name = unique_name("srv")
    first = model_factory.register_classifier(name, seed=1)
    second = model_factory.register_classifier(name, seed=2)
    # Distinguishable, or a test could not tell which version answered.
    assert not np.allclose(run_directly(first.model_bytes, ROWS), run_directly(second.model_bytes, ROWS))
    return first, second


def test_serves_the_production_version_as_onnxruntime_does(
    isolated_platform: PlatformSettings, model_factory: ModelFactory, two_versions: tuple
) -> None:
    first, _ = two_versions
    model_factory.set_production(first.name, first.version)
    with serving(isolated_platform) as base:
        # Ready means the first reconcile is done, so the model is already loaded.
        status = model_status(base, first.name)
        assert status["version"] == "1" and status["status"] == "serving" and status["error"] is None
        assert status["n_features"] == N_FEATURES and status["input_name"] == "input"
        listed = httpx.get(f"{base}/v1/models", headers=auth("viewer")).json()
        assert first.name in [m["name"] for m in listed]

        assert_answers_like(predict(base, first.name, ROWS), first, ROWS)
        assert metric(base, "shipyard_predictions_total", {"model": first.name, "version": "1"}) == 1.0
        assert metric(base, "shipyard_model_loaded_version", {"model": first.name}) == 1.0


def test_follows_promotions_and_rollbacks_announced_by_the_registry(
    isolated_platform: PlatformSettings, model_factory: ModelFactory, two_versions: tuple
) -> None:
    first, second = two_versions
    model_factory.set_production(first.name, first.version)
    registry_app = create_registry_app(RegistrySettings(platform=isolated_platform))
    with running_app(registry_app) as registry, serving(isolated_platform) as base:
        assert predict(base, first.name, ROWS).json()["model_version"] == "1"

        promote = f"{registry}/models/{first.name}/versions/{{}}/promote"
        response = httpx.post(promote.format(2), json={"alias": "production"}, headers=auth("admin"))
        assert response.status_code == 200, response.text
        wait_served(base, first.name, "2", timeout=10)
        assert_answers_like(predict(base, first.name, ROWS), second, ROWS)

        rollback = httpx.post(promote.format(1), json={"reason": "rollback"}, headers=auth("admin"))
        rollback.raise_for_status()
        wait_served(base, first.name, "1", timeout=10)
        assert_answers_like(predict(base, first.name, ROWS), first, ROWS)
        assert metric(base, "shipyard_model_loaded_version", {"model": first.name}) == 1.0

        # Other aliases are not serving's business.
        httpx.post(promote.format(2), json={"alias": "staging"}, headers=auth("admin")).raise_for_status()
        assert predict(base, first.name, ROWS).json()["model_version"] == "1"


def test_periodic_reconcile_catches_a_move_whose_event_was_lost(
    isolated_platform: PlatformSettings, model_factory: ModelFactory, two_versions: tuple
) -> None:
    first, second = two_versions
    model_factory.set_production(first.name, first.version)
    with serving(isolated_platform, reconcile_interval_s=0.5) as base:
        assert predict(base, first.name, ROWS).json()["model_version"] == "1"
        model_factory.set_production(second.name, second.version)  # straight to MLflow: no event
        wait_served(base, first.name, "2", timeout=10)
        assert_answers_like(predict(base, first.name, ROWS), second, ROWS)


def _announce(platform: PlatformSettings, model: str, version: str) -> None:
    bus = EventBus(redis_url=platform.redis_url, channel=platform.events_channel)
    bus.publish(ModelAliasMoved(model=model, alias="production", version=version, actor="test"))


def test_a_corrupt_version_never_replaces_a_working_one(
    isolated_platform: PlatformSettings, model_factory: ModelFactory, two_versions: tuple
) -> None:
    first, _ = two_versions
    name = first.name
    corrupt = model_factory.register_corrupt(name)
    assert corrupt.version == "3"
    broken_only = unique_name("srv-broken")
    model_factory.register_corrupt(broken_only)
    model_factory.set_production(broken_only, "1")
    model_factory.set_production(name, first.version)

    with serving(isolated_platform) as base:
        model_factory.set_production(name, corrupt.version)
        _announce(isolated_platform, name, corrupt.version)
        status = wait_for(
            lambda: (s := model_status(base, name))["failed_version"] == "3" and s, timeout=10,
            what="the corrupt version's failure in the status",
        )
        assert status["status"] == "degraded" and status["version"] == "1" and status["target_version"] == "3"
        assert "ONNX Runtime cannot open model.onnx" in status["error"]
        assert_answers_like(predict(base, name, ROWS), first, ROWS)
        assert metric(base, "shipyard_model_load_failures_total", {"model": name}) == 1.0

        # A model with no working version at all answers 503 and says why.
        broken = model_status(base, broken_only)
        assert broken["status"] == "failed" and broken["version"] is None
        response = predict(base, broken_only, ROWS)
        assert response.status_code == 503 and "failed to load" in response.json()["error"]["message"]

        # Promoting a good version again clears the failure.
        model_factory.set_production(name, "2")
        _announce(isolated_platform, name, "2")
        wait_served(base, name, "2")
        status = model_status(base, name)
        assert status["status"] == "serving" and status["error"] is None


BAD_INPUTS = [
    ({"inputs": "1,2,3,4"}, "must be a list of rows"),
    ({"inputs": {"a": 1}}, "must be a list of rows"),
    ({"inputs": []}, "empty"),
    ({"inputs": [1.0, 2.0, 3.0, 4.0]}, "wrap a single row"),
    ({"inputs": [[1.0, 2.0]]}, "row 0 has length 2; the model takes 4 features"),
    ({"inputs": [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0]]}, "row 1 has length 3"),
    ({"inputs": [[1.0, 2.0, 3.0, "4"]]}, "row 0, feature 3 is str"),
    ({"inputs": [[1.0, 2.0, 3.0, None]]}, "row 0, feature 3 is NoneType"),
    ({"inputs": [[1.0, 2.0, 3.0, True]]}, "row 0, feature 3 is bool"),
    ({"inputs": [[1.0, 2.0, 3.0, 1e39]]}, "beyond the model's float32 range"),
    ({"inputs": [[1.0, 2.0, 3.0, 4.0]] * 9}, "at most 8"),
    ({"rows": [[1.0, 2.0, 3.0, 4.0]]}, "inputs: Field required"),
]


def test_bad_inputs_get_a_clear_4xx_and_serving_stays_up(
    isolated_platform: PlatformSettings, model_factory: ModelFactory, two_versions: tuple
) -> None:
    first, _ = two_versions
    model_factory.set_production(first.name, first.version)
    url = f"/v1/models/{first.name}/predict"
    with serving(isolated_platform, max_batch_rows=8) as base:
        for body, expected in BAD_INPUTS:
            response = httpx.post(base + url, json=body, headers=auth("viewer"))
            assert response.status_code == 422, (body, response.text)
            assert expected in response.json()["error"]["message"], (body, response.text)

        raw_cases = [b'{"inputs": [[1.0, 2.0, NaN, 4.0]]}', b'{"inputs": [[1.0, Infinity, 3.0, 4.0]]}',
                     b'{"inputs": [[1.0, 2.0, 3.0, 1e400]]}', b"not json"]
        for raw in raw_cases:
            response = httpx.post(
                base + url, content=raw, headers={**auth("viewer"), "Content-Type": "application/json"}
            )
            assert response.status_code == 422, (raw, response.text)
            assert response.json()["error"]["message"]
        assert "must be finite" in httpx.post(
            base + url, content=raw_cases[0], headers={**auth("viewer"), "Content-Type": "application/json"}
        ).json()["error"]["message"]

        unknown = predict(base, f"nope-{first.name}", ROWS)
        assert unknown.status_code == 404 and "is not served" in unknown.json()["error"]["message"]
        assert httpx.get(f"{base}/v1/models/nope-{first.name}", headers=auth("viewer")).status_code == 404
        assert httpx.post(base + url, json={"inputs": ROWS}).status_code == 401

        assert_answers_like(predict(base, first.name, ROWS), first, ROWS)
        assert predict(base, first.name, [[1.0, 2.0, 3.0, 4.0]] * 8).status_code == 200
        labels = {"model": first.name, "reason": "invalid_input"}
        errors = metric(base, "shipyard_prediction_errors_total", labels)
        assert errors is not None and errors >= len(BAD_INPUTS)


def test_every_answered_request_is_logged(
    isolated_platform: PlatformSettings, db_url: str, model_factory: ModelFactory, two_versions: tuple
) -> None:
    first, _ = two_versions
    model_factory.set_production(first.name, first.version)
    platform = isolated_platform.model_copy(update={"db_url": db_url})
    answered: list[str] = []
    lock = threading.Lock()

    def client_thread(base: str, count: int) -> None:
        with httpx.Client(headers=auth("viewer")) as client:
            for index in range(count):
                request_id = uuid.uuid4().hex
                row = [float(index), 1.0, 2.0, 3.0]
                response = client.post(
                    f"{base}/v1/models/{first.name}/predict", json={"inputs": [row]},
                    headers={"X-Request-ID": request_id},
                )
                assert response.status_code == 200, response.text
                with lock:
                    answered.append(request_id)
                # Refused requests are not predictions and must not be logged.
                assert client.post(
                    f"{base}/v1/models/{first.name}/predict", json={"inputs": [[1.0]]}
                ).status_code == 422

    # A tiny room makes requests wait for the shipper; a long flush interval leaves rows unwritten
    # at shutdown, which close() must still write.
    log_settings = {"prediction_log_capacity": 3, "prediction_log_batch": 7, "prediction_log_flush_s": 5}
    with serving(platform, **log_settings) as base:
        threads = [threading.Thread(target=client_thread, args=(base, 15)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(answered) == 60

    database = Database(db_url)
    with database.session() as session:
        rows = session.scalars(select(PredictionRecord).where(PredictionRecord.model == first.name)).all()
        total = session.scalar(select(func.count()).select_from(PredictionRecord).where(
            PredictionRecord.model == first.name))
    database.dispose()
    assert total == 60
    assert sorted(r.request_id for r in rows) == sorted(answered)
    row = rows[0]
    assert row.version == "1" and row.role == "production" and row.latency_ms > 0
    np.testing.assert_allclose(row.outputs, run_directly(first.model_bytes, row.inputs), rtol=1e-6)


def test_not_ready_while_the_registry_cannot_be_read(
    isolated_platform: PlatformSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    platform = isolated_platform.model_copy(update={"mlflow_tracking_uri": "http://127.0.0.1:1"})
    with running_app(create_app(ServingSettings(platform=platform))) as base:
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["models"].startswith("failed")
        response = predict(base, "anything", ROWS)
        assert response.status_code == 503
        assert "still reading the registry" in response.json()["error"]["message"]
