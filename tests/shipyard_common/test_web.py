"""The shared HTTP layer on a real uvicorn server: error bodies, auth, health, readiness, metrics."""

from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field

from shipyard_common.auth import Principal, Role, role_checker
from shipyard_common.errors import Conflict, NotFound
from shipyard_common.settings import PlatformSettings
from shipyard_common.web import install_common
from tests.support import TOKENS, auth, running_app


class Widget(BaseModel):
    name: str = Field(min_length=1)
    size: int = Field(gt=0)


def make_app(ready_check):
    app = FastAPI()
    install_common(
        app,
        service="widgets",
        platform=PlatformSettings(env="test", tokens=TOKENS),
        readiness_checks={"store": ready_check},
    )

    @app.get("/widgets/{name}")
    def get_widget(name: str) -> dict:
        raise NotFound(f"no widget named {name!r}")

    @app.post("/widgets")
    def create_widget(widget: Widget, who: Annotated[Principal, Depends(role_checker(Role.TRAINER))]) -> dict:
        if widget.name == "taken":
            raise Conflict("a widget with that name exists")
        return {"name": widget.name, "by": who.role}

    return app


@pytest.fixture
def base_url():
    state = {"ok": True}

    def check():
        if not state["ok"]:
            raise RuntimeError("store is down")

    with running_app(make_app(check)) as url:
        yield url, state


def test_errors_have_one_shape(base_url):
    url, _ = base_url
    response = httpx.get(f"{url}/widgets/nope")
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "no widget named 'nope'"}}
    response = httpx.post(f"{url}/widgets", json={"name": "taken", "size": 1}, headers=auth("trainer"))
    assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"
    assert httpx.get(f"{url}/no/such/route").json()["error"]["code"] == "not_found"


def test_validation_error_names_every_bad_field(base_url):
    url, _ = base_url
    response = httpx.post(f"{url}/widgets", json={"name": "", "size": -1}, headers=auth("admin"))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert {d["field"] for d in error["details"]} == {"name", "size"}
    assert "size" in error["message"] and "name" in error["message"]


def test_mutating_route_needs_a_token_with_the_role(base_url):
    url, _ = base_url
    body = {"name": "w", "size": 1}
    no_token = httpx.post(f"{url}/widgets", json=body)
    assert no_token.status_code == 401 and "API token" in no_token.json()["error"]["message"]
    assert (
        httpx.post(f"{url}/widgets", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    )
    assert httpx.post(f"{url}/widgets", json=body, headers={"Authorization": "Basic xyz"}).status_code == 401
    forbidden = httpx.post(f"{url}/widgets", json=body, headers=auth("approver"))
    assert forbidden.status_code == 403 and "'trainer' role" in forbidden.json()["error"]["message"]
    assert httpx.post(f"{url}/widgets", json=body, headers=auth("trainer")).json() == {
        "name": "w",
        "by": "trainer",
    }
    assert httpx.post(f"{url}/widgets", json=body, headers=auth("admin")).status_code == 200


def test_health_readiness_and_metrics(base_url):
    url, state = base_url
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{url}/readyz").status_code == 200
    state["ok"] = False
    not_ready = httpx.get(f"{url}/readyz")
    assert not_ready.status_code == 503 and "store is down" in not_ready.json()["checks"]["store"]
    httpx.get(f"{url}/widgets/x")
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert (
        'shipyard_http_requests_total{method="GET",route="/widgets/{name}",service="widgets",status="404"}'
        in metrics.text
    )
