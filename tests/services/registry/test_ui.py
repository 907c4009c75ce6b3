"""The registry's web UI over real HTTP: sign-in, sessions, CSRF, pages per role, every form × role.

One registry (real uvicorn, the session's MLflow server, Redis, a SQLite platform database) and
the trainer's API beside it for the jobs pages, shared by the module's tests; each test makes its
own models. A refused form must change nothing: MLflow's aliases and tags, the audit, the
requests and the gate are compared before and after.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, update

from services.registry.app import create_app
from services.registry.core.tables import AuditRecord, GateRecord, PromotionRequestRecord, UiSessionRecord
from services.registry.settings import RegistrySettings
from services.trainer.api import service as trainer_service
from services.trainer.app import create_app as create_trainer_app
from services.trainer.jobs import store as trainer_store
from services.trainer.jobs.schemas import JobCreate, JobState
from services.trainer.settings import TrainerSettings
from shipyard_common.auth import Role
from shipyard_common.db import Database, utcnow
from shipyard_common.lineage import (
    METRIC_TAG_PREFIX,
    REPORTS_ARTIFACT_PATH,
    TAG_ARCHIVED,
    TAG_CANARY_WEIGHT,
    TAG_DATASET,
    TAG_DATASET_REV,
    TAG_SIGNATURE,
)
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, tiny_classifier, unique_name
from tests.support import TOKENS, auth, free_port, name_of, running_app, test_platform, token_of

ROLES = ("viewer", "trainer", "approver", "admin")
CALLERS = ("nobody", *ROLES)
REV = "3f2a9c1d0b7e4a55a1c2d3e4f5a6b7c8d9e0f1a2"
SIGNATURE = '{"inputs": [{"dtype": "float32", "name": "input", "shape": [null, 4]}]}'
# The smallest valid PNG (1×1, transparent): what a report image route must pass through untouched.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


def hidden(html: str, field: str) -> str:
    found = re.search(rf'name="{field}" value="([^"]*)"', html)
    assert found, f"no hidden {field!r} field on the page"
    return found.group(1)


@dataclass
class Browser:
    """A signed-in user: an httpx client with the session cookie, and the session's CSRF token."""

    client: httpx.Client
    role: str
    csrf: str = ""

    @property
    def name(self) -> str:
        return name_of(self.role)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def post(self, path: str, data: dict[str, Any] | None = None, csrf: str | None = None) -> httpx.Response:
        form = dict(data or {})
        if csrf is None:
            csrf = self.csrf
        if csrf:
            form["csrf"] = csrf
        return self.client.post(path, data=form)


def new_client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, follow_redirects=False, timeout=60)


def sign_in(base: str, role: str) -> Browser:
    client = new_client(base)
    login = client.get("/ui/login")
    assert login.status_code == 200
    answer = client.post("/ui/login", data={"token": token_of(role), "csrf": hidden(login.text, "csrf"),
                                            "next": "/ui/models"})
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/models", answer.text
    browser = Browser(client, role)
    browser.csrf = hidden(browser.get("/ui/models").text, "csrf")
    return browser


@dataclass
class Stack:
    base: str
    trainer: str
    platform: PlatformSettings
    database: Database
    factory: ModelFactory
    browsers: dict[str, Browser]

    def rest(self, method: str, path: str, role: str, **kwargs: Any) -> httpx.Response:
        response = httpx.request(method, f"{self.base}{path}", headers=auth(role), timeout=60, **kwargs)
        assert response.status_code < 300, response.text
        return response


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str, mlflow_server: str,
          model_factory: ModelFactory) -> Iterator[Stack]:
    """The registry and the trainer on one platform; serving and the monitor are not running."""
    state = tmp_path_factory.mktemp("ui-state")
    trainer_port = free_port()
    platform = test_platform(
        state, redis_url=redis_url, mlflow_tracking_uri=mlflow_server,
        events_channel=f"test-events-{uuid.uuid4().hex[:10]}", trainer_url=f"http://127.0.0.1:{trainer_port}",
        serving_url=f"http://127.0.0.1:{free_port()}", monitor_url=f"http://127.0.0.1:{free_port()}",
    )
    trainer = create_trainer_app(TrainerSettings(platform=platform, reconcile_interval_s=3600,
                                                 queue_prefix=f"ui-{uuid.uuid4().hex[:8]}-"))
    with ExitStack() as stack:
        trainer_base = stack.enter_context(running_app(trainer, port=trainer_port))
        # Every model of the session's MLflow on one page; test_models_are_paged pages with a small one.
        settings = RegistrySettings(platform=platform, page_size=1000)
        base = stack.enter_context(running_app(create_app(settings)))
        browsers = {role: sign_in(base, role) for role in ROLES}
        yield Stack(base, trainer_base, platform, Database(platform.database_url), model_factory, browsers)
        for browser in browsers.values():
            browser.client.close()


