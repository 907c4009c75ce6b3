"""The role matrix of the registry's REST API: every route × no token, a bad token, each role,
and approving your own request. A refused call changes nothing; an allowed one does its work."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.registry.app import create_app
from services.registry.settings import RegistrySettings
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.support import auth, running_app

CALLERS: dict[str, dict[str, str]] = {
    "none": {},
    "bad": {"Authorization": "Bearer not-a-token"},
    "viewer": auth("viewer"),
    "trainer": auth("trainer"),
    "approver": auth("approver"),
    "admin": auth("admin"),
}
ROLES = ("viewer", "trainer", "approver", "admin")


@dataclass
class World:
    base: str
    factory: ModelFactory

    def model(self, production: list[str] = (), **aliases: str) -> str:  # type: ignore[assignment]
        name = unique_name("roles")
        for seed in (1, 2, 3):
            self.factory.register_trained(name, seed, metrics={"val_accuracy": 0.9 + seed / 100})
        for version in production:
            self.promote(name, version, "production")
        for alias, version in aliases.items():
            self.promote(name, version, alias)
        return name

    def promote(self, name: str, version: str, alias: str) -> None:
        httpx.post(
            f"{self.base}/models/{name}/versions/{version}/promote",
            json={"alias": alias},
            headers=auth("admin"),
        ).raise_for_status()

    def request(self, name: str, by: str = "trainer") -> int:
        made = httpx.post(
            f"{self.base}/models/{name}/requests",
            json={"version": "2", "reason": "better"},
            headers=CALLERS[by],
        )
        assert made.status_code == 201, made.text
        return int(made.json()["id"])

    def state(self, name: str) -> tuple[Any, ...]:
        """Everything a call could change about ``name``."""
        model = self.factory.client.get_registered_model(name)
        versions = self.factory.client.search_model_versions(f"name = '{name}'")
        get = lambda path: httpx.get(f"{self.base}{path}", headers=auth("viewer")).json()  # noqa: E731
        return (
            dict(model.aliases),
            sorted((v.version, sorted(v.tags.items())) for v in versions),
            get(f"/audit?model={name}"),
            get(f"/requests?model={name}"),
            get(f"/models/{name}/gate"),
        )


@dataclass
class Route:
    """``prepare`` makes fresh state and returns (model, method, path, body)."""

    label: str
    allowed: tuple[str, ...]
    prepare: Callable[[World], tuple[str, str, str, Any]]
    success: int = 200


def _read(path: str) -> Callable[[World], tuple[str, str, str, Any]]:
    return lambda w: ("", "GET", path.format(name=SHARED[0]), None)


SHARED: list[str] = []  # the model the read routes look at, made once


def _decide(verb: str, by: str = "trainer") -> Callable[[World], tuple[str, str, str, Any]]:
    def prepare(w: World) -> tuple[str, str, str, Any]:
        name = w.model()
        return name, "POST", f"/requests/{w.request(name, by)}/{verb}", {"reason": "decided"}

    return prepare


def _on_model(
    method: str, path: str, body: Any = None, **setup: Any
) -> Callable[[World], tuple[str, str, str, Any]]:
    def prepare(w: World) -> tuple[str, str, str, Any]:
        name = w.model(**setup)
        if path.endswith("/restore"):
            httpx.post(
                f"{w.base}/models/{name}/versions/2/archive", json={}, headers=auth("admin")
            ).raise_for_status()
        return name, method, path.format(name=name), body

    return prepare


READS = [
    "/models",
    "/models/{name}",
    "/models/{name}/versions",
    "/models/{name}/versions/1",
    "/models/{name}/compare?a=1&b=2",
    "/requests",
    "/models/{name}/history",
    "/models/{name}/gate",
    "/audit",
    "/models/{name}/history?at=2030-01-01T00:00:00Z",
]
ROUTES = [Route(f"GET {path}", ROLES, _read(path)) for path in READS] + [
    Route(
        "POST requests",
        ("trainer", "approver", "admin"),
        _on_model("POST", "/models/{name}/requests", {"version": "2", "reason": "r"}),
        201,
    ),
    Route("POST approve", ("approver", "admin"), _decide("approve")),
    Route("POST reject", ("approver", "admin"), _decide("reject")),
    Route("POST cancel (a trainer's request)", ("trainer", "admin"), _decide("cancel")),
    Route(
        "POST rollback",
        ("approver", "admin"),
        _on_model("POST", "/models/{name}/rollback", {"reason": "r"}, production=["1", "2"]),
    ),
    Route("POST archive", ("approver", "admin"), _on_model("POST", "/models/{name}/versions/2/archive", {})),
    Route("POST restore", ("approver", "admin"), _on_model("POST", "/models/{name}/versions/2/restore", {})),
    Route("POST promote (direct)", ("admin",), _on_model("POST", "/models/{name}/versions/2/promote", {})),
    Route(
        "DELETE alias",
        ("approver", "admin"),
        _on_model("DELETE", "/models/{name}/aliases/staging", staging="1"),
    ),
    Route(
        "PUT gate", ("admin",), _on_model("PUT", "/models/{name}/gate", {"rules": ["val_accuracy >= 0.5"]})
    ),
]


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str, model_factory: ModelFactory
) -> Iterator[World]:
    from tests.support import test_platform

    platform: PlatformSettings = test_platform(
        tmp_path_factory.mktemp("roles"),
        redis_url=redis_url,
        mlflow_tracking_uri=mlflow_server,
        events_channel="test-roles",
    )
    with running_app(create_app(RegistrySettings(platform=platform))) as base:
        w = World(base, model_factory)
        SHARED[:] = [w.model(production=["1"])]
        w.request(SHARED[0])
        yield w


def _call(w: World, caller: str, method: str, path: str, body: Any) -> httpx.Response:
    return httpx.request(method, f"{w.base}{path}", json=body, headers=CALLERS[caller], timeout=60)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.label)
def test_each_route_admits_exactly_its_roles(world: World, route: Route) -> None:
    name, method, path, body = route.prepare(world)
    before = world.state(name) if name else None
    for caller in CALLERS:
        if caller in route.allowed:
            continue
        response = _call(world, caller, method, path, body)
        expected = 401 if caller in ("none", "bad") else 403
        assert response.status_code == expected, (caller, response.text)
        assert response.json()["error"]["message"]
    if name:
        assert world.state(name) == before, "a refused call changed something"
    for caller in route.allowed:
        name, method, path, body = route.prepare(world) if method != "GET" else (name, method, path, body)
        response = _call(world, caller, method, path, body)
        assert response.status_code == route.success, (caller, response.text)


@pytest.mark.parametrize("role", ["approver", "admin"])
def test_nobody_approves_or_rejects_their_own_request(world: World, role: str) -> None:
    name = world.model()
    request_id = world.request(name, by=role)
    before = world.state(name)
    for verb in ("approve", "reject"):
        response = _call(world, role, "POST", f"/requests/{request_id}/{verb}", {"reason": "mine"})
        assert response.status_code == 403 and "your own" in response.json()["error"]["message"]
    assert world.state(name) == before
