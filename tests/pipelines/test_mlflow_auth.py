"""The flows read MLflow directly (the evaluate task downloads each version it scores; batch_predict
resolves and downloads its version): against an MLflow that asks for credentials, as the local stack
and ``make demo`` run it outside tests, they sign in with the platform's, as the services do."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.tasks import PipelineConfig, score_version
from shipyard_common.lineage import TAG_FEATURES, TAG_TARGET
from tests.services.registry.model_factory import N_FEATURES, ModelFactory, run_directly, unique_name
from tests.support import running_mlflow

CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture
def no_credentials_in_env() -> Iterator[None]:
    """This process's environment without MLflow credentials, and as it was afterwards."""
    saved = {key: os.environ.pop(key, None) for key in CREDENTIAL_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_a_flow_config_signs_in_to_an_mlflow_that_asks(tmp_path: Path, redis_url: str, no_credentials_in_env):
    with running_mlflow(tmp_path, auth=True, redis_url=redis_url) as platform:
        credentials = platform.mlflow_credentials()
        assert credentials is not None
        os.environ.update(dict(zip(CREDENTIAL_ENV, credentials, strict=True)))  # an admin registers
        name = unique_name("flow-auth")
        registered = ModelFactory(platform.mlflow_tracking_uri).register_classifier(name, seed=3)
        for key in CREDENTIAL_ENV:
            os.environ.pop(key)
        uri = platform.mlflow_tracking_uri
        with pytest.raises(MlflowException, match="401"):  # a process that did not sign in
            MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(name, registered.version)

        config = PipelineConfig.from_platform(platform)
        rows = pd.DataFrame(np.random.default_rng(0).normal(size=(40, N_FEATURES)),
                            columns=[f"f{i}" for i in range(N_FEATURES)])
        expected = run_directly(registered.model_bytes, rows.to_numpy(dtype=np.float32).tolist())
        rows["target"] = np.arange(40) % 2
        tags = {TAG_FEATURES: json.dumps(list(rows.columns[:-1])), TAG_TARGET: "target"}
        accuracy = score_version(name, registered.version, rows, config, tags, "classification")
        assert accuracy == pytest.approx(float(np.mean(expected.argmax(axis=1) == rows["target"])))
