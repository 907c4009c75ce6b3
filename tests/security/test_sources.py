"""A version's files as a data source: only its own run's artifacts may be given an alias.

Serving downloads whatever a version's ``source`` names. Versions registered straight in MLflow
(not through the trainer) with ``file://``, the cloud metadata address, a loopback URL, another
run's folder or a ``..`` out of its own run: refused by MLflow at registration (it checks sources
since 3.x) or else by the registry, which moves no alias to any of them, directly or through a
request (400 saying why); the registry's own rule is tested on its own too, and a version whose
files are its run's is still promoted. On a real MLflow server (the session's), with a registry app
in process.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from services.registry.app import create_app as create_registry
from services.registry.core.sources import check_source
from services.registry.core.store import VersionRecord
from services.registry.settings import RegistrySettings
from shipyard_common.auth import Role
from shipyard_common.errors import InvalidInput
from tests.security.conftest import BASE_URL, message_of, signed_in
from tests.support import auth, test_platform

pytestmark = pytest.mark.security

HOSTILE_SOURCES = {
    "file": "file:///etc",
    "metadata": "http://169.254.169.254/latest/meta-data/",
    "loopback": "http://127.0.0.1:6379/",
    "other-run": "{other}/model",
    "climbing-out": "{own}/model/../../../other-run/artifacts/model",
    "climbing-out-encoded": "{own}/model/%2e%2e/%2e%2e/%2e%2e/x",
}


@pytest.fixture(scope="module")
def registry(
    tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, redis_url: str
) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("sources")
    platform = test_platform(root / "state", db_url=f"sqlite:///{root / 'registry.db'}",
                             redis_url=redis_url, mlflow_tracking_uri=mlflow_server)
    with TestClient(create_registry(RegistrySettings(platform=platform)), base_url=BASE_URL) as client:
        yield client


@pytest.fixture(scope="module")
def versions(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One model: a version per hostile source (or MLflow's own refusal of it), and two good ones."""
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    name = f"sources-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    experiment = client.create_experiment(name)
    own, other = (client.create_run(experiment) for _ in range(2))
    image = tmp_path_factory.mktemp("reports") / "curve.png"
    image.write_bytes(PNG)
    client.log_artifact(own.info.run_id, str(image), "reports")
    uris = {"own": own.info.artifact_uri.rstrip("/"), "other": other.info.artifact_uri.rstrip("/")}
    found: dict[str, Any] = {"name": name}
    for label, source in HOSTILE_SOURCES.items():
        try:
            found[label] = client.create_model_version(name, source=source.format(**uris),
                                                       run_id=own.info.run_id).version
        except MlflowException as exc:  # MLflow refused it itself: closed there
            found[label] = exc
    good = {"runs-uri": f"runs:/{own.info.run_id}/model", "artifacts": f"{uris['own']}/model"}
    for label, source in good.items():
        found[label] = client.create_model_version(name, source=source, run_id=own.info.run_id).version
    return found


@pytest.mark.parametrize("label", sorted(HOSTILE_SOURCES))
def test_a_version_whose_files_are_elsewhere_gets_no_alias(
    registry: TestClient, versions: dict[str, Any], label: str
) -> None:
    """Refused by MLflow when registered (this MLflow checks sources itself), else by the registry on
    a direct promotion and on a request."""
    name, version = versions["name"], versions[label]
    if isinstance(version, MlflowException):
        assert version.error_code == "INVALID_PARAMETER_VALUE" and "source" in version.message
        return
    promote = registry.post(f"/models/{name}/versions/{version}/promote", json={"alias": "staging"},
                            headers=auth("admin"))
    assert promote.status_code == 400 and "outside its run's artifacts" in message_of(promote), promote.text
    asked = registry.post(f"/models/{name}/requests", headers=auth("trainer"),
                          json={"version": version, "alias": "production", "reason": "try"})
    assert asked.status_code == 400 and "cannot be given an alias" in message_of(asked), asked.text
    assert registry.get(f"/models/{name}", headers=auth("viewer")).json()["aliases"] == {}


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
# Ways to name a file of the run (or of the host) that is not one of its listed report images.
HOSTILE_REPORTS = ["../model/MLmodel", "..%2Fmodel%2FMLmodel", "%2e%2e/%2e%2e/x", "%252e%252e%252fx",
                   "..%5C..%5Cx", "/etc/passwd", "curve.png/../../model/MLmodel", "curve.png%23/../x"]


def test_report_files_are_only_the_runs_listed_images(registry: TestClient, versions: dict[str, Any]) -> None:
    """The UI serves a version's report image by name: only a name its run's reports/ lists; a path
    that climbs out, encoded or not, or an absolute one is a 404, never a file."""
    browser, _ = signed_in(registry.app, Role.VIEWER)  # type: ignore[arg-type]
    base = f"/ui/models/{versions['name']}/versions/{versions['artifacts']}/reports"
    shown = browser.get(f"{base}/curve.png")
    assert shown.status_code == 200 and shown.content == PNG, shown.text
    for hostile in HOSTILE_REPORTS:
        answer = browser.get(f"{base}/{hostile}")
        assert answer.status_code in (400, 404), f"{hostile}: {answer.status_code}"
        assert answer.headers["content-type"].startswith("text/html"), f"{hostile}: a file, not a page"


OWN = "mlflow-artifacts:/1/0a1b/artifacts"
OTHER = "mlflow-artifacts:/1/9f8e/artifacts"


def record(source: str, run_id: str | None = "0a1b") -> VersionRecord:
    return VersionRecord(name="m", version="3", run_id=run_id, source=source, status="READY",
                         description=None, tags={}, created_ms=None)


@pytest.mark.parametrize("source", [
    *(s.format(own=OWN, other=OTHER) for s in HOSTILE_SOURCES.values()),
    "runs:/9f8e/model", "runs:/0a1b/../9f8e/model", f"{OWN}-and-more/model", "/etc", f"{OWN}\\..\\..\\x",
])
def test_the_registry_refuses_files_outside_the_run_whatever_mlflow_accepted(source: str) -> None:
    """The registry's own rule (for a tracking server that accepts such sources, or versions
    registered before it checked them): the source must be ``runs:/<its run>/...`` or below the
    run's artifact URI, without climbing out."""
    store = SimpleNamespace(tracking_uri="http://mlflow", client=SimpleNamespace(
        get_run=lambda run_id: SimpleNamespace(info=SimpleNamespace(artifact_uri=OWN + "/"))))
    with pytest.raises(InvalidInput, match="cannot be given an alias"):
        check_source(store, record(source))  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="not registered from a run"):
        check_source(store, record(f"{OWN}/model", run_id=None))  # type: ignore[arg-type]
    for good in (f"{OWN}/model", OWN, "runs:/0a1b/model"):
        check_source(store, record(good))  # type: ignore[arg-type]


def test_a_version_of_its_runs_own_files_is_promoted(registry: TestClient, versions: dict[str, Any]) -> None:
    """The control: ``runs:/<its run>/model`` and the run's artifact URI itself move aliases."""
    name = versions["name"]
    for alias, label in (("staging", "runs-uri"), ("production", "artifacts")):
        moved = registry.post(f"/models/{name}/versions/{versions[label]}/promote", json={"alias": alias},
                              headers=auth("admin"))
        assert moved.status_code == 200, moved.text
