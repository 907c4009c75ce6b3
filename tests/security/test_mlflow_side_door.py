"""MLflow is not a side door: it runs with its basic-auth app, only the platform holds credentials,
and an alias moved in MLflow without the registry is recorded and alerted by the registry's reconcile.

One MLflow server for the module, started as the stack starts it (``running_mlflow(auth=True)``: the
password generated under its state directory, ``default_permission = NO_PERMISSIONS``), and one
registry app on it whose reconcile runs on demand (``POST /aliases/reconcile``), so that each test
says when it runs; the last test checks the periodic run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from services.registry.app import create_app
from services.registry.core.reconcile import ACTOR
from services.registry.settings import RegistrySettings
from shipyard_cli.stack import Stack, StackError
from shipyard_common.auth import Role
from shipyard_common.settings import PlatformSettings
from tests.security.conftest import signed_in
from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.support import auth, running_app, running_mlflow, wait_for

pytestmark = pytest.mark.security

CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[PlatformSettings]:
    with running_mlflow(tmp_path_factory.mktemp("side-door"), auth=True, redis_url=redis_url) as platform:
        yield platform


@pytest.fixture(scope="module")
def credentials(platform: PlatformSettings) -> Iterator[tuple[str, str]]:
    """The platform's MLflow credentials, in this process's environment for the module (as
    ``apply_mlflow_client_limits`` puts them in a service's), then as they were."""
    found = platform.mlflow_credentials()
    assert found is not None and found[0] == "shipyard" and len(found[1]) >= 12
    saved = {key: os.environ.get(key) for key in CREDENTIAL_ENV}
    os.environ.update(dict(zip(CREDENTIAL_ENV, found, strict=True)))
    yield found
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def factory(platform: PlatformSettings, credentials: tuple[str, str]) -> ModelFactory:
    return ModelFactory(platform.mlflow_tracking_uri)


class Registry(str):
    """The registry's base URL, with its app (for the UI's signed-in browser)."""

    app: FastAPI


@pytest.fixture(scope="module")
def registry(platform: PlatformSettings, credentials: tuple[str, str]) -> Iterator[Registry]:
    app = create_app(RegistrySettings(platform=platform, alias_reconcile_interval_s=0))
    with running_app(app) as base:
        url = Registry(base)
        url.app = app
        yield url


def alias_url(platform: PlatformSettings) -> str:
    return f"{platform.mlflow_tracking_uri}/api/2.0/mlflow/registered-models/alias"


def mlflow_alias(platform: PlatformSettings, name: str, credentials: tuple[str, str]) -> str | None:
    answer = httpx.get(f"{platform.mlflow_tracking_uri}/api/2.0/mlflow/registered-models/get",
                       params={"name": name}, auth=credentials, timeout=30)
    answer.raise_for_status()
    aliases = {a["alias"]: a["version"] for a in answer.json()["registered_model"].get("aliases", [])}
    return aliases.get("production")


def test_a_direct_alias_write_without_credentials_is_refused(
    platform: PlatformSettings, factory: ModelFactory, credentials: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = unique_name("side-door")
    for seed in (1, 2):
        factory.register_classifier(name, seed=seed)
    assert httpx.post(alias_url(platform), json={"name": name, "alias": "production", "version": "1"},
                      auth=credentials, timeout=30).status_code == 200
    for key in CREDENTIAL_ENV:
        monkeypatch.delenv(key, raising=False)
    uri = platform.mlflow_tracking_uri
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(name, "production", "2")
    body = {"name": name, "alias": "production", "version": "2"}
    assert httpx.post(alias_url(platform), json=body, timeout=30).status_code == 401
    assert httpx.post(alias_url(platform), json=body, auth=("shipyard", "not-the-password"),
                      timeout=30).status_code == 401
    assert httpx.delete(alias_url(platform), params={"name": name, "alias": "production"},
                        timeout=30).status_code == 401
    # Nor can a stranger read, or sign themselves up.
    assert httpx.get(f"{uri}/api/2.0/mlflow/registered-models/search", timeout=30).status_code == 401
    signup = {"username": "mallory", "password": "x" * 16}
    assert httpx.post(f"{uri}/api/2.0/mlflow/users/create", json=signup, timeout=30).status_code == 401
    assert mlflow_alias(platform, name, credentials) == "1"

    # A user the admin made has no permission on anything (default_permission = NO_PERMISSIONS).
    user = (unique_name("user"), "a-long-enough-password")
    made = httpx.post(f"{uri}/api/2.0/mlflow/users/create", auth=credentials, timeout=30,
                      json={"username": user[0], "password": user[1]})
    assert made.status_code == 200, made.text
    assert httpx.post(alias_url(platform), json=body, auth=user, timeout=30).status_code == 403
    assert mlflow_alias(platform, name, credentials) == "1"

    # The platform's credentials move it.
    assert httpx.post(alias_url(platform), json=body, auth=credentials, timeout=30).status_code == 200
    assert mlflow_alias(platform, name, credentials) == "2"


def reconcile(registry: str) -> list[dict[str, object]]:
    answer = httpx.post(f"{registry}/aliases/reconcile", headers=auth("admin"), timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["recorded"]  # type: ignore[no-any-return]


def unaudited(registry: str, name: str) -> list[dict[str, object]]:
    answer = httpx.get(f"{registry}/aliases/unaudited", params={"model": name}, headers=auth("viewer"),
                       timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["unaudited"]  # type: ignore[no-any-return]


def samples(registry: str, metric: str, name: str) -> dict[str, float]:
    """``metric``'s samples for model ``name`` in the registry's /metrics, by sample name."""
    text = httpx.get(f"{registry}/metrics", timeout=30).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            if family.name == metric for sample in family.samples if sample.labels.get("model") == name}


def promote(registry: str, name: str, version: str) -> None:
    answer = httpx.post(f"{registry}/models/{name}/versions/{version}/promote", headers=auth("admin"),
                        json={"alias": "production", "reason": "through the registry"}, timeout=60)
    assert answer.status_code == 200, answer.text


def test_the_reconcile_records_logs_and_exports_an_alias_moved_in_mlflow_directly(
    registry: Registry, factory: ModelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique_name("moved")
    for seed in (1, 2, 3):
        factory.register_classifier(name, seed=seed)
    promote(registry, name, "1")
    assert [r for r in reconcile(registry) if r["model"] == name] == []
    # With the platform's credentials, but not through the registry: no request, no audit row.
    factory.client.set_registered_model_alias(name, "production", "2")

    caplog.set_level(logging.WARNING, logger="shipyard.registry.reconcile")
    recorded = [r for r in reconcile(registry) if r["model"] == name]
    assert [(r["action"], r["alias"], r["version"], r["previous_version"], r["actor"]) for r in recorded] == [
        ("moved_outside", "production", "2", "1", ACTOR)]
    assert "moved outside the registry" in str(recorded[0]["reason"])
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and getattr(r, "model", None) == name]
    assert len(warned) == 1 and "names v2" in warned[0].getMessage()

    (found,) = unaudited(registry, name)
    assert (found["alias"], found["version"], found["recorded_version"]) == ("production", "2", "1")
    assert found["audit_id"] == recorded[0]["id"]
    audit = httpx.get(f"{registry}/audit", params={"model": name}, headers=auth("viewer"), timeout=30).json()
    assert [(r["action"], r["version"]) for r in audit] == [("moved_outside", "2"), ("promote", "1")]
    assert samples(registry, "shipyard_registry_unaudited_aliases", name) == {
        "shipyard_registry_unaudited_aliases": 1.0}
    assert samples(registry, "shipyard_registry_aliases_moved_outside", name)[
        "shipyard_registry_aliases_moved_outside_total"] == 1.0
    browser, _ = signed_in(registry.app, Role.VIEWER)
    page = browser.get(f"/ui/models/{name}")
    assert page.status_code == 200 and "production was changed outside the registry" in page.text

    # Found once: a second run records nothing more. Deleted outside: recorded as such.
    assert [r for r in reconcile(registry) if r["model"] == name] == []
    factory.client.delete_registered_model_alias(name, "production")
    recorded = [r for r in reconcile(registry) if r["model"] == name]
    assert [(r["action"], r["version"], r["previous_version"]) for r in recorded] == [
        ("removed_outside", "2", "2")]
    (found,) = unaudited(registry, name)
    assert (found["version"], found["recorded_version"]) == (None, "1")

    # The registry moving the alias again puts it back under its control: the alert ends.
    promote(registry, name, "3")
    assert unaudited(registry, name) == []
    assert [r for r in reconcile(registry) if r["model"] == name] == []
    # Watched, not alerting: 0 for an alias the registry set (an alert has a series before it fires).
    assert samples(registry, "shipyard_registry_unaudited_aliases", name) == {
        "shipyard_registry_unaudited_aliases": 0.0}


def test_promotion_through_the_registry_raises_no_alert(registry: str, factory: ModelFactory) -> None:
    name = unique_name("governed")
    for seed in (1, 2):
        factory.register_classifier(name, seed=seed)
    promote(registry, name, "1")
    asked = httpx.post(f"{registry}/models/{name}/requests", headers=auth("trainer"), timeout=60,
                       json={"version": "2", "alias": "production", "reason": "better on the holdout"})
    assert asked.status_code == 201, asked.text
    approved = httpx.post(f"{registry}/requests/{asked.json()['id']}/approve", headers=auth("approver"),
                          json={"reason": "checked"}, timeout=60)
    assert approved.status_code == 200, approved.text
    staged = httpx.post(f"{registry}/models/{name}/versions/1/promote", headers=auth("admin"), timeout=60,
                        json={"alias": "staging"})
    assert staged.status_code == 200, staged.text
    removed = httpx.delete(f"{registry}/models/{name}/aliases/staging", headers=auth("approver"), timeout=60)
    assert removed.status_code == 200, removed.text
    rolled = httpx.post(f"{registry}/models/{name}/rollback", headers=auth("approver"), timeout=60,
                        json={"reason": "v2 regressed"})
    assert rolled.status_code == 200, rolled.text

    assert [r for r in reconcile(registry) if r["model"] == name] == []
    assert unaudited(registry, name) == []
    # production (rolled back to v1) watched at 0; staging, removed, is no longer an alias at all.
    assert samples(registry, "shipyard_registry_unaudited_aliases", name) == {
        "shipyard_registry_unaudited_aliases": 0.0}
    assert samples(registry, "shipyard_registry_aliases_moved_outside", name) == {}


def test_the_periodic_reconcile_finds_an_alias_moved_directly(
    platform: PlatformSettings, factory: ModelFactory, tmp_path: Path
) -> None:
    name = unique_name("periodic")
    factory.register_classifier(name, seed=1)
    # A registry of its own database, reconciling every half second.
    own = platform.model_copy(update={"db_url": f"sqlite:///{tmp_path / 'registry.db'}"})
    with running_app(create_app(RegistrySettings(platform=own, alias_reconcile_interval_s=0.5))) as base:
        factory.client.set_registered_model_alias(name, "canary", "1")
        found = wait_for(lambda: unaudited(base, name), timeout=30, what="the periodic reconcile")
        assert [(f["alias"], f["version"], f["recorded_version"]) for f in found] == [("canary", "1", None)]
        wait_for(lambda: samples(base, "shipyard_registry_unaudited_aliases", name) == {
            "shipyard_registry_unaudited_aliases": 1.0}, timeout=10, what="the gauge at 1")


def test_every_platform_process_gets_the_credentials_and_tests_keep_auth_off(tmp_path: Path) -> None:
    """No server: what the settings and the stack make of the options."""
    tokens = {"t": Role.ADMIN}
    given = PlatformSettings(env="test", state_dir=tmp_path / "a", tokens=tokens, mlflow_auth=True,
                             mlflow_username="svc", mlflow_password="twelve-chars")
    env = given.as_env()
    assert given.mlflow_auth_enabled and env["SHIPYARD_MLFLOW_AUTH"] == "true"
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("svc", "twelve-chars")
    # Tests that start their own MLflow keep it off unless they ask; production and shipyard up have it on.
    plain = PlatformSettings(env="test", state_dir=tmp_path / "b", tokens=tokens)
    assert not plain.mlflow_auth_enabled and "MLFLOW_TRACKING_PASSWORD" not in plain.as_env()
    assert PlatformSettings(env="prod", state_dir=tmp_path / "c", tokens=tokens).mlflow_auth_enabled
    assert "--app-name" not in Stack(plain).mlflow_component().argv
    secret = tmp_path / "secret"
    secret.write_text("from-a-mounted-secret\n")
    mounted = plain.model_copy(update={"mlflow_password_file": secret})
    assert mounted.mlflow_credentials() == ("shipyard", "from-a-mounted-secret")
    short = given.model_copy(update={"mlflow_password": SecretStr("short")})
    with pytest.raises(StackError, match="at least 12 characters"):
        Stack(short).mlflow_component()
