"""The role matrix: every route of every service's OpenAPI × no token, a bad token and each role.

ROUTES says what each route needs: a set of roles (admin may always too), or OPEN with the
reason it is open. A route in an OpenAPI that ROUTES does not list fails the test, so a new route
must be classified here before it ships; an entry that no OpenAPI has any more fails too.

What is checked per route: without a token and with an unknown one, 401; with a role the route
does not grant, 403 naming the role; with one it grants, neither (the request then goes on to
its own checks: a body of ``{}``, ids that do not exist, MLflow that holds nothing). An OPEN route
answers without a token.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from shipyard_common.auth import Role
from tests.security.conftest import BASE_URL, every_route, fill, message_of, signed_in
from tests.support import TOKENS, auth, token_of

pytestmark = pytest.mark.security

V, T, P, A = Role.VIEWER, Role.TRAINER, Role.APPROVER, Role.ADMIN
OPS = "liveness, readiness and Prometheus metrics, for probes and scrapers that hold no token"
V2_HEALTH = ("OIP v2 health (server live/ready, model ready): open like /healthz, as KServe's "
             "probes and tritonclient's is_server_ready call them without credentials")
V2_SERVER = ("OIP v2 server metadata: the server's name, version and protocol extensions only, "
             "no model; tritonclient reads it before any model call")


class Open:
    """A route any caller may call, with the reason it is deliberately open."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


Need = frozenset[Role] | Open


def roles(*granted: Role) -> frozenset[Role]:
    return frozenset(granted)


def _ops() -> dict[tuple[str, str], Need]:
    return {("GET", "/healthz"): Open(OPS), ("GET", "/readyz"): Open(OPS), ("GET", "/metrics"): Open(OPS)}


