"""One platform for the pipeline tests: the stack as ``shipyard up`` starts it (MLflow, a Prefect
server with its own SQLite database under the session's tmp folder, a Celery worker, the four
services and the deployments process), on free ports, started once for this package and stopped after
its last test (package scope: ``tests/conftest.py`` runs the package's files on one pytest-xdist worker),
rather than idling beside the rest of the suite until the session ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from shipyard_cli.stack import Stack
from shipyard_common.settings import PlatformSettings
from tests.stack_teardown import down_at_once
from tests.support import free_port, redis_db, stop_process_group, test_platform

PIPELINES_REDIS_DB = redis_db(12)
# Fast enough for tests: the deployments process polls for runs every second, the server's
# scheduler looks at schedules every two.
FAST_PREFECT = {"PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}


@pytest.fixture(scope="package")
def pipeline_stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("pipelines-stack")
    urls = {f"{name}_url": f"http://127.0.0.1:{free_port()}" for name in ("trainer", "registry", "serving",
                                                                          "monitor")}
    platform = test_platform(
        state,
        redis_url=f"{redis_url.rsplit('/', 1)[0]}/{PIPELINES_REDIS_DB}",
        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
        prefect_api_url=f"http://127.0.0.1:{free_port()}/api",
        **urls,
    )
    redis.Redis.from_url(platform.redis_url).flushdb()
    stack = Stack(platform, extra_env=FAST_PREFECT, pipelines_token="test-trainer")
    try:
        stack.up()
        yield stack
    finally:
        down_at_once(stack)


@pytest.fixture(scope="package")
def stack_platform(pipeline_stack: Stack) -> PlatformSettings:
    return pipeline_stack.platform


@pytest.fixture(scope="module")
def prefect_url(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[str]:
    """A Prefect server of its own for a module that runs flows in process (the package's whole stack
    is not needed there), booting while the session's MLflow server does."""
    platform = test_platform(tmp_path_factory.mktemp("batch-prefect"),
                             prefect_api_url=f"http://127.0.0.1:{free_port()}/api")
    stack = Stack(platform)
    record = stack.start_component(stack.prefect_component())
    try:
        request.getfixturevalue("mlflow_server")
        stack.wait_ready(record, timeout=120)
        yield platform.prefect_api_url
    finally:
        stop_process_group(record.pid)
