"""The pipeline's pieces on a real Prefect server (the package's stack) and a real DVC repository.

The deployed flows, against the whole stack, run in ``test_deployments.py`` and ``tests/e2e``.
"""

from __future__ import annotations

import shutil

import httpx
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_iris

from pipelines.flows import default_job_spec, prefect_api, train_and_deploy
from pipelines.tasks import PipelineConfig, ServiceError, promote, request_promotion, version_dataset
from shipyard_common.datasets import DataRepo
from shipyard_common.settings import PlatformSettings
from tests.support import test_platform


@pytest.fixture(scope="module")
def platform(tmp_path_factory, stack_platform) -> PlatformSettings:
    """A state dir of its own and the stack's Prefect server: no service, Redis or MLflow is called."""
    return test_platform(tmp_path_factory.mktemp("pipelines") / "state",
                         prefect_api_url=stack_platform.prefect_api_url)


def test_version_dataset_gives_each_content_its_own_revision(platform, tmp_path):
    config = PipelineConfig.from_platform(platform, token="test-admin")
    iris = load_iris(as_frame=True).frame
    csv = tmp_path / "half.csv"
    iris.head(75).to_csv(csv, index=False)

    with prefect_api(platform):
        first = version_dataset("iris", iris, config)
        second = version_dataset("iris", csv, config)
        again = version_dataset("iris", iris.head(75), config)

    assert first != second
    assert again == second  # the same content pins the same revision
    repo = DataRepo(platform.data_repo_path, platform.dvc_remote_path)
    # Without the local cache, both versions must come back from the DVC remote.
    shutil.rmtree(repo.path / ".dvc" / "cache")
    pd.testing.assert_frame_equal(repo.read("iris", first), iris)
    pd.testing.assert_frame_equal(repo.read("iris", second), iris.head(75))


def test_default_job_spec_is_the_demo_spec_with_overrides_merged():
    overrides = {"training": {"epochs": 5}, "model": {"hidden": [16]}}
    spec = default_job_spec(model_name="bc", dataset="breast_cancer", rev="abc1234", overrides=overrides)
    assert spec["model_name"] == "bc" and spec["framework"] == "pytorch"
    assert spec["model"] == {"type": "mlp", "hidden": [16]}
    assert spec["data"] == {"dataset": "breast_cancer", "rev": "abc1234", "task": "classification",
                            "target": "target", "features": None, "validation_split": 0.2}
    assert spec["training"] == {"epochs": 5, "batch_size": 32, "learning_rate": 0.001,
                                "optimizer": "adam", "seed": 0}
    assert spec["resources"] == {"queue": "cpu"} and spec["exports"] == ["onnx"]
    assert overrides == {"training": {"epochs": 5}, "model": {"hidden": [16]}}
    assert default_job_spec(model_name="bc", dataset="d", rev="abc1234")["training"]["epochs"] == 30


def test_the_flow_refuses_ambiguous_data_before_touching_anything(platform, tmp_path):
    frame = load_breast_cancer(as_frame=True).frame
    with pytest.raises(ValueError, match="exactly one of frame=, csv_path= or dataset_rev="):
        train_and_deploy(dataset_name="bc", model_name="bc", frame=frame, csv_path=tmp_path / "x.csv",
                         platform=platform, token="test-admin")
    assert "bc.csv" not in {path.name for path in platform.data_repo_path.glob("data/*")}


def test_the_flow_refuses_an_unknown_promotion_before_touching_anything(platform):
    frame = load_breast_cancer(as_frame=True).frame
    with pytest.raises(ValueError, match="promotion must be one of request, staging"):
        train_and_deploy(dataset_name="bc-promotion", model_name="bc", frame=frame, platform=platform,
                         token="test-admin", promotion="ask nicely")  # type: ignore[arg-type]
    assert "bc-promotion.csv" not in {path.name for path in platform.data_repo_path.glob("data/*")}


def test_request_promotion_asks_and_promote_is_the_admins(tmp_path, redis_url, mlflow_server, stack_platform):
    """The flow's two ways to production, against a real registry on a real MLflow server."""
    from services.registry.app import create_app
    from services.registry.settings import RegistrySettings
    from tests.services.registry.model_factory import ModelFactory, unique_name
    from tests.support import running_app

    name = unique_name("flow")
    factory = ModelFactory(mlflow_server)
    factory.register_classifier(name, seed=1)
    factory.register_classifier(name, seed=2)
    registry_platform = test_platform(tmp_path / "state", redis_url=redis_url,
                                      mlflow_tracking_uri=mlflow_server,
                                      prefect_api_url=stack_platform.prefect_api_url)
    with running_app(create_app(RegistrySettings(platform=registry_platform))) as base:
        at = registry_platform.model_copy(update={"registry_url": base})
        trainer = PipelineConfig.from_platform(at, token="test-trainer")
        admin = PipelineConfig.from_platform(at, token="test-admin")
        with prefect_api(at):
            request = request_promotion(name, "2", trainer, reason="retrained on fresh data")
            again = request_promotion(name, "2", trainer, reason="a rerun asks again")
            with pytest.raises(ServiceError, match="'admin' role") as refused:
                promote(name, "1", trainer)
            moved = promote(name, "1", admin, reason="bootstrap")
        headers = {"Authorization": "Bearer test-viewer"}
        model = httpx.get(f"{base}/models/{name}", headers=headers).json()
        audit = httpx.get(f"{base}/audit", params={"model": name}, headers=headers).json()

    assert request["state"] == "pending" and request["version"] == "2" and request["alias"] == "production"
    assert request["reason"] == "retrained on fresh data"
    assert request["requested_by"].startswith("role:trainer#")
    assert request["gate"] is None  # no gate covers production
    assert again["id"] == request["id"]  # asking again finds the pending request
    assert refused.value.status == 403
    assert moved["version"] == "1" and moved["previous_version"] is None
    assert model["aliases"] == {"production": "1"}  # the request moved nothing; the admin's move did
    assert [(row["version"], row["direct"], row["reason"]) for row in audit] == [("1", True, "bootstrap")]
