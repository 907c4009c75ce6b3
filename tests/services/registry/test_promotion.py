"""Governed promotion on a real MLflow server and database: requests, decisions, gates, rollback,
archive, history, and exactly one move when two people or two processes act at once."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from services.registry.app import create_app
from services.registry.core.tables import AuditRecord, GateRecord, PromotionRequestRecord
from services.registry.settings import RegistrySettings
from shipyard_cli.stack import Stack
from shipyard_common.auth import Role, principal_name
from shipyard_common.db import Database
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.support import auth, free_port, running_app, wait_for

REPO = Path(__file__).resolve().parents[3]
TRAINER, APPROVER, ADMIN, VIEWER = auth("trainer"), auth("approver"), auth("admin"), auth("viewer")
APPROVER_2 = {"Authorization": "Bearer test-approver-2"}


@pytest.fixture
def registry_url(isolated_platform: PlatformSettings) -> Iterator[str]:
    with running_app(create_app(RegistrySettings(platform=isolated_platform))) as base:
        yield base


def _ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def _refused(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message: str = response.json()["error"]["message"]
    return message


def _trained(factory: ModelFactory, accuracies: list[float], rev: str = "rev-1") -> str:
    name = unique_name("gov")
    for seed, accuracy in enumerate(accuracies, start=1):
        factory.register_trained(
            name, seed, metrics={"val_accuracy": accuracy, "val_loss": 1 - accuracy}, dataset_rev=rev
        )
    return name


def _request(
    base: str, name: str, version: str, alias: str = "production", headers: dict = TRAINER, **extra: Any
) -> dict[str, Any]:
    body = {"version": version, "alias": alias, "reason": f"v{version} looks better", **extra}
    return _ok(httpx.post(f"{base}/models/{name}/requests", json=body, headers=headers), 201)  # type: ignore[no-any-return]


def test_a_request_approved_by_someone_else_moves_the_alias_and_is_recorded(
    registry_url: str, model_factory: ModelFactory
) -> None:
    name = _trained(model_factory, [0.90, 0.93])
    first = _request(registry_url, name, "1")
    assert (first["state"], first["requested_by"]) == (
        "pending",
        principal_name("test-trainer", Role.TRAINER),
    )
    assert model_factory.client.get_registered_model(name).aliases == {}  # a request moves nothing
    inbox = _ok(
        httpx.get(f"{registry_url}/requests", params={"model": name, "state": "pending"}, headers=VIEWER)
    )
    assert [r["id"] for r in inbox] == [first["id"]]

    moved = _ok(
        httpx.post(
            f"{registry_url}/requests/{first['id']}/approve",
            json={"reason": "numbers hold"},
            headers=APPROVER,
        )
    )
    assert (moved["version"], moved["previous_version"]) == ("1", None)
    before_second = datetime.now(UTC)
    time.sleep(0.05)
    second = _request(registry_url, name, "2", headers=APPROVER)  # approvers may ask too
    _ok(
        httpx.post(
            f"{registry_url}/requests/{second['id']}/approve", json={"reason": "ok"}, headers=APPROVER_2
        )
    )
    assert model_factory.client.get_registered_model(name).aliases == {"production": "2"}

    decided = _ok(httpx.get(f"{registry_url}/requests/{first['id']}", headers=VIEWER))
    assert (decided["state"], decided["decided_by"], decided["decision_reason"]) == (
        "approved",
        principal_name("test-approver", Role.APPROVER),
        "numbers hold",
    )
    history = _ok(httpx.get(f"{registry_url}/models/{name}/history", headers=VIEWER))
    assert [
        (m["version"], m["previous_version"], m["request_id"], m["direct"]) for m in history["moves"]
    ] == [("2", "1", second["id"], False), ("1", None, first["id"], False)]
    assert history["moves"][0]["actor"] == principal_name("test-approver-2", Role.APPROVER)
    assert history["moves"][1]["reason"] == "numbers hold"
    at = httpx.get(
        f"{registry_url}/models/{name}/history", params={"at": before_second.isoformat()}, headers=VIEWER
    )
    assert _ok(at)["production_at"] == "1"
    long_ago = httpx.get(
        f"{registry_url}/models/{name}/history", params={"at": "2001-01-01T00:00:00Z"}, headers=VIEWER
    )
    assert _ok(long_ago)["production_at"] is None
    assert (
        _ok(
            httpx.get(
                f"{registry_url}/models/{name}/history",
                params={"at": datetime.now(UTC).isoformat()},
                headers=VIEWER,
            )
        )["production_at"]
        == "2"
    )
    assert "at" in _refused(
        httpx.get(f"{registry_url}/models/{name}/history", params={"at": "yesterday"}, headers=VIEWER), 422
    )


def test_nobody_decides_their_own_request_and_a_decision_is_made_once(
    registry_url: str, model_factory: ModelFactory
) -> None:
    name = _trained(model_factory, [0.9, 0.91])
    own = _request(registry_url, name, "1", headers=APPROVER)
    url = f"{registry_url}/requests/{own['id']}"
    assert "your own" in _refused(
        httpx.post(f"{url}/approve", json={"reason": "mine"}, headers=APPROVER), 403
    )
    assert "your own" in _refused(httpx.post(f"{url}/reject", json={"reason": "mine"}, headers=APPROVER), 403)
    admins = _request(registry_url, name, "2", headers=ADMIN)
    assert "your own" in _refused(
        httpx.post(f"{registry_url}/requests/{admins['id']}/approve", json={"reason": "x"}, headers=ADMIN),
        403,
    )
    assert "may withdraw" in _refused(httpx.post(f"{url}/cancel", headers=TRAINER), 403)

    _ok(httpx.post(f"{url}/reject", json={"reason": "not yet"}, headers=APPROVER_2))
    late = _refused(httpx.post(f"{url}/approve", json={"reason": "go"}, headers=ADMIN), 409)
    assert "no longer pending" in late and principal_name("test-approver-2", Role.APPROVER) in late
    _ok(httpx.post(f"{registry_url}/requests/{admins['id']}/cancel", headers=ADMIN))
    assert model_factory.client.get_registered_model(name).aliases == {}
    assert _ok(httpx.get(f"{registry_url}/models/{name}/history", headers=VIEWER))["moves"] == []

    assert "empty" not in _refused(
        httpx.post(
            f"{registry_url}/models/{name}/requests", json={"version": "1", "reason": ""}, headers=TRAINER
        ),
        422,
    )
    assert "no version 9" in _refused(
        httpx.post(
            f"{registry_url}/models/{name}/requests", json={"version": "9", "reason": "x"}, headers=TRAINER
        ),
        404,
    )
    assert "weight" in _refused(
        httpx.post(
            f"{registry_url}/models/{name}/requests",
            json={"version": "1", "reason": "x", "weight": 0.2},
            headers=TRAINER,
        ),
        422,
    )
    _request(registry_url, name, "1")
    assert "already asks" in _refused(
        httpx.post(
            f"{registry_url}/models/{name}/requests",
            json={"version": "1", "reason": "again"},
            headers=TRAINER,
        ),
        409,
    )
    assert "no promotion request #999999" in _refused(
        httpx.post(f"{registry_url}/requests/999999/approve", json={"reason": "x"}, headers=APPROVER), 404
    )
    # An id past a BIGINT is FastAPI's 422 (it overflowed the driver: a 500); one within it a 404.
    for huge in ("99999999999999999999", str(2**63)):
        for answer in (
            httpx.get(f"{registry_url}/requests/{huge}", headers=VIEWER),
            httpx.post(f"{registry_url}/requests/{huge}/approve", json={"reason": "x"}, headers=APPROVER),
            httpx.post(f"{registry_url}/requests/{huge}/cancel", headers=TRAINER),
        ):
            assert answer.status_code == 422, answer.text
            assert "request_id" in answer.json()["error"]["message"]
    assert httpx.get(f"{registry_url}/requests/{2**63 - 1}", headers=VIEWER).status_code == 404


def test_a_failing_gate_blocks_approval_and_names_each_rule_and_its_figures(
    registry_url: str, model_factory: ModelFactory
) -> None:
    name = _trained(model_factory, [0.95, 0.93, 0.85])
    gate = {"rules": ["val_accuracy >= 0.9", "val_accuracy >= production - 0.01"], "aliases": ["production"]}
    assert "'admin' role" in _refused(
        httpx.put(f"{registry_url}/models/{name}/gate", json=gate, headers=APPROVER), 403
    )
    set_gate = _ok(httpx.put(f"{registry_url}/models/{name}/gate", json=gate, headers=ADMIN))
    assert set_gate["rules"] == gate["rules"]
    assert "not understood" in _refused(
        httpx.put(f"{registry_url}/models/{name}/gate", json={"rules": ["accuracy is high"]}, headers=ADMIN),
        400,
    )
    first = _request(registry_url, name, "1")
    assert first["gate"]["passed"] is True
    assert first["gate"]["rules"][1]["applicable"] is False  # no production yet
    _ok(httpx.post(f"{registry_url}/requests/{first['id']}/approve", json={"reason": "ok"}, headers=APPROVER))

    worse = _request(registry_url, name, "2")  # 0.93: above 0.9, but below production's 0.95 − 0.01
    assert worse["gate"]["passed"] is False
    body = httpx.post(
        f"{registry_url}/requests/{worse['id']}/approve", json={"reason": "go"}, headers=APPROVER
    )
    message = _refused(body, 409)
    assert "val_accuracy >= production - 0.01 fails" in message and "0.93" in message and "0.94" in message
    failing = [r for r in body.json()["error"]["details"]["rules"] if not r["passed"]]
    assert [r["rule"] for r in failing] == ["val_accuracy >= production - 0.01"]
    far_worse = _request(registry_url, name, "3")
    message = _refused(
        httpx.post(
            f"{registry_url}/requests/{far_worse['id']}/approve", json={"reason": "go"}, headers=APPROVER
        ),
        409,
    )
    assert "val_accuracy >= 0.9 fails" in message and "0.85" in message
    assert model_factory.client.get_registered_model(name).aliases == {"production": "1"}
    assert _ok(httpx.get(f"{registry_url}/requests/{worse['id']}", headers=VIEWER))["state"] == "pending"

    # A version trained on another revision is not held to production's figure.
    other = model_factory.register_trained(name, 4, metrics={"val_accuracy": 0.92}, dataset_rev="rev-2")
    verdict = _request(registry_url, name, other.version)["gate"]
    assert verdict["passed"] is True and "different dataset revisions" in verdict["rules"][1]["detail"]
    # The gate covers the aliases it names: a staging request is not gated.
    staging = _request(registry_url, name, "3", alias="staging")
    assert staging["gate"] is None
    _ok(
        httpx.post(
            f"{registry_url}/requests/{staging['id']}/approve", json={"reason": "try it"}, headers=APPROVER
        )
    )


def test_rollback_walks_back_through_production_history(
    registry_url: str, model_factory: ModelFactory
) -> None:
    name = _trained(model_factory, [0.9, 0.91, 0.92])
    assert "no earlier" not in _refused(
        httpx.post(f"{registry_url}/models/{name}/rollback", json={"reason": "x"}, headers=APPROVER), 409
    )
    for version in ("1", "2", "3"):
        _ok(httpx.post(f"{registry_url}/models/{name}/versions/{version}/promote", json={}, headers=ADMIN))
    rollback = f"{registry_url}/models/{name}/rollback"
    assert "'approver' role" in _refused(httpx.post(rollback, json={"reason": "x"}, headers=TRAINER), 403)
    assert "reason" in _refused(httpx.post(rollback, json={}, headers=APPROVER), 422)
    back = _ok(httpx.post(rollback, json={"reason": "v3 regressed"}, headers=APPROVER))
    assert (back["version"], back["previous_version"]) == ("2", "3")
    back = _ok(httpx.post(rollback, json={"reason": "v2 too"}, headers=APPROVER))
    assert (back["version"], back["previous_version"]) == ("1", "2")
    assert "no earlier production version" in _refused(
        httpx.post(rollback, json={"reason": "x"}, headers=APPROVER), 409
    )
    assert model_factory.client.get_registered_model(name).aliases == {"production": "1"}
    moves = _ok(httpx.get(f"{registry_url}/models/{name}/history", headers=VIEWER))["moves"]
    assert [(m["action"], m["version"]) for m in moves] == [
        ("rollback", "1"),
        ("rollback", "2"),
        ("promote", "3"),
        ("promote", "2"),
        ("promote", "1"),
    ]
    assert [m["direct"] for m in moves] == [False, False, True, True, True]


def test_an_archived_version_can_no_longer_be_aliased(registry_url: str, model_factory: ModelFactory) -> None:
    name = _trained(model_factory, [0.9, 0.91])
    _ok(httpx.post(f"{registry_url}/models/{name}/versions/1/promote", json={}, headers=ADMIN))
    archive = f"{registry_url}/models/{name}/versions/{{}}/archive"
    assert "is production" in _refused(httpx.post(archive.format(1), json={}, headers=APPROVER), 409)
    assert "'approver' role" in _refused(httpx.post(archive.format(2), json={}, headers=TRAINER), 403)
    assert _ok(httpx.post(archive.format(2), json={"reason": "leaks labels"}, headers=APPROVER))["archived"]
    assert "already archived" in _refused(httpx.post(archive.format(2), json={}, headers=APPROVER), 409)
    version = _ok(httpx.get(f"{registry_url}/models/{name}/versions/2", headers=VIEWER))
    assert version["archived"] is True
    assert "archived" in _refused(
        httpx.post(
            f"{registry_url}/models/{name}/requests", json={"version": "2", "reason": "x"}, headers=TRAINER
        ),
        409,
    )
    assert "archived" in _refused(
        httpx.post(
            f"{registry_url}/models/{name}/versions/2/promote", json={"alias": "staging"}, headers=ADMIN
        ),
        409,
    )
    _ok(httpx.post(f"{registry_url}/models/{name}/versions/2/restore", json={}, headers=APPROVER))
    _request(registry_url, name, "2")
    audit = _ok(httpx.get(f"{registry_url}/audit", params={"model": name}, headers=VIEWER))
    assert [(r["action"], r["version"]) for r in audit] == [
        ("restore", "2"),
        ("archive", "2"),
        ("promote", "1"),
    ]


def test_compare_shows_metric_deltas_params_data_and_signature(
    registry_url: str, model_factory: ModelFactory
) -> None:
    name = unique_name("cmp")
    signature = {"inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 4]}]}
    model_factory.register_trained(
        name, 1, metrics={"val_accuracy": 0.9}, params={"lr": "0.01", "epochs": "5"}, signature=signature
    )
    model_factory.register_trained(
        name,
        2,
        metrics={"val_accuracy": 0.95, "val_f1": 0.94},
        dataset_rev="rev-2",
        params={"lr": "0.001", "epochs": "5"},
        signature={"inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 5]}]},
    )
    found = _ok(httpx.get(f"{registry_url}/models/{name}/compare", params={"a": 1, "b": 2}, headers=VIEWER))
    assert found["metrics"]["val_accuracy"]["delta"] == pytest.approx(0.05)
    assert found["metrics"]["val_f1"] == {"a": None, "b": 0.94, "delta": None}
    assert found["params"] == {"lr": {"a": "0.01", "b": "0.001"}}
    assert found["same_dataset_revision"] is False
    assert found["signature_changed"] is True and "[-1, 5]" in found["signature_changes"][0]
    assert "no version 7" in _refused(
        httpx.get(f"{registry_url}/models/{name}/compare", params={"a": 1, "b": 7}, headers=VIEWER), 404
    )


def test_versions_are_read_a_page_at_a_time_in_one_search(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    """Listing a page costs one model read and one version search, however many versions it holds."""
    from services.registry.core import catalog
    from services.registry.core.store import Store

    name = unique_name("page")
    for seed in range(1, 24):
        model_factory.register_trained(name, seed, metrics={"val_accuracy": seed / 100})
    calls: list[str] = []
    store = Store.connect(model_factory.client.tracking_uri)
    # Every read is one HTTP request to MLflow: count them by route.
    store.rest.event_hooks["request"] = [lambda sent: calls.append(sent.url.path.rsplit("/mlflow/", 1)[1])]
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        calls.clear()
        page = catalog.list_versions(store=store, name=name, max_results=10, page_token=token)
        assert sorted(calls) == ["model-versions/search", "registered-models/get"], calls
        seen += [v.version for v in page.versions]
        assert all(v.metrics_source == "version" for v in page.versions)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and seen == [str(v) for v in range(23, 0, -1)]
    store.close()


@contextmanager
def _registry_process(platform: PlatformSettings, tmp_path: Path, tag: str) -> Iterator[str]:
    port = free_port()
    env = Stack(platform).child_env()
    env.update({"SHIPYARD_REGISTRY_PORT": str(port), "SHIPYARD_LOG_JSON": "false"})
    with open(tmp_path / f"registry-{tag}.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.registry"],
            env=env,
            cwd=str(REPO),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, timeout=60, what=f"registry {tag}")
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def _at_once(calls: list[Any]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _race_report(answers: list[httpx.Response], bases: list[str], request_id: int, logs: Path) -> str:
    """What a failed race looked like: the answers, what each process reads now, its log's tail."""
    now = [httpx.get(f"{base}/requests/{request_id}", headers=VIEWER).text for base in bases]
    tails = [path.read_text()[-3000:] for path in sorted(logs.glob("registry-*.log"))]
    return "\n".join([*(r.text for r in answers), "now:", *now, "logs:", *tails])