def make_model(factory: ModelFactory, versions: int = 3, prefix: str = "ui") -> str:
    """A model whose versions carry the trainer's tags: metrics, dataset revision, signature."""
    name = unique_name(prefix)
    for seed in range(1, versions + 1):
        metrics = {"val_accuracy": 0.80 + seed / 100, "val_loss": 0.50 - seed / 50}
        tags = {f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in metrics.items()}
        tags.update({TAG_DATASET: "iris", TAG_DATASET_REV: REV, TAG_SIGNATURE: SIGNATURE})
        factory.register(name, tiny_classifier(seed), metrics=metrics, tags=tags)
    return name


def snapshot(stack: Stack, name: str) -> tuple[Any, ...]:
    """Everything a registry change could touch: aliases, tags, audit rows, requests, the gate."""
    client = stack.factory.client
    model = client.get_registered_model(name)
    archived = sorted(v.version for v in client.search_model_versions(f"name = '{name}'")
                      if (v.tags or {}).get(TAG_ARCHIVED) == "true")
    with stack.database.session() as session:
        audit = session.scalars(select(AuditRecord.id).where(AuditRecord.model == name)).all()
        requests = session.execute(select(PromotionRequestRecord.id, PromotionRequestRecord.state).where(
            PromotionRequestRecord.model == name)).all()
        gate = session.get(GateRecord, name)
        rules = (gate.rules, gate.aliases) if gate else None
    return (dict(model.aliases), (model.tags or {}).get(TAG_CANARY_WEIGHT), archived, list(audit),
            sorted(requests), rules)


# The UI's forms: each one's target made ready by `prepare` (which may change state through the
# REST API first), and the roles that may use it, exactly as the REST routes allow.
Prepare = Callable[[Stack, str, int], tuple[str, dict[str, str]]]


def _request_for(stack: Stack, name: str, alias: str = "staging") -> int:
    """A pending request by the trainer: ``alias`` (else another) for a version it does not name yet."""
    held = stack.factory.client.get_registered_model(name).aliases
    with stack.database.session() as session:
        rows = session.execute(select(PromotionRequestRecord.version, PromotionRequestRecord.alias).where(
            PromotionRequestRecord.model == name, PromotionRequestRecord.state == "pending")).all()
    asked = {(row.version, row.alias) for row in rows}
    version, alias = next((v, a) for a in (alias, "staging", "shadow", "canary") for v in ("1", "2", "3")
                          if str(held.get(a)) != v and (v, a) not in asked)
    made = stack.rest("POST", f"/models/{name}/requests", "trainer",
                      json={"version": version, "alias": alias, "reason": "better on the holdout"})
    return int(made.json()["id"])


def prep_request(stack: Stack, name: str, turn: int) -> tuple[str, dict[str, str]]:
    turns = [("1", "staging"), ("2", "staging"), ("1", "shadow"), ("2", "shadow"), ("3", "canary")]
    version, alias = turns[turn]
    data = {"alias": alias, "reason": "beats v1 on recall"}
    if alias == "canary":
        data["weight"] = "0.25"
    return f"/ui/models/{name}/versions/{version}/request", data


