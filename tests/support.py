"""Helpers the tests share: tokens per role, real servers on free ports, processes, waiting.

Tests take their helpers from here (or their package's conftest.py or helper modules), never from
another test module nor from the CLI: ``free_port`` and ``stop_process_group`` come from
``shipyard_common.processes`` (the one definition the CLI's stack uses too) and are re-exported here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import redis
import uvicorn

from shipyard_common.auth import Role, principal_name
from shipyard_common.processes import free_port as free_port
from shipyard_common.processes import stop_process_group as stop_process_group
from shipyard_common.settings import PlatformSettings

TOKENS: dict[str, Role] = {
    "test-admin": Role.ADMIN,
    "test-trainer": Role.TRAINER,
    "test-approver": Role.APPROVER,
    "test-viewer": Role.VIEWER,
    # A second approver, for decisions two people race to make.
    "test-approver-2": Role.APPROVER,
}


def redis_answers(url: str) -> bool:
    """Whether the Redis at ``url`` answers a PING within a second."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        ok = bool(client.ping())
        client.close()
        return ok
    except redis.RedisError:
        return False


def worker_index() -> int:
    """Which pytest-xdist worker runs this process (0 without xdist): what it owns must differ."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name.removeprefix("gw") or 0)


def redis_db(base: int) -> int:
    """A Redis database of this worker's own (13, 12, 14 for the first; 3 lower for each next one): a
    session flushes its databases, and a stack's worker takes every job on its queues."""
    db = base - 3 * worker_index()
    if db < 1:
        raise RuntimeError("the tests have Redis databases for at most four pytest-xdist workers")
    return db


def events_channel() -> str:
    """The events channel of this worker's stacks: Redis pub/sub reaches every database."""
    return f"shipyard.events.test-{worker_index()}"


def test_platform(state_dir: Any, **overrides: Any) -> PlatformSettings:
    """Platform settings as every test wants them: test env, the test tokens, plain-text logs."""
    values: dict[str, Any] = {"env": "test", "tokens": dict(TOKENS), "log_json": False,
                              "events_channel": events_channel()}
    values.update(overrides)
    return PlatformSettings(state_dir=state_dir, **values)


test_platform.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@contextmanager
def running_mlflow(state_dir: Any, *, auth: bool = False, **overrides: Any) -> Iterator[PlatformSettings]:
    """An MLflow server process as the stack starts it (SQLite store under ``state_dir``) on a free
    port; yield the test platform settings that reach it. ``auth``: with MLflow's basic-auth app, the
    platform's credentials generated under ``state_dir`` (``platform.mlflow_credentials()``)."""
    from shipyard_cli.stack import Stack

    uri = f"http://127.0.0.1:{free_port()}"
    platform = test_platform(state_dir, mlflow_tracking_uri=uri, mlflow_auth=auth, **overrides)
    stack = Stack(platform)
    record = stack.start_component(stack.mlflow_component())
    try:
        stack.wait_ready(record, timeout=120)
        yield platform
    finally:
        stop_process_group(record.pid)


def token_of(role: Role | str) -> str:
    """The (first) test token for ``role``."""
    role = Role(role)
    return next(t for t, r in TOKENS.items() if r == role)


def name_of(role: Role | str) -> str:
    """The principal name that ``token_of(role)`` signs in as."""
    return principal_name(token_of(role), Role(role))


def auth(role: Role | str) -> dict[str, str]:
    """Headers carrying the test token for ``role``."""
    return {"Authorization": f"Bearer {token_of(role)}"}


@contextmanager
def running_app(app: Any, *, port: int | None = None, **options: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn (``options``: more of its settings) on a free loopback port in a
    thread; yield its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: server.started, timeout=30, what=f"app on port {port}")
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 30, interval: float = 0.1, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing we wait for may not exist yet
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: {last_error}")


def get_json(url: str, **kwargs: Any) -> Any:
    response = httpx.get(url, timeout=30, **kwargs)
    response.raise_for_status()
    return response.json()


def own_database_url(request: Any, tmp_path: Any, *, prefix: str) -> str:
    """A database of one test's own, for ``request.param`` "sqlite" (a file under ``tmp_path``) or
    "postgresql" (a fresh schema ``<prefix>_<hex>`` of the session's database): for tests that count
    every row in it."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shipyard.db'}"
    import uuid

    import sqlalchemy

    url = str(request.getfixturevalue("postgres_url"))
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return f"{url}?options=-csearch_path%3D{schema}"


def missing_tool(reason: str) -> None:
    """A tool a test needs is not here: a failure under CI (``.ci/run`` installs every one, so a skip
    there would hide a check nobody runs), a skip with ``reason`` on a developer's machine."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI installs it: this check must run)")
    pytest.skip(reason)
