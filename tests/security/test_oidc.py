"""An identity provider's JWTs as bearer tokens (issue 14, "Principals, not token fragments"), through
the services built in process, with the provider's JWKS served over real HTTP on a free port.

A valid token acts as its holder: the name its claim gives is what the records store (the monitor's
feedback ``created_by``, the registry UI's session) and its role is what the role checks see. Each
bad token (wrong issuer or audience, expired, a bad signature, an unknown key id, ``alg: none``, an
HMAC signed with the public key) is a 401 that says what is wrong, on the platform's routes and on
serving's predict lane alike. The JWKS is fetched once, and again for an unknown key id, at most
once per ``jwks_refresh_min_s``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from services.monitor.app import create_app as create_monitor
from services.monitor.settings import MonitorSettings
from services.monitor.tables import FeedbackRecord
from services.registry.app import create_app as create_registry
from services.registry.settings import RegistrySettings
from services.serving.app import create_app as create_serving
from services.serving.settings import ServingSettings
from shipyard_common.oidc import OidcSettings
from shipyard_common.settings import PlatformSettings
from tests.security.conftest import BASE_URL, CSRF_FIELD, message_of
from tests.security.idp import AUDIENCE, ISSUER, IdentityProvider, new_key
from tests.support import auth, running_app

pytestmark = pytest.mark.security

GROUPS = {"ml-trainers": "trainer", "ml-approvers": "approver", "ml-admins": "admin"}


class Jwks:
    """The provider's JWKS over HTTP; ``fetches`` counts the GETs."""

    def __init__(self, idp: IdentityProvider) -> None:
        self.idp, self.fetches = idp, 0
        self.app = FastAPI()
        self.app.get("/protocol/openid-connect/certs")(self.certs)

    def certs(self) -> dict[str, Any]:
        self.fetches += 1
        return self.idp.jwks()


@contextmanager
def jwks_served(idp: IdentityProvider) -> Iterator[tuple[str, Jwks]]:
    jwks = Jwks(idp)
    with running_app(jwks.app) as base:
        yield f"{base}/protocol/openid-connect/certs", jwks


def oidc_platform(platform: PlatformSettings, jwks_url: str, **options: Any) -> PlatformSettings:
    """``platform`` (the security apps' database, Redis and stub MLflow, the test tokens) that also
    takes the provider's JWTs: the name from ``email``, the role from ``shipyard_role`` or groups."""
    oidc = OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks_url, name_claim="email",
                        role_claim="shipyard_role", group_roles=GROUPS, **options)
    return platform.model_copy(update={"oidc": oidc})


@pytest.fixture(scope="module")
def idp() -> IdentityProvider:
    return IdentityProvider()


@pytest.fixture(scope="module")
def oidc_clients(
    idp: IdentityProvider, security_platform: PlatformSettings, clients: dict[str, TestClient]
) -> Iterator[dict[str, Any]]:
    """The monitor, the registry and serving taking JWTs. ``clients`` (the session's apps) created
    the tables in the shared database; serving runs its lifespan here, for its predict lane."""
    with jwks_served(idp) as (url, _):
        platform = oidc_platform(security_platform, url)
        monitor = create_monitor(MonitorSettings(platform=platform, loop_interval_s=3600))
        registry = create_registry(RegistrySettings(platform=platform))
        serving = TestClient(create_serving(ServingSettings(platform=platform, reconcile_interval_s=3600)),
                             base_url=BASE_URL, raise_server_exceptions=False)
        with serving:
            yield {"monitor": TestClient(monitor, base_url=BASE_URL, raise_server_exceptions=False),
                   "monitor_app": monitor, "registry": registry, "serving": serving}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_valid_jwt_acts_as_its_holder_whose_name_the_records_keep(
    oidc_clients: dict[str, Any], idp: IdentityProvider
) -> None:
    monitor: TestClient = oidc_clients["monitor"]
    request_id = f"oidc-{time.monotonic_ns()}"
    trainer = idp.token(email="alice@example.test", groups=["ml-trainers"])
    label = [{"request_id": request_id, "label": "cat"}]
    sent = monitor.post("/feedback", json=label, headers=bearer(trainer))
    assert sent.status_code == 200, sent.text
    with oidc_clients["monitor_app"].state.monitor.database.session() as session:
        stored = session.scalars(select(FeedbackRecord).where(FeedbackRecord.request_id == request_id)).one()
    assert stored.created_by == "alice@example.test"
    # Its role is what the checks see: a viewer's JWT may read, not send.
    viewer = idp.token(email="vic@example.test", shipyard_role="viewer", groups=[])
    refused = monitor.post("/feedback", json=label, headers=bearer(viewer))
    assert refused.status_code == 403 and "your token has 'viewer'" in message_of(refused), refused.text
    assert monitor.get("/feedback/rolecheck", headers=bearer(viewer)).status_code == 200
    # The configured tokens keep working beside the provider's.
    assert monitor.get("/feedback/rolecheck", headers=auth("viewer")).status_code == 200
    # Serving's predict lane takes it too: past auth, the model is unknown.
    predicted = oidc_clients["serving"].post("/v2/models/rolecheck/infer", json={}, headers=bearer(viewer))
    assert predicted.status_code not in (401, 403, 500), predicted.text


