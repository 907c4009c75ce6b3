"""Serving tests need registered model versions too: reuse the registry tests' fixtures."""

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from services.serving.app import create_app
from services.serving.fastlane.uvicorn_protocol import FastLaneHttpProtocol
from services.serving.settings import ServingSettings
from shipyard_common.settings import PlatformSettings
from tests.services.registry.conftest import isolated_platform, model_factory
from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.services.serving.model_folder import register_folder
from tests.services.serving.support import NO_RECONCILE
from tests.support import running_app, wait_for

__all__ = ["apps", "isolated_platform", "model_factory"]



@pytest.fixture
def apps(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> Iterator[tuple[Any, str, str, str]]:
    """(the fast lane's app, its base URL, the plain FastAPI app's base URL, the model name)."""
    version = register_folder(model_factory, unique_name("fastlane"), seed=3, serve="onnx")
    model_factory.set_production(version.name, version.version)
    common = {"reconcile_interval_s": NO_RECONCILE, "max_batch_rows": 8, "max_body_bytes": 4096}
    fast = create_app(ServingSettings(platform=isolated_platform, **common))
    plain = create_app(ServingSettings(platform=isolated_platform, fast_lane=False, **common))
    with ExitStack() as stack:
        # As `python -m services.serving` serves it: cheap predictions answered in the HTTP protocol.
        bases = [stack.enter_context(running_app(fast, http=FastLaneHttpProtocol)),
                 stack.enter_context(running_app(plain))]
        for base in bases:
            wait_for(lambda base=base: httpx.get(f"{base}/readyz").status_code == 200, timeout=60,
                     what="serving ready")
        yield fast, bases[0], bases[1], version.name