def prep_cancel(stack: Stack, name: str, turn: int) -> tuple[str, dict[str, str]]:
    return f"/ui/requests/{_request_for(stack, name)}/cancel", {}


def prep_approve(stack: Stack, name: str, turn: int) -> tuple[str, dict[str, str]]:
    return f"/ui/requests/{_request_for(stack, name)}/approve", {"reason": "metrics and card look right"}


def prep_reject(stack: Stack, name: str, turn: int) -> tuple[str, dict[str, str]]:
    return f"/ui/requests/{_request_for(stack, name)}/reject", {"reason": "not on this data"}


def prep_rollback(stack: Stack, name: str, turn: int) -> tuple[str, dict[str, str]]:
    """Production moved (directly) so that a rollback has somewhere to go; the confirmed from/to."""
    current = stack.factory.client.get_registered_model(name).aliases.get("production")
    for version in (["1", "2"] if current is None else ["1" if str(current) != "1" else "2"]):
        stack.rest("POST", f"/models/{name}/versions/{version}/promote", "admin", json={"reason": "setup"})
    page = stack.browsers["admin"].get(f"/ui/models/{name}/rollback").text
    confirmed = {key: hidden(page, key) for key in ("expect_from", "expect_to")}
    return f"/ui/models/{name}/rollback", {"reason": "v2 answers slower", **confirmed}


def _set_archived(stack: Stack, name: str, archived: bool) -> None:
    tags = stack.factory.client.get_model_version(name, "3").tags or {}
    if (tags.get(TAG_ARCHIVED) == "true") != archived:
        verb = "archive" if archived else "restore"
        stack.rest("POST", f"/models/{name}/versions/3/{verb}", "approver", json={})


def prep_archive(stack: Stack, name: str, turn: int) -> tuple[str, dict[str, str]]:
    _set_archived(stack, name, False)
    return f"/ui/models/{name}/versions/3/archive", {"reason": "superseded"}


def prep_restore(stack: Stack, name: str, turn: int) -> tuple[str, dict[str, str]]:
    _set_archived(stack, name, True)
    return f"/ui/models/{name}/versions/3/restore", {"reason": "needed for a comparison"}


def prep_remove_alias(stack: Stack, name: str, turn: int) -> tuple[str, dict[str, str]]:
    if "shadow" not in stack.factory.client.get_registered_model(name).aliases:
        stack.rest("POST", f"/models/{name}/versions/2/promote", "admin", json={"alias": "shadow"})
    return f"/ui/models/{name}/aliases/shadow/remove", {"reason": "shadow run over"}


def prep_promote(stack: Stack, name: str, turn: int) -> tuple[str, dict[str, str]]:
    current = stack.factory.client.get_registered_model(name).aliases.get("staging")
    version = "1" if str(current) != "1" else "2"
    return f"/ui/models/{name}/versions/{version}/promote", {"alias": "staging", "reason": "hotfix"}


def prep_gate(stack: Stack, name: str, turn: int) -> tuple[str, dict[str, str]]:
    rules = f"val_accuracy >= 0.{turn + 1}\nval_loss <= production + 0.05"
    return f"/ui/models/{name}/gate", {"rules": rules, "aliases": "production"}


REQUESTERS, APPROVERS, ADMINS = {"trainer", "approver", "admin"}, {"approver", "admin"}, {"admin"}
ACTIONS: dict[str, tuple[Prepare, set[str]]] = {
    "request": (prep_request, REQUESTERS),
    "withdraw": (prep_cancel, {"trainer", "admin"}),  # the requester (the trainer here), or an admin
    "approve": (prep_approve, APPROVERS),
    "reject": (prep_reject, APPROVERS),
    "rollback": (prep_rollback, APPROVERS),
    "archive": (prep_archive, APPROVERS),
    "restore": (prep_restore, APPROVERS),
    "remove_alias": (prep_remove_alias, APPROVERS),
    "promote_directly": (prep_promote, ADMINS),
    "set_gate": (prep_gate, ADMINS),
}