def test_a_jwt_signs_in_to_the_registry_ui_under_its_holders_name(
    oidc_clients: dict[str, Any], idp: IdentityProvider
) -> None:
    browser = TestClient(oidc_clients["registry"], base_url=BASE_URL, follow_redirects=False)
    form = browser.get("/ui/login")
    csrf = CSRF_FIELD.search(form.text)
    assert csrf, form.text
    token = idp.token(email="bob@example.test", groups=["ml-approvers"])
    answer = browser.post("/ui/login", data={"token": token, "csrf": csrf.group(1)})
    assert answer.status_code == 303, answer.text
    page = browser.get("/ui/requests")
    assert page.status_code == 200 and "bob@example.test" in page.text


def bad_tokens(idp: IdentityProvider) -> dict[str, str]:
    """Each bad JWT by what its refusal must say."""
    now = int(time.time())
    public_jwk = json.dumps(idp.jwks()["keys"][0]).encode()
    return {
        "its issuer 'https://other-idp.example' is not": idp.token(iss="https://other-idp.example"),
        "its audience 'grafana' does not include 'shipyard'": idp.token(aud="grafana"),
        "it expired at": idp.token(exp=now - 600, iat=now - 900),
        "its signature does not verify": idp.token(key=new_key("RS256")),
        "its key id 'rotated-away' is unknown": idp.token(kid="rotated-away", alg="RS256", key=new_key()),
        "it is not signed (alg 'none')": idp.token(alg="none"),
        "its algorithm 'HS256' is not one this platform takes": idp.token(alg="HS256", key=public_jwk),
        "malformed": "eyJhbGciOiJSUzI1NiJ9.e30.not base64!",
    }


def test_each_bad_jwt_is_a_401_that_says_why(oidc_clients: dict[str, Any], idp: IdentityProvider) -> None:
    for expected, token in bad_tokens(idp).items():
        for service, method, path in [("monitor", "GET", "/feedback/rolecheck"),
                                      ("serving", "POST", "/v2/models/rolecheck/infer")]:
            body = {"json": {}} if method == "POST" else {}
            answer = oidc_clients[service].request(method, path, headers=bearer(token), **body)
            message = message_of(answer)
            assert answer.status_code == 401, (service, expected, answer.text)
            assert message.startswith("JWT refused: ") and expected in message, (service, expected, message)


def test_the_jwks_is_fetched_once_and_again_for_an_unknown_key_at_most_once_a_second(
    security_platform: PlatformSettings, clients: dict[str, TestClient]
) -> None:
    idp = IdentityProvider()
    with jwks_served(idp) as (url, jwks):
        platform = oidc_platform(security_platform, url, jwks_refresh_min_s=1)
        monitor = TestClient(create_monitor(MonitorSettings(platform=platform, loop_interval_s=3600)),
                             base_url=BASE_URL, raise_server_exceptions=False)

        def status(token: str) -> int:
            return monitor.get("/feedback/rolecheck", headers=bearer(token)).status_code

        assert jwks.fetches == 0  # nothing is fetched before a JWT comes
        assert [status(idp.token(email=f"user{n}@example.test")) for n in range(5)] == [200] * 5
        assert jwks.fetches == 1
        # The provider rotates in a new key: a token that names it right away is refused without a
        # fetch (an attacker's invented key ids cannot make the platform hammer the provider)...
        idp.add_key("k2", "ES256")
        assert status(idp.token(kid="k2", email="new@example.test")) == 401
        assert jwks.fetches == 1
        # ...and once a second has passed, the first one fetches the keys again and passes.
        time.sleep(1.1)
        assert status(idp.token(kid="k2", email="new@example.test")) == 200
        assert jwks.fetches == 2
        assert [status(idp.token(kid=f"invented-{n}", key=new_key("ES256"), alg="ES256")) for n in range(5)] \
            == [401] * 5
        assert jwks.fetches == 2


def test_serving_reads_the_keys_at_start_so_no_jwt_waits_for_them_on_its_event_loop(
    security_platform: PlatformSettings, clients: dict[str, TestClient]
) -> None:
    idp = IdentityProvider()
    with jwks_served(idp) as (url, jwks):
        platform = oidc_platform(security_platform, url)
        app = create_serving(ServingSettings(platform=platform, reconcile_interval_s=3600))
        with TestClient(app, base_url=BASE_URL, raise_server_exceptions=False) as serving:
            assert jwks.fetches == 1  # read by the lifespan, before any request
            token = idp.token(email="vic@example.test", shipyard_role="viewer", groups=[])
            answer = serving.post("/v2/models/rolecheck/infer", json={}, headers=bearer(token))
            assert answer.status_code not in (401, 403, 500), answer.text
            assert jwks.fetches == 1  # the first JWT found the keys already read