TRAINER_ROUTES: dict[tuple[str, str], Need] = {
    **_ops(),
    ("POST", "/jobs"): roles(T),
    ("GET", "/jobs"): roles(V),
    ("GET", "/jobs/{job_id}"): roles(V),
    ("POST", "/jobs/{job_id}/cancel"): roles(T),
    ("GET", "/jobs/{job_id}/logs"): roles(V),
    ("POST", "/sweeps"): roles(T),
    ("GET", "/sweeps"): roles(V),
    ("GET", "/sweeps/{sweep_id}"): roles(V),
    ("GET", "/sweeps/{sweep_id}/plot.svg"): roles(V),
    ("POST", "/sweeps/{sweep_id}/cancel"): roles(T),
    ("POST", "/datasets/{name}"): roles(T),
    ("PUT", "/datasets/{name}/rules"): roles(T),
    ("GET", "/datasets"): roles(V),
    ("GET", "/datasets/{name}"): roles(V),
    ("GET", "/datasets/{name}/versions/{rev}"): roles(V),
    ("GET", "/datasets/{name}/diff"): roles(V),
    ("POST", "/pipelines/{name}/runs"): roles(T),
    ("GET", "/pipelines/runs/{run_id}"): roles(V),
}
REGISTRY_ROUTES: dict[tuple[str, str], Need] = {
    **_ops(),
    ("GET", "/models"): roles(V),
    ("GET", "/models/{name}"): roles(V),
    ("GET", "/models/{name}/versions"): roles(V),
    ("GET", "/models/{name}/versions/{version}"): roles(V),
    ("GET", "/models/{name}/compare"): roles(V),
    ("GET", "/models/{name}/history"): roles(V),
    ("GET", "/models/{name}/gate"): roles(V),
    ("GET", "/requests"): roles(V),
    ("GET", "/requests/{request_id}"): roles(V),
    ("GET", "/audit"): roles(V),
    ("GET", "/aliases/unaudited"): roles(V),
    ("POST", "/aliases/reconcile"): roles(A),
    ("POST", "/models/{name}/versions/{version}/promote"): roles(A),
    ("PUT", "/models/{name}/gate"): roles(A),
    ("DELETE", "/models/{name}/aliases/{alias}"): roles(P),
    ("POST", "/requests/{request_id}/approve"): roles(P),
    ("POST", "/requests/{request_id}/reject"): roles(P),
    ("POST", "/models/{name}/rollback"): roles(P),
    ("POST", "/models/{name}/versions/{version}/archive"): roles(P),
    ("POST", "/models/{name}/versions/{version}/restore"): roles(P),
    ("POST", "/models/{name}/requests"): roles(T, P),
    ("POST", "/requests/{request_id}/cancel"): roles(T, P),
}
MONITOR_ROUTES: dict[tuple[str, str], Need] = {
    **_ops(),
    ("GET", "/drift"): roles(V),
    ("GET", "/drift/{model}"): roles(V),
    ("GET", "/windows/{model}"): roles(V),
    ("GET", "/reports/{model}"): roles(V),
    ("GET", "/reports/{model}/{window_id}"): roles(V),
    ("GET", "/feedback/{model}"): roles(V),
    ("GET", "/policies"): roles(V),
    ("GET", "/policies/{model}"): roles(V),
    ("GET", "/triggers"): roles(V),
    ("GET", "/triggers/{trigger_id}"): roles(V),
    ("POST", "/feedback"): roles(T),
    ("POST", "/triggers"): roles(T),
    ("PUT", "/policies/{model}"): roles(P),
    ("DELETE", "/policies/{model}"): roles(P),
}
# Predictions and model status take any valid token (the viewer role): an application that only
# predicts holds a viewer token.
SERVING_ROUTES: dict[tuple[str, str], Need] = {
    **_ops(),
    ("POST", "/v1/models/{name}/predict"): roles(V),
    ("GET", "/v1/models"): roles(V),
    ("GET", "/v1/models/{name}"): roles(V),
    **{("POST", f"/v1/models/{target}:{verb}"): roles(V)
       for target in ("{name}", "{name}/versions/{version}", "{name}/labels/{label}")
       for verb in ("predict", "classify", "regress")},
    ("GET", "/v1/models/{name}/versions/{version}"): roles(V),
    ("GET", "/v1/models/{name}/labels/{label}"): roles(V),
    ("GET", "/v1/models/{name}/metadata"): roles(V),
    ("GET", "/v1/models/{name}/versions/{version}/metadata"): roles(V),
    ("GET", "/v1/models/{name}/labels/{label}/metadata"): roles(V),
    ("GET", "/v2"): Open(V2_SERVER),
    ("GET", "/v2/health/live"): Open(V2_HEALTH),
    ("GET", "/v2/health/ready"): Open(V2_HEALTH),
    ("GET", "/v2/models/{name}/ready"): Open(V2_HEALTH),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): Open(V2_HEALTH),
    ("GET", "/v2/models/{name}"): roles(V),
    ("GET", "/v2/models/{name}/versions/{version}"): roles(V),
    ("POST", "/v2/models/{name}/infer"): roles(V),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): roles(V),
}
ROUTES: dict[str, dict[tuple[str, str], Need]] = {
    "trainer": TRAINER_ROUTES, "registry": REGISTRY_ROUTES, "monitor": MONITOR_ROUTES,
    "serving": SERVING_ROUTES,
}
# Path parameters: values that name nothing, so that an admitted request ends in its own 4xx.
PATH_VALUES = {
    "name": "rolecheck", "model": "rolecheck", "version": "1", "label": "stable", "alias": "production",
    "job_id": "no-such-job", "rev": "latest", "run_id": "00000000-0000-4000-8000-000000000000",
    "request_id": "1", "trigger_id": "1", "window_id": "1",
}
CASES = [(service, method, path) for service, table in ROUTES.items() for (method, path) in table]


def openapi_routes(app: FastAPI) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}


@pytest.mark.parametrize("service", sorted(ROUTES))
def test_every_route_in_the_openapi_is_classified(apps: dict[str, FastAPI], service: str) -> None:
    """A route the table does not list fails here: classify it (roles, or open with a reason)."""
    found, listed = openapi_routes(apps[service]), set(ROUTES[service])
    assert not found - listed, f"{service}: routes with no entry in ROUTES: {sorted(found - listed)}"
    assert not listed - found, f"{service}: ROUTES lists routes its OpenAPI lacks: {sorted(listed - found)}"


def call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    """One request: a JSON body of ``{}`` where a body may go (valid JSON, so auth answers first)."""
    body = {"json": {}} if method in ("POST", "PUT") else {}
    return client.request(method, fill(path, PATH_VALUES), headers=headers, **body)


