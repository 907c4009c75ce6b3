"""Fixtures of the security tests: the four services built in process, on the machine's PostgreSQL
(a database of their own) and Redis, each behind FastAPI's TestClient (lifespan run), with MLflow a
stub that holds nothing; helpers to sign in to the registry's UI and to list every route of an app.

The stub finds nothing in a search and answers every other call with MLflow's own "does not
exist" error at once, so a route that gets past its checks ends in a 404 instead of waiting for an
MLflow server; the tests here are about what is refused before that.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from starlette.requests import Request
from starlette.responses import JSONResponse

from services.monitor.app import create_app as create_monitor
from services.monitor.settings import MonitorSettings
from services.registry.app import create_app as create_registry
from services.registry.settings import RegistrySettings
from services.serving.app import create_app as create_serving
from services.serving.settings import ServingSettings
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from shipyard_common.auth import Role
from shipyard_common.settings import PlatformSettings
from tests.support import free_port, running_app, test_platform, token_of

# The Host every client sends: the edge refuses TestClient's default "testserver".
BASE_URL = "http://127.0.0.1"
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def empty_mlflow() -> FastAPI:
    """An MLflow that holds nothing: a search finds nothing, every other call is MLflow's 404
    RESOURCE_DOES_NOT_EXIST."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PATCH", "DELETE", "PUT"])
    async def nothing(request: Request, path: str) -> JSONResponse:
        if path.endswith("/search"):
            return JSONResponse({})
        return JSONResponse(
            {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"the stub holds no {path}"},
            status_code=404,
        )

    return app


@pytest.fixture(scope="session")
def stub_mlflow() -> Iterator[str]:
    with running_app(empty_mlflow()) as base:
        yield base


@pytest.fixture(scope="session")
def security_database() -> Iterator[str]:
    """A PostgreSQL database of the security apps' own, dropped afterwards: their background loops
    (the trainer's reconciler, the monitor's loop) must never see another test's jobs or windows."""
    import psycopg2

    admin_url = os.environ.get("SHIPYARD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"shipyard_security_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    yield f"{admin_url.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+psycopg2://", 1)
    with admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@pytest.fixture(scope="session")
def security_platform(
    tmp_path_factory: pytest.TempPathFactory, security_database: str, redis_url: str, stub_mlflow: str
) -> PlatformSettings:
    """One platform for the four services (one set per session, shared by the security modules: they
    only read, or write what they name themselves): a state folder and a PostgreSQL database of its
    own, the test tokens; peers on closed ports (nothing here reaches them)."""
    root = tmp_path_factory.mktemp("security")
    closed = {f"{name}_url": f"http://127.0.0.1:{free_port()}"
              for name in ("trainer", "registry", "serving", "monitor")}
    # Prefect's API is the stub too: its 404s answer at once, where a closed port has the client retry.
    return test_platform(root / "state", db_url=security_database, redis_url=redis_url,
                         mlflow_tracking_uri=stub_mlflow, prefect_api_url=f"{stub_mlflow}/api", **closed)


def build_apps(platform: PlatformSettings) -> dict[str, FastAPI]:
    """The four services' apps, as their ``create_app`` builds them."""
    queue_prefix = f"security-{uuid.uuid4().hex[:8]}-"
    return {
        "trainer": create_trainer(TrainerSettings(platform=platform, queue_prefix=queue_prefix)),
        "registry": create_registry(RegistrySettings(platform=platform)),
        "monitor": create_monitor(MonitorSettings(platform=platform)),
        "serving": create_serving(ServingSettings(platform=platform, reconcile_interval_s=3600)),
    }


@pytest.fixture(scope="session")
def apps(security_platform: PlatformSettings) -> dict[str, FastAPI]:
    return build_apps(security_platform)


@pytest.fixture(scope="session")
def clients(apps: dict[str, FastAPI]) -> Iterator[dict[str, TestClient]]:
    """A TestClient per service, its lifespan started (tables created, background loops running)."""
    opened: dict[str, TestClient] = {}
    try:
        for name, app in apps.items():
            client = TestClient(app, base_url=BASE_URL, raise_server_exceptions=False)
            client.__enter__()
            opened[name] = client
        yield opened
    finally:
        for client in opened.values():
            client.__exit__(None, None, None)


def fill(template: str, values: dict[str, str]) -> str:
    """``template`` with each ``{param}`` replaced by ``values[param]``."""
    path = template
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    return path


def message_of(response: Any) -> str:
    """The error's text in any of the platform's shapes (ours, OIP v2, TF Serving), else the body."""
    try:
        body = response.json()
    except ValueError:
        return str(response.text)
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body))
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error)
    return str(body)


def signed_in(app: FastAPI, role: Role) -> tuple[TestClient, str]:
    """A browser signed in to the registry's UI with ``role``'s token, and its form token."""
    browser = TestClient(app, base_url=BASE_URL, follow_redirects=False)
    form = browser.get("/ui/login")
    csrf = CSRF_FIELD.search(form.text)
    assert csrf, form.text
    answer = browser.post("/ui/login", data={"token": token_of(role), "csrf": csrf.group(1)})
    assert answer.status_code == 303, answer.text
    page = browser.get("/ui/requests")
    found = CSRF_FIELD.search(page.text)
    assert page.status_code == 200 and found, page.text
    return browser, found.group(1)


def every_route(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route ``app`` answers, in its OpenAPI or not (HEAD left out;
    ``MOUNT`` for a mounted app)."""
    found = set()
    for route in iter_route_contexts(app.routes):
        methods = getattr(route, "methods", None)
        if methods is None:
            found.add(("MOUNT", route.path))
        found |= {(method, route.path) for method in methods or () if method != "HEAD"}
    return found