def test_two_processes_racing_give_one_move_per_decision_and_a_history_matching_mlflow(
    isolated_platform: PlatformSettings, db_url: str, model_factory: ModelFactory, tmp_path: Path
) -> None:
    platform = isolated_platform.model_copy(update={"db_url": db_url})
    name = _trained(model_factory, [0.9, 0.91, 0.92, 0.93])
    with ExitStack() as stack:
        one, two = (stack.enter_context(_registry_process(platform, tmp_path, tag)) for tag in ("a", "b"))
        for version in ("1", "2", "3", "4"):
            request_id = _request(one, name, version)["id"]
            approvals = _at_once(
                [
                    lambda rid=request_id: httpx.post(
                        f"{one}/requests/{rid}/approve",
                        json={"reason": "a"},
                        headers=APPROVER,
                        timeout=60,
                    ),
                    lambda rid=request_id: httpx.post(
                        f"{two}/requests/{rid}/approve",
                        json={"reason": "b"},
                        headers=APPROVER_2,
                        timeout=60,
                    ),
                ]
            )
            assert sorted(r.status_code for r in approvals) == [200, 409], _race_report(
                approvals, [one, two], request_id, tmp_path
            )
        # Direct moves from both processes at once: each audit row's previous version is the one before.
        for round_ in range(4):
            _at_once(
                [
                    lambda v=str(1 + round_ % 4): httpx.post(
                        f"{one}/models/{name}/versions/{v}/promote", json={}, headers=ADMIN, timeout=60
                    ),
                    lambda v=str(4 - round_ % 4): httpx.post(
                        f"{two}/models/{name}/versions/{v}/promote", json={}, headers=ADMIN, timeout=60
                    ),
                ]
            )
        moves = _ok(httpx.get(f"{two}/models/{name}/history", headers=VIEWER))["moves"]
    moves.reverse()
    assert len(moves) == 4 + 8
    assert [m["request_id"] is not None for m in moves[:4]] == [True] * 4
    for before, after in itertools.pairwise(moves):
        assert after["previous_version"] == before["version"], moves
    assert model_factory.client.get_registered_model(name).aliases == {"production": moves[-1]["version"]}


