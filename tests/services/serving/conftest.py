"""Serving tests need registered model versions too: reuse the registry tests' fixtures."""

from tests.services.registry.conftest import isolated_platform, model_factory

__all__ = ["isolated_platform", "model_factory"]
