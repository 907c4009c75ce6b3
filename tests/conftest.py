"""Fixtures on real components: the machine's Redis and PostgreSQL, an MLflow server process.

Redis: ``SHIPYARD_TEST_REDIS_URL`` (default db 13 of the local server, flushed per session; each
pytest-xdist worker has its own, see ``tests.support.redis_db``),
so that tests never touch a developer's stack on db 0. PostgreSQL: a throw-away database per
session on ``SHIPYARD_TEST_PG_URL`` (default the local server with trust auth).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from shipyard_cli.stack import Stack
from shipyard_common.settings import PlatformSettings, disable_telemetry
from tests.support import free_port, redis_answers, redis_db, stop_process_group, test_platform, wait_for

disable_telemetry()
# pytest-xdist's workers start with COLUMNS=80; the CLI's console, made when first imported, would keep
# that width for good. CLI tests pass the width they want to each command.
os.environ.pop("COLUMNS", None)

REDIS_URL = os.environ.get("SHIPYARD_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{redis_db(13)}")
PG_ADMIN_URL = os.environ.get("SHIPYARD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not redis_answers(REDIS_URL):
        pytest.fail(f"tests need a Redis at {REDIS_URL} (set SHIPYARD_TEST_REDIS_URL)")
    redis.Redis.from_url(REDIS_URL).flushdb()
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped afterwards."""
    import psycopg2

    name = f"shipyard_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}".replace("postgresql://", "postgresql+psycopg2://", 1)
    with admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shipyard.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking + registry server (SQLite store) on a free port."""
    state = tmp_path_factory.mktemp("mlflow-state")
    uri = f"http://127.0.0.1:{free_port()}"
    platform = test_platform(state, mlflow_tracking_uri=uri)
    stack = Stack(platform)
    record = stack.start_component(stack.mlflow_component())
    try:
        stack.wait_ready(record, timeout=120)
        yield uri
    finally:
        stop_process_group(record.pid)


@pytest.fixture
def platform(tmp_path: Path, redis_url: str, mlflow_server: str) -> PlatformSettings:
    """Platform settings for one test: its own state folder and SQLite DB, shared MLflow."""
    return test_platform(tmp_path / "state", redis_url=redis_url, mlflow_tracking_uri=mlflow_server)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: `pytest -p no:xdist` runs without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadscope`` (``make test``), with the modules that share a stack as one unit of work
    (tests/scheduling.py); any other mode as pytest-xdist makes it."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    from tests.scheduling import SharedStackScopes

    return SharedStackScopes(LoadScopeScheduling(config, log))


def pytest_unconfigure(config: pytest.Config) -> None:
    # Prefect stops its ephemeral API server at interpreter exit and logs that to a stream
    # pytest has already closed; the traceback it prints is noise, not a failure.
    import logging

    logging.raiseExceptions = False


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 HTTP API (moto's server mode) on a free loopback port, with the bucket
    ``shipyard-datasets`` (key ``test-key``, secret ``test-secret``)."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test-key",
                              aws_secret_access_key="test-secret", region_name="us-east-1")
        wait_for(lambda: client.create_bucket(Bucket="shipyard-datasets"), timeout=30, what="moto server")
        yield endpoint
    finally:
        stop_process_group(process.pid)
