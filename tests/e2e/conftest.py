"""The stack every end-to-end test shares: started once for this package, because it costs a minute,
and stopped after its last test (package scope: ``tests/conftest.py`` runs the package's files on one
pytest-xdist worker, one after the other), not at the end of the session, so that it neither idles
beside the rest of the suite nor adds its shutdown to the session's last test.

Every component is real and runs as its own process, started the way ``shipyard up`` starts it.
Tests in several files use it (the loop, retraining, Prometheus); each leaves what it made behind,
so a test looks only at the models and rows it made itself, or at the first deployment (``deployed``).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from sklearn.datasets import load_breast_cancer

from shipyard_cli.stack import Stack
from shipyard_common.settings import PlatformSettings
from tests.stack_teardown import down_at_once
from tests.support import TOKENS, auth, events_channel, free_port, redis_db

E2E_REDIS_DB = redis_db(14)
#: Serving's Open Inference Protocol over gRPC in the stack (``shipyard up`` starts it beside HTTP).
SERVING_GRPC_PORT = free_port()


@pytest.fixture(scope="package")
def stack_platform(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[PlatformSettings]:
    import redis

    state = tmp_path_factory.mktemp("e2e-state")
    base_redis = redis_url.rsplit("/", 1)[0]
    platform = PlatformSettings(
        env="test",
        state_dir=state,
        redis_url=f"{base_redis}/{E2E_REDIS_DB}",
        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
        trainer_url=f"http://127.0.0.1:{free_port()}",
        registry_url=f"http://127.0.0.1:{free_port()}",
        serving_url=f"http://127.0.0.1:{free_port()}",
        monitor_url=f"http://127.0.0.1:{free_port()}",
        prefect_api_url=f"http://127.0.0.1:{free_port()}/api",
        tokens=dict(TOKENS),
        log_json=True,
        events_channel=events_channel(),
        # As outside tests (and in `make demo`): MLflow with its basic-auth app, so that the flows run in
        # this process (``deployed``) must sign in as the services do.
        mlflow_auth=True,
    )
    redis.Redis.from_url(platform.redis_url).flushdb()
    extra_env = {
        "SHIPYARD_SERVING_GRPC_PORT": str(SERVING_GRPC_PORT),
        "SHIPYARD_SERVING_RECONCILE_INTERVAL_S": "2",
        # The registry compares MLflow's aliases with its audit often enough for Prometheus to see the
        # production alias it set (ShipyardAliasMovedOutsideRegistry's series, at 0) within the test.
        "SHIPYARD_REGISTRY_ALIAS_RECONCILE_INTERVAL_S": "2",
        # Windows close a second or two after their 200th row is logged, so tests wait for seconds.
        "SHIPYARD_MONITOR_LOOP_INTERVAL_S": "1",
        "SHIPYARD_MONITOR_WINDOW_GRACE_S": "1",
        "SHIPYARD_MONITOR_WINDOW": '{"rows": 200}',
    }
    stack = Stack(platform, extra_env=extra_env, pipelines_token="test-trainer")
    try:
        stack.up()
        yield platform
    finally:
        down_at_once(stack)


@pytest.fixture(scope="package")
def deployed(stack_platform: PlatformSettings) -> dict:
    """Run the Prefect flow once (it asks for production as test-trainer) and approve its request as
    test-approver; every test below looks at what it left behind."""
    from pipelines.flows import train_and_deploy

    frame = load_breast_cancer(as_frame=True).frame
    result = train_and_deploy(
        dataset_name="breast_cancer",
        frame=frame,
        model_name="breast_cancer",
        platform=stack_platform,
        token="test-trainer",
    )
    approved = httpx.post(f"{stack_platform.registry_url}/requests/{result['request']['id']}/approve",
                          json={"reason": "e2e"}, headers=auth("approver"), timeout=30)
    approved.raise_for_status()
    return result