def assert_page(response: httpx.Response, status: int, *phrases: str) -> str:
    """An HTML page (never JSON, never a traceback) with ``status`` that says each of ``phrases``."""
    assert response.status_code == status, (response.status_code, response.text[:2000])
    assert response.headers["content-type"].startswith("text/html")
    assert "Traceback" not in response.text and not response.text.lstrip().startswith("{")
    for phrase in phrases:
        assert phrase in response.text, f"{phrase!r} is not on the page"
    return response.text


@pytest.mark.parametrize("action", list(ACTIONS))
def test_every_form_for_every_caller(stack: Stack, action: str) -> None:
    """Refused callers (no session: sent to sign in; the wrong role: 403) change nothing; allowed ones do."""
    prepare, allowed = ACTIONS[action]
    name = make_model(stack.factory)
    anonymous = Browser(new_client(stack.base), "viewer", csrf="forged")
    for turn, caller in enumerate(CALLERS):
        path, data = prepare(stack, name, turn)
        before = snapshot(stack, name)
        browser = anonymous if caller == "nobody" else stack.browsers[caller]
        answer = browser.post(path, data)
        if caller in allowed:
            assert answer.status_code == 303, (caller, answer.text[:2000])
            assert browser.get(answer.headers["location"]).status_code == 200
            assert snapshot(stack, name) != before, f"{caller}'s {action} changed nothing"
            continue
        if caller == "nobody":
            assert answer.status_code == 303 and answer.headers["location"] == "/ui/login"
        else:
            assert_page(answer, 403, "Not allowed")
        assert snapshot(stack, name) == before, f"{caller}'s refused {action} changed something"
    anonymous.client.close()


def test_an_approver_cannot_decide_their_own_request(stack: Stack) -> None:
    name = make_model(stack.factory)
    approver = stack.browsers["approver"]
    made = approver.post(f"/ui/models/{name}/versions/2/request", {"alias": "production", "reason": "ready"})
    assert made.status_code == 303
    flash = approver.get(made.headers["location"]).text
    assert "An approver will decide it" in flash
    (request_id,) = [r[0] for r in snapshot(stack, name)[4]]
    inbox = approver.get("/ui/requests").text
    assert f"/ui/requests/{request_id}/cancel" in inbox and f"/ui/requests/{request_id}/approve" not in inbox
    assert "Another approver must decide your own request" in inbox
    before = snapshot(stack, name)
    for verb in ("approve", "reject"):
        answer = approver.post(f"/ui/requests/{request_id}/{verb}", {"reason": "mine"})
        assert_page(answer, 403, "your own")
        assert snapshot(stack, name) == before
    # The admin (another person) may approve it; the history names both.
    approved = stack.browsers["admin"].post(f"/ui/requests/{request_id}/approve", {"reason": "ok"})
    assert approved.status_code == 303
    history = stack.browsers["viewer"].get(f"/ui/models/{name}/history").text
    assert f"#{request_id}" in history and approver.name in history and name_of("admin") in history


def test_forms_without_the_sessions_csrf_token_are_refused_and_change_nothing(stack: Stack) -> None:
    name = make_model(stack.factory)
    request_id = _request_for(stack, name)
    approver, trainer = stack.browsers["approver"], stack.browsers["trainer"]
    before = snapshot(stack, name)
    for csrf in ("", "wrong-token", trainer.csrf):  # missing, made up, another session's
        answer = approver.post(f"/ui/requests/{request_id}/approve", {"reason": "looks fine"}, csrf=csrf)
        assert_page(answer, 403, "security token", "nothing was changed")
        answer = approver.post(f"/ui/models/{name}/versions/3/archive", {"reason": "x"}, csrf=csrf)
        assert_page(answer, 403, "security token")
        assert snapshot(stack, name) == before
    # Sign-out is a form too: without the token the session survives.
    assert_page(approver.post("/ui/logout", csrf=""), 403)
    assert approver.get("/ui/models").status_code == 200
    # The sign-in form's token is a double-submit cookie: a form from elsewhere is refused.
    stranger = new_client(stack.base)
    refused = stranger.post("/ui/login", data={"token": token_of("admin"), "csrf": "guess"})
    assert_page(refused, 403, "did not come from this site")
    assert "shipyard_session" not in refused.cookies
    stranger.close()