@pytest.mark.parametrize(("service", "method", "path"), CASES)
def test_route_refuses_what_its_role_does_not_grant(
    clients: dict[str, TestClient], service: str, method: str, path: str
) -> None:
    """401 without a token or with an unknown one; 403 for each role the route does not grant;
    through for the roles it does. An open route answers without a token."""
    client, need = clients[service], ROUTES[service][(method, path)]
    where = f"{service} {method} {path}"
    if isinstance(need, Open):
        response = call(client, method, path, {})
        assert response.status_code not in (401, 403), f"{where} is listed open: {response.text}"
        assert need.reason
        return
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"X-API-Token": "not-a-token"}):
        response = call(client, method, path, headers)
        assert response.status_code == 401, f"{where} with {headers}: {response.status_code} {response.text}"
        assert "token" in message_of(response).lower(), f"{where}: {response.text}"
    for role in sorted({Role(r) for r in TOKENS.values()}):
        response = call(client, method, path, auth(role))
        if role == Role.ADMIN or role in need or Role.VIEWER in need:
            assert response.status_code not in (401, 403), f"{where} as {role}: {response.text}"
            # 503 is allowed: an upstream this module does not run (Prefect) is down; a crash is not.
            assert response.status_code != 500, f"{where} as {role}: {response.text}"
        else:
            assert response.status_code == 403, f"{where} as {role}: {response.status_code} {response.text}"
            assert "role" in message_of(response), f"{where} as {role}: {response.text}"


def test_the_token_header_spellings_agree(clients: dict[str, TestClient]) -> None:
    """``X-API-Token`` grants what ``Authorization: Bearer`` grants, and a wrong scheme is a 401."""
    client = clients["registry"]
    as_header = client.put("/models/rolecheck/gate", json={}, headers={"X-API-Token": token_of("trainer")})
    assert as_header.status_code == 403, as_header.text
    basic = client.get("/models", headers={"Authorization": f"Basic {token_of('admin')}"})
    assert basic.status_code == 401 and "Bearer" in message_of(basic), basic.text


# Routes outside the OpenAPI: FastAPI's docs in every service, and the registry's web UI, which
# signs people in with a session cookie (a form takes the token once) instead of a token per request.
DOCS = Open("FastAPI's API docs and the OpenAPI document they read: the API's shape, no data; every "
            "route they describe checks its own token")
