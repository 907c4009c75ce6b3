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
from tests.security.conftest import fill, message_of
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