def test_sign_in_seals_the_token_and_sign_out_ends_the_session(stack: Stack) -> None:
    client = new_client(stack.base)
    assert client.get("/ui/models").headers["location"] == "/ui/login?next=%2Fui%2Fmodels"
    login = client.get("/ui/login?next=/ui/requests")
    bad = client.post("/ui/login", data={"token": "not-a-token", "csrf": hidden(login.text, "csrf")})
    assert_page(bad, 401, "That token is not valid here")
    assert "shipyard_session" not in bad.cookies

    login = client.get("/ui/login")
    good = client.post("/ui/login", data={"token": token_of("approver"), "csrf": hidden(login.text, "csrf"),
                                          "next": "/ui/requests"})
    assert good.status_code == 303 and good.headers["location"] == "/ui/requests"
    cookie = next(h for h in good.headers.get_list("set-cookie") if h.startswith("shipyard_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Path=/ui" in cookie and "Secure" not in cookie
    cookie_value = good.cookies["shipyard_session"]
    key = cookie_value + "=" * (-len(cookie_value) % 4)  # the Fernet key, without its padding in the cookie
    with stack.database.session() as session:
        row = session.get(UiSessionRecord, hashlib.sha256(key.encode()).hexdigest())
        assert row is not None and row.principal == name_of("approver") and row.role == "approver"
    assert token_of("approver") not in row.token_sealed and cookie_value not in row.token_sealed
    assert Fernet(key.encode()).decrypt(row.token_sealed.encode()).decode() == token_of("approver")
    hours = (row.expires_at - row.created_at).total_seconds() / 3600
    assert hours == pytest.approx(RegistrySettings.model_fields["session_hours"].default, abs=0.01)

    page = assert_page(client.get("/ui/requests"), 200, name_of("approver"), "approver", "Sign out")
    out = client.post("/ui/logout", data={"csrf": hidden(page, "csrf")})
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert 'shipyard_session=""' in out.headers["set-cookie"] or "Max-Age=0" in out.headers["set-cookie"]
    with stack.database.session() as session:
        assert session.get(UiSessionRecord, row.id) is None
    client.cookies.set("shipyard_session", cookie_value, path="/ui")  # a kept copy of the cookie: no use
    assert client.get("/ui/models").status_code == 303
    client.close()


def test_expired_sessions_and_withdrawn_tokens_end(stack: Stack, tmp_path: Path) -> None:
    expired, withdrawn = sign_in(stack.base, "viewer"), sign_in(stack.base, "trainer")
    cookie = expired.client.cookies["shipyard_session"]
    key = cookie + "=" * (-len(cookie) % 4)
    with stack.database.session() as session:
        session.execute(update(UiSessionRecord).where(
            UiSessionRecord.id == hashlib.sha256(key.encode()).hexdigest()).values(expires_at=utcnow()))
    assert expired.get("/ui/models").headers["location"].startswith("/ui/login")

    # The same database behind a registry whose configuration no longer has the trainer's token.
    tokens = {t: r for t, r in TOKENS.items() if r != Role.TRAINER}
    platform = stack.platform.model_copy(update={"tokens": tokens})
    settings = RegistrySettings(platform=platform, secure_cookies=True)
    with running_app(create_app(settings)) as other:
        moved = new_client(other)
        moved.cookies.set("shipyard_session", withdrawn.client.cookies["shipyard_session"], path="/ui")
        assert moved.get("/ui/models").headers["location"].startswith("/ui/login")
        assert withdrawn.get("/ui/models").status_code == 303  # the row is gone for every registry
        # Behind TLS the cookies are Secure (so httpx, on plain HTTP, must be handed this one).
        login = moved.get("/ui/login")
        assert "Secure" in login.headers["set-cookie"]
        moved.cookies.set("shipyard_login_csrf", hidden(login.text, "csrf"), path="/ui")
        form = {"token": token_of("viewer"), "csrf": hidden(login.text, "csrf")}
        signed = moved.post("/ui/login", data=form)
        assert "Secure" in next(h for h in signed.headers.get_list("set-cookie") if "shipyard_session=" in h)
        moved.close()
    expired.client.close()
    withdrawn.client.close()


def _actions_on(html: str) -> set[str]:
    return set(re.findall(r'(?:action|formaction)="(/ui/[^"]+)"', html)) - {"/ui/logout"}


def test_pages_show_each_role_exactly_the_forms_it_may_use(stack: Stack) -> None:
    name = make_model(stack.factory)
    stack.rest("POST", f"/models/{name}/versions/1/promote", "admin", json={"reason": "first"})
    request_id = _request_for(stack, name, alias="production")
    version = f"/ui/models/{name}/versions/{_pending_version(stack, request_id)}"
    expected = {
        "viewer": (set(), set(), set()),
        "trainer": ({f"{version}/request"}, set(), {f"/ui/requests/{request_id}/cancel"}),
        "approver": ({f"{version}/request", f"{version}/archive"},
                     {f"/ui/models/{name}/aliases/production/remove"},
                     {f"/ui/requests/{request_id}/approve", f"/ui/requests/{request_id}/reject"}),
        "admin": ({f"{version}/request", f"{version}/promote", f"{version}/archive"},
                  {f"/ui/models/{name}/aliases/production/remove", f"/ui/models/{name}/gate"},
                  {f"/ui/requests/{request_id}/{verb}" for verb in ("approve", "reject", "cancel")}),
    }
    for role, (on_version, on_model, on_request) in expected.items():
        browser = stack.browsers[role]
        page = assert_page(browser.get(version), 200, browser.name, role, "Sign out", "Lineage", "Signature")
        assert _actions_on(page) == on_version, role
        page = assert_page(browser.get(f"/ui/models/{name}"), 200, "Versions", "Promotion gate")
        assert _actions_on(page) - {f"/ui/models/{name}", f"/ui/models/{name}/compare"} == on_model, role
        assert (f"/ui/models/{name}/rollback" in page) == (role in APPROVERS)
        inbox = assert_page(browser.get(f"/ui/requests?model={name}"), 200, "better on the holdout")
        assert _actions_on(inbox) == on_request, role
        if role not in APPROVERS:
            assert_page(browser.get(f"/ui/models/{name}/rollback"), 403, "approver")


def _pending_version(stack: Stack, request_id: int) -> str:
    with stack.database.session() as session:
        row = session.get(PromotionRequestRecord, request_id)
        assert row is not None
        return row.version


def test_pages_read_the_registry(stack: Stack) -> None:
    """Models, a model (chart, gate), compare (deltas by direction), inbox (gate figures), history."""
    name = make_model(stack.factory)
    viewer, admin = stack.browsers["viewer"], stack.browsers["admin"]
    stack.rest("POST", f"/models/{name}/versions/1/promote", "admin", json={"reason": "first release"})
    stack.rest("POST", f"/models/{name}/versions/2/promote", "admin", json={"alias": "canary", "weight": 0.2})
    stack.rest("PUT", f"/models/{name}/gate", "admin", json={"rules": ["val_accuracy >= 0.9"]})
    request_id = _request_for(stack, name, alias="production")

    models = assert_page(viewer.get("/ui/models"), 200, name, "20%")
    assert 'class="num"' in models
    found = assert_page(viewer.get("/ui/models", params={"search": name.upper()}), 200, name, "Clear")
    assert found.count('<a class="strong"') == 1
    assert_page(viewer.get("/ui/models", params={"search": f"{name}-none"}), 200, "No model's name contains")
    assert_page(viewer.get("/ui/models", params={"search": "a'b"}), 422, "search")
    model = assert_page(viewer.get(f"/ui/models/{name}?metric=val_loss"), 200, "<svg", "val_loss by version",
                        "val_accuracy &gt;= 0.9", "gate blocks")
    assert model.count('<circle class="dot') == 3 and 'class="dot production"' in model
    compare = assert_page(viewer.get(f"/ui/models/{name}/compare?a=1&b=3"), 200, "same revision",
                          "Both runs used the same parameters", "unchanged")
    mark = r'class="num delta better">(?:<span[^>]*>[^<]*</span>)?'
    assert re.search(mark + r"\+0\.0200<", compare)  # accuracy up: better
    assert re.search(mark + "\u22120\\.0400<", compare)  # loss down: better
    inbox = assert_page(viewer.get("/ui/requests"), 200, f"request-{request_id}", "Gate blocks this request",
                        "val_accuracy 0.8")
    assert "vs 0.9" in inbox
    history = assert_page(viewer.get(f"/ui/models/{name}/history"), 200, "direct admin move", "first release")
    assert "canary" not in history.split("<ol", 1)[1]  # production only, unless asked
    assert "canary" in viewer.get(f"/ui/models/{name}/history?alias=all").text.split("<ol", 1)[1]
    at = viewer.get(f"/ui/models/{name}/history", params={"at": "2000-01-01T00:00"}).text
    assert "No version was production at 2000-01-01 00:00 UTC" in at

    # An admin's gate editor replaces the rules; a rule that does not parse is a readable 400.
    saved = admin.post(f"/ui/models/{name}/gate", {"rules": "val_accuracy >= 0.5", "aliases": "production"})
    assert saved.status_code == 303 and "now has 1 rule" in admin.get(saved.headers["location"]).text
    nonsense = {"rules": "accuracy is great", "aliases": "production"}
    assert_page(admin.post(f"/ui/models/{name}/gate", nonsense), 400, "is not understood")
    assert_page(admin.post(f"/ui/requests/{request_id}/approve", {"reason": ""}), 422, "reason")


def test_errors_are_pages_with_their_status(stack: Stack) -> None:
    viewer, approver = stack.browsers["viewer"], stack.browsers["approver"]
    assert_page(viewer.get("/ui/models/no-such-model-anywhere"), 404, "is not in the registry")
    assert_page(viewer.get("/ui/no/such/page"), 404, "There is no page at /ui/no/such/page")
    missing = approver.post("/ui/requests/999999/approve", {"reason": "x"})
    assert_page(missing, 404, "no promotion request #999999")
    empty = assert_page(viewer.get(f"/ui/requests?model=nobody-{uuid.uuid4().hex}"), 200)
    assert "No promotion requests are waiting. Trainers ask for one from a version" in empty
    assert stack.browsers["viewer"].client.get("/ui/static/ui.css").status_code == 200


def test_report_images_are_served_only_by_their_listed_names(stack: Stack, tmp_path: Path) -> None:
    name = make_model(stack.factory, versions=1)
    run_id = stack.factory.client.get_model_version(name, "1").run_id
    (tmp_path / "training_curves.png").write_bytes(PNG)
    (tmp_path / "confusion_matrix.json").write_text('{"matrix": [[1]]}')
    stack.factory.client.log_artifacts(run_id, str(tmp_path), REPORTS_ARTIFACT_PATH)
    viewer = stack.browsers["viewer"]
    base = f"/ui/models/{name}/versions/1/reports"

    page = assert_page(viewer.get(f"/ui/models/{name}/versions/1"), 200, "Training reports")
    assert f'src="{base}/training_curves.png"' in page
    image = viewer.get(f"{base}/training_curves.png")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content == PNG
    for refused in ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "model/model.onnx", "onnx/model.onnx",
                    "confusion_matrix.json", "%2Fetc%2Fpasswd", "reports%2Ftraining_curves.png"):
        answer = viewer.get(f"{base}/{refused}")
        assert answer.status_code == 404, refused
        assert answer.headers["content-type"].startswith("text/html") and answer.content != PNG
    assert new_client(stack.base).get(f"{base}/training_curves.png").status_code == 303  # signed in only


def test_jobs_pages_read_the_trainer_with_the_users_token(stack: Stack) -> None:
    """A job made and advanced by the trainer's own service functions, shown and followed in the UI."""
    spec = JobCreate.model_validate({"model_name": unique_name("ui-job"), "data": {
        "dataset": "iris", "rev": REV, "task": "classification", "target": "species"}})
    job = trainer_service.create_job(database=stack.database, spec=spec, enqueue=lambda job_id, queue: None)
    progress = {**job.progress.model_dump(), "epoch": 3, "epochs": 10, "eta_seconds": 70}
    trainer_store.update_job(database=stack.database, job_id=job.id, state=JobState.RUNNING,
                             progress=progress)
    for line in range(1, 6):
        trainer_store.append_log(database=stack.database, job_id=job.id, line=line, level="INFO",
                                 message=f"epoch {line}: val_loss 0.{9 - line}")
    viewer = stack.browsers["viewer"]
    listing = assert_page(viewer.get("/ui/jobs"), 200, job.id[:8], "running", "3/10")
    assert f'href="/ui/jobs/{job.id}"' in listing
    page = assert_page(viewer.get(f"/ui/jobs/{job.id}"), 200, "epoch 5: val_loss 0.4", "iris@")
    assert f'data-follow="/ui/jobs/{job.id}/logs"' in page and 'data-after="5"' in page
    trainer_store.append_log(database=stack.database, job_id=job.id, line=6, level="INFO", message="done")
    more = viewer.get(f"/ui/jobs/{job.id}/logs?after=5").json()
    assert more["state"] == "running" and [x["message"] for x in more["lines"]] == ["done"]
    assert more["next_after"] == 6
    assert_page(viewer.get("/ui/jobs/no-such-job"), 404, "no training job")


def test_a_trainer_that_is_down_gives_a_readable_jobs_page(stack: Stack) -> None:
    platform = stack.platform.model_copy(update={"trainer_url": f"http://127.0.0.1:{free_port()}"})
    with running_app(create_app(RegistrySettings(platform=platform))) as base:
        browser = sign_in(base, "viewer")
        assert_page(browser.get("/ui/jobs"), 503, "Jobs cannot be shown right now", "does not answer")
        assert browser.get("/ui/jobs/abc/logs").json()["error"].startswith("The trainer at")
        browser.client.close()


def test_models_are_paged(stack: Stack) -> None:
    make_model(stack.factory, versions=3, prefix="aa-ui-page")
    settings = RegistrySettings(platform=stack.platform, page_size=1)
    with running_app(create_app(settings)) as base:
        browser = sign_in(base, "viewer")
        first = assert_page(browser.get("/ui/models"), 200, "Next page")
        following = re.search(r'href="(/ui/models\?page_token=[^"]+)"', first)
        assert following, "no link to the next page"
        second = assert_page(browser.get(following.group(1).replace("&amp;", "&")), 200, "First page")
        assert re.findall(r'<a class="strong" href="([^"]+)"', first) != re.findall(
            r'<a class="strong" href="([^"]+)"', second)
        browser.client.close()


def test_sessions_and_forms_on_sqlite_and_postgresql(stack: Stack, db_url: str) -> None:
    """The session table and a form's change work the same on both platform databases."""
    name = make_model(stack.factory, versions=2)
    platform = stack.platform.model_copy(update={"db_url": db_url})
    with running_app(create_app(RegistrySettings(platform=platform))) as base:
        approver = sign_in(base, "approver")
        moved = approver.post(f"/ui/models/{name}/versions/2/archive", {"reason": "superseded"})
        assert moved.status_code == 303
        assert "v2 is archived" in approver.get(moved.headers["location"]).text
        database = Database(db_url)
        with database.session() as session:
            actions = session.scalars(select(AuditRecord.action).where(AuditRecord.model == name)).all()
            sessions = session.scalars(select(UiSessionRecord.id)).all()
        database.dispose()
        assert actions == ["archive"] and len(sessions) >= 1
        out = approver.post("/ui/logout")
        assert out.status_code == 303 and approver.get("/ui/models").status_code == 303
        approver.client.close()
