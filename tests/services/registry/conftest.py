from __future__ import annotations

import uuid

import pytest

from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory


@pytest.fixture(scope="session")
def model_factory(mlflow_server: str) -> ModelFactory:
    return ModelFactory(mlflow_server)


@pytest.fixture
def isolated_platform(platform: PlatformSettings) -> PlatformSettings:
    """The test's platform on its own events channel, so no other test's events reach it."""
    return platform.model_copy(update={"events_channel": f"test-events-{uuid.uuid4().hex[:10]}"})
