"""The registry service on a real MLflow server, Redis, and SQLite or PostgreSQL."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis
from sqlalchemy import select

from services.registry.app import create_app
from services.registry.settings import RegistrySettings
from shipyard_common.auth import Role, principal_name
from shipyard_common.db import Database
from shipyard_common.records import EventRecord
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.support import auth, running_app


@pytest.fixture
def registry_url(isolated_platform: PlatformSettings) -> Iterator[str]:
    with running_app(create_app(RegistrySettings(platform=isolated_platform))) as base:
        yield base


@pytest.fixture
def two_versions(model_factory: ModelFactory) -> str:
    name = unique_name("reg")
    model_factory.register_classifier(name, seed=1)
    model_factory.register_classifier(name, seed=2)
    return name


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message: str = response.json()["error"]["message"]
    assert message
    return message


def test_lists_models_and_versions(registry_url: str, two_versions: str) -> None:
    name = two_versions
    viewer = auth("viewer")

    models = httpx.get(f"{registry_url}/models", params={"max_results": 1000}, headers=viewer).json()
    assert name in [m["name"] for m in models["models"]]

    model = httpx.get(f"{registry_url}/models/{name}", headers=viewer).json()
    assert model["name"] == name and model["aliases"] == {} and model["latest_version"] == "2"

    versions = httpx.get(f"{registry_url}/models/{name}/versions", headers=viewer).json()["versions"]
    assert [v["version"] for v in versions] == ["2", "1"]
    assert all(v["run_id"] and v["created_at"] and v["tags"]["shipyard.format"] == "onnx" for v in versions)
    # Registered without metric tags (not by the trainer): the run's figures, and it says so.
    assert versions[0]["metrics"] == {"val_accuracy": pytest.approx(0.52)}
    assert versions[0]["metrics_source"] == "run"

    one = httpx.get(f"{registry_url}/models/{name}/versions/1", headers=viewer).json()
    assert one["version"] == "1" and one["metrics"] == {"val_accuracy": pytest.approx(0.51)}
    assert one["aliases"] == []

    assert "is not in the registry" in _error(
        httpx.get(f"{registry_url}/models/nope-{name}", headers=viewer), 404
    )
    missing_version = httpx.get(f"{registry_url}/models/{name}/versions/99", headers=viewer)
    assert "no version 99" in _error(missing_version, 404)
    _error(httpx.get(f"{registry_url}/models/{name}/versions/abc", headers=viewer), 404)
    _error(httpx.get(f"{registry_url}/models/nope-{name}/versions", headers=viewer), 404)
    _error(httpx.get(f"{registry_url}/models"), 401)


def test_models_are_searched_by_a_part_of_their_name_in_any_case(
    registry_url: str, model_factory: ModelFactory
) -> None:
    tag = uuid.uuid4().hex[:10]
    names = [f"search-{tag}-fraud", f"search-{tag}-churn", f"search_{tag}-fraud"]
    for name in names:
        model_factory.register_classifier(name, seed=1)
    viewer = auth("viewer")

    def found(search: str) -> list[str]:
        answer = httpx.get(f"{registry_url}/models", params={"search": search, "max_results": 1000},
                           headers=viewer)
        assert answer.status_code == 200, answer.text
        return [m["name"] for m in answer.json()["models"]]

    assert found(f"{tag}-FRAUD") == sorted([names[0], names[2]])
    assert found(f"search-{tag}") == sorted(names[:2])  # '-' is not '_': MLflow's wildcard is not ours
    assert found(f"nothing-{tag}") == []
    for bad in ("a'b", "x%", "a b", "x" * 101):
        message = _error(httpx.get(f"{registry_url}/models", params={"search": bad}, headers=viewer), 422)
        assert "search" in message, message


@contextmanager
def _subscribed(redis_url: str, channel: str) -> Iterator[redis.client.PubSub]:
    # The client must outlive the subscription: closing it closes the pool the pubsub uses.
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    try:
        # Pub/sub delivers only to subscribers already listening; wait until the server counts ours.
        deadline = time.monotonic() + 10
        while client.pubsub_numsub(channel)[0][1] < 1:
            assert time.monotonic() < deadline, "the subscription never registered"
            pubsub.get_message(timeout=0.05)
        yield pubsub
    finally:
        pubsub.close()
        client.close()


def _next_event(pubsub: redis.client.PubSub, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] == "message":
            return json.loads(message["data"])
    raise AssertionError("no event arrived")


def test_promote_moves_alias_audits_and_announces(
    isolated_platform: PlatformSettings, db_url: str, model_factory: ModelFactory, two_versions: str
) -> None:
    platform = isolated_platform.model_copy(update={"db_url": db_url})
    name = two_versions
    admin, viewer = auth("admin"), auth("viewer")
    app = create_app(RegistrySettings(platform=platform))
    with _subscribed(platform.redis_url, platform.events_channel) as pubsub, running_app(app) as base:
        promote = f"{base}/models/{name}/versions/{{}}/promote"

        first = httpx.post(promote.format(1), json={"reason": "first release"}, headers=admin)
        assert first.status_code == 200, first.text
        expected = {"model": name, "version": "1", "alias": "production", "previous_version": None,
                    "weight": None}
        assert {k: v for k, v in first.json().items() if k != "audit_id"} == expected
        second = httpx.post(promote.format(2), json={"alias": "production"}, headers=admin).json()
        assert second["previous_version"] == "1"
        again = httpx.post(promote.format(1), json={"reason": "v2 regressed"}, headers=admin)
        assert again.json()["previous_version"] == "2"
        staged = httpx.post(promote.format(2), json={"alias": "staging"}, headers=admin).json()
        assert (staged["version"], staged["alias"], staged["previous_version"]) == ("2", "staging", None)

        assert model_factory.client.get_registered_model(name).aliases == {"production": "1", "staging": "2"}
        model = httpx.get(f"{base}/models/{name}", headers=viewer).json()
        assert model["aliases"] == {"production": "1", "staging": "2"}
        versions = httpx.get(f"{base}/models/{name}/versions", headers=viewer).json()["versions"]
        assert {v["version"]: v["aliases"] for v in versions} == {"2": ["staging"], "1": ["production"]}

        audit = httpx.get(f"{base}/audit", params={"model": name}, headers=viewer).json()
        assert [(r["version"], r["alias"], r["previous_version"]) for r in audit] == [
            ("2", "staging", None), ("1", "production", "2"), ("2", "production", "1"),
            ("1", "production", None),
        ]
        admin_name = principal_name("test-admin", Role.ADMIN)
        assert audit[-1]["reason"] == "first release" and audit[-1]["actor"] == admin_name
        assert all(r["direct"] and r["request_id"] is None for r in audit)
        assert audit[1]["reason"] == "v2 regressed"

        events = [_next_event(pubsub) for _ in range(4)]
    assert [(e["type"], e["model"], e["alias"], e["version"], e["previous_version"]) for e in events] == [
        ("model.alias_moved", name, "production", "1", None),
        ("model.alias_moved", name, "production", "2", "1"),
        ("model.alias_moved", name, "production", "1", "2"),
        ("model.alias_moved", name, "staging", "2", None),
    ]
    database = Database(db_url)
    with database.session() as session:
        payloads = [r.payload for r in session.scalars(select(EventRecord)).all()]
    database.dispose()
    assert sum(p["model"] == name for p in payloads) == 4


def test_promote_refuses_bad_callers_and_bad_requests(registry_url: str, two_versions: str) -> None:
    name = two_versions
    promote = f"{registry_url}/models/{name}/versions/1/promote"
    body = {"alias": "production"}

    assert "'admin' role" in _error(httpx.post(promote, json=body, headers=auth("trainer")), 403)
    # Without a request, only an admin moves an alias; approvers approve other people's requests.
    assert "'admin' role" in _error(httpx.post(promote, json=body, headers=auth("approver")), 403)
    _error(httpx.post(promote, json=body, headers=auth("viewer")), 403)
    _error(httpx.post(promote, json=body), 401)
    _error(httpx.post(promote, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    admin = auth("admin")
    unknown_version = f"{registry_url}/models/{name}/versions/999/promote"
    assert "no version 999" in _error(httpx.post(unknown_version, json=body, headers=admin), 404)
    unknown_model = f"{registry_url}/models/x{name}/versions/1/promote"
    assert "not in the registry" in _error(httpx.post(unknown_model, json=body, headers=admin), 404)
    assert "alias" in _error(httpx.post(promote, json={"alias": "prod"}, headers=admin), 422)
    _error(httpx.post(promote, content=b"{not json", headers=admin), 422)

    # Nothing above moved an alias or wrote an audit row.
    assert httpx.get(f"{registry_url}/models/{name}", headers=auth("viewer")).json()["aliases"] == {}
    assert httpx.get(f"{registry_url}/audit", params={"model": name}, headers=auth("viewer")).json() == []


def test_ready_when_database_and_mlflow_answer(registry_url: str) -> None:
    response = httpx.get(f"{registry_url}/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {"database": "ok", "mlflow": "ok"}


def test_the_cli_starts_and_ends_a_canary(registry_url: str, two_versions: str, tmp_path) -> None:
    from typer.testing import CliRunner

    from shipyard_cli.main import app as cli
    from tests.support import TOKENS

    env = {"SHIPYARD_REGISTRY_URL": registry_url, "SHIPYARD_STATE_DIR": str(tmp_path / "cli"),
           "COLUMNS": "200", "SHIPYARD_API_TOKEN": next(t for t, r in TOKENS.items() if r == "admin")}

    def run(*args: str):
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

    name = two_versions
    assert run("models", "promote", name, "1").exit_code == 0
    started = run("models", "promote", name, "2", "--alias", "canary", "--weight", "0.25")
    assert started.exit_code == 0 and "for 25% of requests" in started.output, started.output
    model = httpx.get(f"{registry_url}/models/{name}", headers=auth("viewer")).json()
    assert model["aliases"] == {"production": "1", "canary": "2"}
    refused = run("models", "promote", name, "2", "--weight", "0.5")  # a weight is for canaries only
    assert refused.exit_code != 0 and "weight" in refused.output
    ended = run("models", "unalias", name, "canary", "--reason", "looks fine")
    assert ended.exit_code == 0 and "canary removed (was v2)" in " ".join(ended.output.split())
    model = httpx.get(f"{registry_url}/models/{name}", headers=auth("viewer")).json()
    assert model["aliases"] == {"production": "1"}