# Tokens that share no run of four characters with a role's name, a hex digest or each other's holders,
# so that any such run found in an answer or an audit row came from the token itself.
NAMED_TRAINER_TOKEN = "Zq8vK3xWm7pLr2tYs9Q"
BARE_APPROVER_TOKEN = "Hn4JuX6kV8wGy3RzTb5"
BARE_ADMIN_TOKEN = "Pk7NqW2mXy9VzLs4Jh6"


def _runs_of(token: str, length: int = 4) -> set[str]:
    return {token[i : i + length].casefold() for i in range(len(token) - length + 1)}


def test_no_audit_row_or_answer_shows_any_part_of_a_token(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    # The actor was the holder's name, and a bare role's was '<role>-<6 hex>', which reads as the
    # start of a token; the dev tokens' names were their tokens' first characters. Now: the configured
    # name, or 'role:<role>#<8 hex of the token's SHA-256>', and no part of any token anywhere.
    tokens = {
        NAMED_TRAINER_TOKEN: {"role": "trainer", "name": "alice"},
        BARE_APPROVER_TOKEN: "approver",
        BARE_ADMIN_TOKEN: "admin",
    }
    platform = PlatformSettings(**{**isolated_platform.model_dump(), "tokens": tokens})
    trainer, approver, admin = ({"Authorization": f"Bearer {t}"} for t in tokens)
    name = _trained(model_factory, [0.9, 0.95])
    answers = []
    with running_app(create_app(RegistrySettings(platform=platform))) as base:
        answers.append(_ok(httpx.put(f"{base}/models/{name}/gate", json={"rules": ["val_accuracy >= 0.5"]},
                                     headers=admin)))
        answers.append(_ok(httpx.post(f"{base}/models/{name}/versions/1/promote", json={"reason": "r"},
                                      headers=admin)))
        request = _request(base, name, "2", headers=trainer)
        answers.append(request)
        answers.append(_ok(httpx.post(f"{base}/requests/{request['id']}/approve", json={"reason": "ok"},
                                      headers=approver)))
        for path in (f"/requests/{request['id']}", f"/models/{name}/history", f"/models/{name}/gate",
                     f"/audit?model={name}", f"/requests?model={name}", f"/models/{name}"):
            answers.append(_ok(httpx.get(f"{base}{path}", headers=trainer)))
        audit = answers[-3]
    approver_name = principal_name(BARE_APPROVER_TOKEN, Role.APPROVER)
    admin_name = principal_name(BARE_ADMIN_TOKEN, Role.ADMIN)
    assert approver_name.startswith("role:approver#") and len(approver_name) == len("role:approver#") + 8
    assert [(row["actor"], row["request_id"] is None) for row in audit] == [
        (approver_name, False), (admin_name, True)
    ]
    assert request["requested_by"] == "alice"
    assert answers[4]["decided_by"] == approver_name
    with Database(platform.database_url).session() as session:
        stored = [str(tuple(row)) for table in (AuditRecord, PromotionRequestRecord, GateRecord)
                  for row in session.execute(select(*table.__table__.columns)).all()]
    text = " ".join([json.dumps(a) for a in answers] + stored).casefold()
    for token in tokens:
        shown = sorted(run for run in _runs_of(token) if run in text)
        assert not shown, f"a token's characters {shown} are in an answer or an audit row"