HIDDEN_DOCS: dict[tuple[str, str], Need] = {
    ("GET", "/openapi.json"): DOCS, ("GET", "/docs"): DOCS, ("GET", "/docs/oauth2-redirect"): DOCS,
    ("GET", "/redoc"): DOCS,
}
UI_ROUTES: dict[tuple[str, str], Need] = {
    ("GET", "/ui/login"): Open("the sign-in form"),
    ("POST", "/ui/login"): Open("signing in: it checks the token the form sends"),
    ("GET", "/ui"): Open("a redirect to /ui/models, which needs a session"),
    ("GET", "/ui/"): Open("a redirect to /ui/models, which needs a session"),
    ("GET", "/ui/{path:path}"): Open("the 'no page here' answer for an unknown address"),
    ("MOUNT", "/ui/static"): Open("the pages' CSS and JavaScript"),
    ("POST", "/ui/logout"): roles(V),
    **{("GET", f"/ui{path}"): roles(V) for path in (
        "/models", "/models/{name}", "/models/{name}/versions/{version}",
        "/models/{name}/versions/{version}/reports/{file:path}", "/models/{name}/compare", "/requests",
        "/models/{name}/history", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/logs")},
    # The rollback form's confirmation page: shown only to who may send it.
    ("GET", "/ui/models/{name}/rollback"): roles(P),
    ("POST", "/ui/models/{name}/versions/{version}/request"): roles(T, P),
    ("POST", "/ui/models/{name}/versions/{version}/promote"): roles(A),
    ("POST", "/ui/models/{name}/versions/{version}/archive"): roles(P),
    ("POST", "/ui/models/{name}/versions/{version}/restore"): roles(P),
    ("POST", "/ui/models/{name}/aliases/{alias}/remove"): roles(P),
    ("POST", "/ui/requests/{request_id}/approve"): roles(P),
    ("POST", "/ui/requests/{request_id}/reject"): roles(P),
    ("POST", "/ui/requests/{request_id}/cancel"): roles(T, P),
    ("POST", "/ui/models/{name}/rollback"): roles(P),
    ("POST", "/ui/models/{name}/gate"): roles(A),
}
HIDDEN: dict[str, dict[tuple[str, str], Need]] = {
    "trainer": HIDDEN_DOCS, "registry": {**HIDDEN_DOCS, **UI_ROUTES}, "monitor": HIDDEN_DOCS,
    "serving": HIDDEN_DOCS,
}
UI_PATH_VALUES = {**PATH_VALUES, "file": "curve.png", "path": "nowhere"}


@pytest.mark.parametrize("service", sorted(ROUTES))
def test_every_route_outside_the_openapi_is_classified(apps: dict[str, FastAPI], service: str) -> None:
    """Routes hidden from the OpenAPI (include_in_schema=False, mounts) are classified too."""
    found, listed = every_route(apps[service]), set(ROUTES[service]) | set(HIDDEN[service])
    assert not found - listed, f"{service}: routes in neither ROUTES nor HIDDEN: {sorted(found - listed)}"
    assert not listed - found, f"{service}: entries for routes it lacks: {sorted(listed - found)}"


@pytest.fixture(scope="module")
def browsers(apps: dict[str, FastAPI], clients: dict[str, TestClient]) -> dict[Role, tuple[TestClient, str]]:
    """A signed-in browser per role (``clients`` first: the registry's lifespan made its tables)."""
    return {role: signed_in(apps["registry"], role) for role in sorted({Role(r) for r in TOKENS.values()})}


def ui_call(browser: TestClient, method: str, path: str, csrf: str | None) -> Any:
    data = {"csrf": csrf} if csrf is not None else {}
    return browser.request(method, fill(path, UI_PATH_VALUES), data=data if method == "POST" else None)


def to_sign_in(response: Any) -> bool:
    return response.status_code == 303 and response.headers["location"].startswith("/ui/login")


UI_CASES = [(method, path) for (method, path), need in UI_ROUTES.items() if not isinstance(need, Open)]


@pytest.mark.parametrize(("method", "path"), UI_CASES)
def test_ui_route_needs_a_session_and_its_role(
    apps: dict[str, FastAPI], browsers: dict[Role, tuple[TestClient, str]], method: str, path: str
) -> None:
    """No session or a forged cookie: sent to sign in. A form without the session's CSRF token: 403.
    Signed in with a role the route does not grant: 403 naming the role; with one it grants: through."""
    need = UI_ROUTES[(method, path)]
    assert not isinstance(need, Open)
    stranger = TestClient(apps["registry"], base_url=BASE_URL, follow_redirects=False)
    assert to_sign_in(ui_call(stranger, method, path, "x")), f"{method} {path} without a session"
    stranger.cookies.set("shipyard_session", "A" * 43, domain="127.0.0.1", path="/ui")
    assert to_sign_in(ui_call(stranger, method, path, "x")), f"{method} {path} with a forged session"
    if method == "POST":
        browser, _ = browsers[Role.ADMIN]
        forged = ui_call(browser, method, path, "not-the-token")
        assert forged.status_code == 403 and "security token" in forged.text, f"{method} {path}"
    for role, (browser, csrf) in browsers.items():
        if path == "/ui/logout":  # signing out ends the session: a browser of its own
            browser, csrf = signed_in(apps["registry"], role)
        response = ui_call(browser, method, path, csrf)
        where = f"{method} {path} as {role}: {response.status_code}"
        if path == "/ui/logout":
            assert to_sign_in(response) and "shipyard_flash" in response.headers["set-cookie"], where
            assert to_sign_in(browser.get("/ui/requests")), f"{where}: still signed in"
        elif role == Role.ADMIN or role in need or Role.VIEWER in need:
            assert response.status_code not in (401, 403, 500) and not to_sign_in(response), where
        else:
            assert response.status_code == 403 and "role" in response.text, where


@pytest.mark.parametrize(("method", "path"), sorted(HIDDEN_DOCS))
def test_the_api_docs_are_open(clients: dict[str, TestClient], method: str, path: str) -> None:
    for client in clients.values():
        assert client.request(method, path).status_code == 200, path
