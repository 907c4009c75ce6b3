"""Zero-downtime model changes, canary and shadow: the registry's API driving a running serving app.

Real HTTP against a real MLflow server, Redis events and the prediction log's database. Nothing
here waits a fixed time: every check polls for the state it needs, and every bound is on counts.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from services.registry.app import create_app as create_registry_app
from services.registry.settings import RegistrySettings
from services.serving.core.leases import Lease, retire_runtime
from services.serving.core.routing import ShadowMirror
from shipyard_common.db import Database
from shipyard_common.records import PredictionRecord
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, RegisteredVersion, run_directly, unique_name
from tests.services.serving.support import metric, model_status, serving
from tests.support import auth, running_app, wait_for

ROW = [0.5, -1.0, 2.0, 0.25]
VIEWER = auth("viewer")
APPROVER = auth("approver")
ADMIN = auth("admin")  # moving an alias directly, without a request, is the admin's
VERSION_HEADER = "x-model-version"


@dataclass
class Stack:
    registry: str
    serving: str
    platform: PlatformSettings

    def promote(self, name: str, version: str, alias: str = "production", **extra: Any) -> dict[str, Any]:
        response = httpx.post(
            f"{self.registry}/models/{name}/versions/{version}/promote",
            json={"alias": alias, **extra}, headers=ADMIN, timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def remove_alias(self, name: str, alias: str) -> httpx.Response:
        return httpx.delete(f"{self.registry}/models/{name}/aliases/{alias}", headers=APPROVER, timeout=60)

    def status(self, name: str) -> dict[str, Any]:
        return model_status(self.serving, name)


@contextmanager
def stack(platform: PlatformSettings, **settings: Any) -> Iterator[Stack]:
    registry_app = create_registry_app(RegistrySettings(platform=platform))
    with running_app(registry_app) as registry, serving(platform, **settings) as base:
        yield Stack(registry=registry, serving=base, platform=platform)


def versions_of(model_factory: ModelFactory, prefix: str, seeds: tuple[int, ...]) -> list[RegisteredVersion]:
    name = unique_name(prefix)
    found = [model_factory.register_classifier(name, seed=seed) for seed in seeds]
    answers = [run_directly(v.model_bytes, [ROW]) for v in found]
    # Distinguishable, so that the body proves which version answered, beside the header.
    for i, first in enumerate(answers):
        for second in answers[i + 1:]:
            assert not np.allclose(first, second, atol=1e-3)
    return found


def post_predict(client: httpx.Client, base: str, name: str, **kwargs: Any) -> httpx.Response:
    return client.post(f"{base}/v1/models/{name}/predict", json={"inputs": [ROW]}, **kwargs)


def answered_by(response: httpx.Response, outputs: dict[str, np.ndarray]) -> str:
    """The version that answered: the header, checked against the body and the numbers."""
    assert response.status_code == 200, response.text
    version = response.headers[VERSION_HEADER]
    body = response.json()
    assert body["model_version"] == version, (body, version)
    np.testing.assert_allclose(body["outputs"], outputs[version], rtol=1e-5, atol=1e-6)
    return version


@dataclass(frozen=True)
class Answer:
    started: float
    ended: float
    status: int
    version: str | None
    error: str | None


class Traffic:
    """Client threads sending predictions until stopped, recording when each ran and who answered."""

    def __init__(self, base: str, name: str, outputs: dict[str, np.ndarray], threads: int) -> None:
        self.base, self.name, self.outputs = base, name, outputs
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
            assert not thread.is_alive(), "a client thread is stuck"

    def _run(self) -> None:
        with httpx.Client(headers=VIEWER, timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                version: str | None = None
                error: str | None = None
                try:
                    response = post_predict(client, self.base, self.name)
                    status = response.status_code
                    version = answered_by(response, self.outputs)
                except Exception as exc:  # recorded: the test fails on any of them
                    status, error = -1, f"{type(exc).__name__}: {exc}"
                ended = time.monotonic()
                with self._lock:
                    self.answers.append(Answer(started, ended, status, version, error))

    def count(self, version: str | None = None, after: float = 0.0) -> int:
        with self._lock:
            return sum(
                1 for a in self.answers if a.started >= after and (version is None or a.version == version)
            )


def test_twenty_promotions_and_rollbacks_under_load_lose_no_request(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    versions = versions_of(model_factory, "rollout", seeds=(11, 12, 13))
    name = versions[0].name
    outputs = {v.version: run_directly(v.model_bytes, [ROW]) for v in versions}
    model_factory.set_production(name, "1")
    # Alternate promotions and rollbacks between three versions: 2, 3, 1, 2, 3, 1, ...
    plan = [str((i + 1) % 3 + 1) for i in range(20)]
    assert all(a != b for a, b in zip(["1", *plan], plan, strict=False))

    # (version, sent: the promote request left, acknowledged: serving's status names it)
    moves: list[tuple[str, float, float]] = [("1", float("-inf"), float("-inf"))]
    with stack(isolated_platform) as s, Traffic(s.serving, name, outputs, threads=8) as traffic:
        wait_for(lambda: traffic.count("1") >= 20, timeout=60, what="traffic on version 1")
        for version in plan:
            sent = time.monotonic()
            s.promote(name, version, reason="rollout test")
            wait_for(lambda v=version: s.status(name)["version"] == v, timeout=60, interval=0.02,
                     what=f"version {version} served")
            acknowledged = time.monotonic()
            moves.append((version, sent, acknowledged))
            # Let the new version answer a few requests that started after it was in place.
            wait_for(lambda v=version, t=acknowledged: traffic.count(v, after=t) >= 10,
                     timeout=60, interval=0.02, what=f"traffic on version {version}")
        status = s.status(name)
    answers = list(traffic.answers)

    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    assert len(answers) >= 20 * 10
    assert status["status"] == "serving" and status["version"] == plan[-1]

    # Version k may have been production from the moment its promotion was sent until the next
    # promotion was acknowledged; an answer is right if its version held production at some moment
    # of the request, i.e. that window overlaps [started, ended].
    windows = [
        (version, sent, moves[k + 1][2] if k + 1 < len(moves) else float("inf"))
        for k, (version, sent, _) in enumerate(moves)
    ]
    wrong = [
        a for a in answers
        if not any(v == a.version and start <= a.ended and a.started <= end for v, start, end in windows)
    ]
    assert not wrong, f"{len(wrong)} answers came from a version that was not production then: {wrong[:3]}"
    answered = {a.version for a in answers}
    assert answered == {"1", "2", "3"}
    slowest = max(ack - sent for _, sent, ack in moves[1:])
    print(f"{len(answers)} requests, 0 failed, {len(plan)} moves, slowest acknowledged in {slowest:.2f}s")


def test_a_corrupt_version_keeps_the_old_one_serving_and_shows_in_status_and_metric(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    (good,) = versions_of(model_factory, "rollout-corrupt", seeds=(21,))
    name = good.name
    corrupt = model_factory.register_corrupt(name)
    assert corrupt.version == "2"
    outputs = {"1": run_directly(good.model_bytes, [ROW])}
    model_factory.set_production(name, "1")
    with stack(isolated_platform) as s, Traffic(s.serving, name, outputs, threads=4) as traffic:
        wait_for(lambda: traffic.count("1") >= 10, timeout=60, what="traffic on version 1")
        s.promote(name, "2")
        status = wait_for(lambda: (st := s.status(name))["failed_version"] == "2" and st, timeout=60,
                          what="the corrupt version's failure in the status")
        assert status["status"] == "degraded" and status["version"] == "1"
        assert status["target_version"] == "2" and "ONNX Runtime cannot open model.onnx" in status["error"]
        assert metric(s.serving, "shipyard_model_load_failures_total", {"model": name}) == 1.0

        # As a canary, too: production keeps answering every request, the failure is in the status.
        s.promote(name, "1", reason="rollback")
        wait_for(lambda: s.status(name)["status"] == "serving", timeout=60, what="rolled back")
        s.promote(name, "2", alias="canary", weight=1.0)
        canary = wait_for(lambda: (c := s.status(name)["canary"]) and c["failed_version"] == "2" and c,
                          timeout=60, what="the corrupt canary's failure in the status")
        assert canary["status"] == "failed" and canary["version"] is None
        assert "ONNX Runtime cannot open model.onnx" in canary["error"]
        assert metric(s.serving, "shipyard_model_load_failures_total", {"model": name}) == 2.0
        after = time.monotonic()
        wait_for(lambda: traffic.count("1", after=after) >= 20, timeout=60, what="traffic after the canary")
    answers = list(traffic.answers)
    assert answers and all(a.status == 200 and a.version == "1" for a in answers), [
        a for a in answers if a.status != 200 or a.version != "1"][:3]


def test_canary_answers_its_weight_of_requests_on_every_protocol(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    production, canary = versions_of(model_factory, "rollout-canary", seeds=(31, 32))
    name = production.name
    outputs = {v.version: run_directly(v.model_bytes, [ROW]) for v in (production, canary)}
    model_factory.set_production(name, "1")
    with stack(isolated_platform) as s:
        moved = s.promote(name, "2", alias="canary", weight=0.2)
        assert moved["weight"] == 0.2 and moved["alias"] == "canary"
        status = wait_for(lambda: (st := s.status(name))["canary"] and st["canary"]["status"] == "serving"
                          and st, timeout=60, what="the canary served")
        assert status["canary"]["version"] == "2" and status["canary"]["weight"] == 0.2
        assert status["canary_weight"] == 0.2 and status["version"] == "1"
        assert {e["version"] for e in status["model_version_status"]} == {"1", "2"}

        counts = {"1": 0, "2": 0}
        lock = threading.Lock()

        def client_thread(requests: int) -> None:
            with httpx.Client(headers=VIEWER, timeout=120) as client:
                for _ in range(requests):
                    version = answered_by(post_predict(client, s.serving, name), outputs)
                    with lock:
                        counts[version] += 1

        threads = [threading.Thread(target=client_thread, args=(500,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert sum(counts.values()) == 2000
        share = counts["2"] / 2000
        assert abs(share - 0.2) <= 0.05, counts
        print(f"canary weight 0.2: {counts['2']} of 2000 requests answered by the canary ({share:.3f})")

        # The other protocols name the answering version in the header too, and in the body where
        # they have a field for it; explicit versions and labels reach the canary.
        rows = np.asarray([ROW], dtype=np.float32)
        v2_body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}
        seen = set()
        for _ in range(40):
            response = httpx.post(f"{s.serving}/v2/models/{name}/infer", json=v2_body, headers=VIEWER)
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == response.headers[VERSION_HEADER]
            seen.add(response.headers[VERSION_HEADER])
            tf = httpx.post(f"{s.serving}/v1/models/{name}:predict", json={"instances": [ROW]},
                            headers=VIEWER)
            assert tf.status_code == 200, tf.text
            np.testing.assert_allclose(tf.json()["predictions"], outputs[tf.headers[VERSION_HEADER]],
                                       rtol=1e-5)
            seen.add(tf.headers[VERSION_HEADER])
        assert seen <= {"1", "2"}
        for version in ("1", "2"):
            explicit = httpx.post(f"{s.serving}/v2/models/{name}/versions/{version}/infer", json=v2_body,
                                  headers=VIEWER)
            assert explicit.status_code == 200, explicit.text
            assert explicit.headers[VERSION_HEADER] == version == explicit.json()["model_version"]
            np.testing.assert_allclose(explicit.json()["outputs"][0]["data"], outputs[version].ravel(),
                                       rtol=1e-5)
            tf_version = httpx.post(f"{s.serving}/v1/models/{name}/versions/{version}:predict",
                                    json={"instances": rows.tolist()}, headers=VIEWER)
            assert tf_version.headers[VERSION_HEADER] == version
            assert httpx.get(f"{s.serving}/v2/models/{name}/versions/{version}/ready").status_code == 200
        for label, version in (("production", "1"), ("canary", "2")):
            labelled = httpx.post(f"{s.serving}/v1/models/{name}/labels/{label}:predict",
                                  json={"instances": [ROW]}, headers=VIEWER)
            assert labelled.status_code == 200 and labelled.headers[VERSION_HEADER] == version
            label_status = httpx.get(f"{s.serving}/v1/models/{name}/labels/{label}", headers=VIEWER).json()
            assert [e["version"] for e in label_status["model_version_status"]] == [version]

        # Weight 1: every request goes to the canary, with no draw left to chance.
        s.promote(name, "2", alias="canary", weight=1.0)
        wait_for(lambda: s.status(name)["canary_weight"] == 1.0, timeout=60, what="the new weight")
        with httpx.Client(headers=VIEWER, timeout=120) as client:
            assert {answered_by(post_predict(client, s.serving, name), outputs) for _ in range(30)} == {"2"}

        # Removing the alias unloads the canary: production answers everything again.
        removed = s.remove_alias(name, "canary")
        assert removed.status_code == 200 and removed.json()["previous_version"] == "2", removed.text
        wait_for(lambda: s.status(name)["canary"] is None, timeout=60, what="the canary unloaded")
        with httpx.Client(headers=VIEWER, timeout=120) as client:
            assert {answered_by(post_predict(client, s.serving, name), outputs) for _ in range(30)} == {"1"}
        gone = httpx.post(f"{s.serving}/v1/models/{name}/labels/canary:predict", json={"instances": [ROW]},
                          headers=VIEWER)
        assert gone.status_code == 404 and "label 'canary'" in gone.json()["error"]
        assert httpx.post(f"{s.serving}/v2/models/{name}/versions/2/infer", json=v2_body,
                          headers=VIEWER).status_code == 404


def test_shadow_sees_every_request_is_logged_as_shadow_and_never_answers(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    production, shadow = versions_of(model_factory, "rollout-shadow", seeds=(41, 42))
    name = production.name
    outputs = {v.version: run_directly(v.model_bytes, [ROW]) for v in (production, shadow)}
    model_factory.set_production(name, "1")
    request_ids = [uuid.uuid4().hex for _ in range(40)]
    with stack(isolated_platform) as s:
        s.promote(name, "2", alias="shadow")
        status = wait_for(lambda: (st := s.status(name))["shadow"] and st["shadow"]["status"] == "serving"
                          and st, timeout=60, what="the shadow served")
        assert status["shadow"]["version"] == "2" and status["version"] == "1"
        with httpx.Client(headers=VIEWER, timeout=120) as client:
            for request_id in request_ids:
                response = post_predict(client, s.serving, name, headers={"X-Request-ID": request_id})
                assert answered_by(response, outputs) == "1"
                assert "2" not in response.headers.get_list(VERSION_HEADER)
        v2 = httpx.post(f"{s.serving}/v2/models/{name}/infer", headers=VIEWER, json={
            "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}]})
        assert v2.json()["model_version"] == "1" == v2.headers[VERSION_HEADER]

        # Sequential requests never fill the mirror's pool, so every one was copied.
        wait_for(lambda: metric(s.serving, "shipyard_shadow_requests_total", {"model": name, "version": "2"})
                 == len(request_ids) + 1, timeout=60, what="every copy run on the shadow")
        assert not metric(s.serving, "shipyard_shadow_skipped_total", {"model": name})
        database = Database(s.platform.database_url)

        def rows() -> list[PredictionRecord]:
            with database.session() as session:
                return list(session.scalars(select(PredictionRecord).where(PredictionRecord.model == name)))

        try:
            expected_rows = 2 * (len(request_ids) + 1)
            logged = wait_for(lambda: (found := rows()) and len(found) == expected_rows and found,
                              timeout=60, what="production and shadow rows written")
        finally:
            database.dispose()
    by_role: dict[str, dict[str, PredictionRecord]] = {"production": {}, "shadow": {}}
    for row in logged:
        by_role[row.role][row.request_id] = row
    assert set(request_ids) <= set(by_role["shadow"]) and set(request_ids) <= set(by_role["production"])
    assert set(by_role["shadow"]) == set(by_role["production"])
    for request_id in request_ids:
        primary, copy = by_role["production"][request_id], by_role["shadow"][request_id]
        assert primary.version == "1" and copy.version == "2"
        assert copy.inputs == primary.inputs == [ROW]
        np.testing.assert_allclose(copy.outputs, outputs["2"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(primary.outputs, outputs["1"], rtol=1e-5, atol=1e-6)


def test_the_periodic_reconcile_catches_canary_and_shadow_changes_whose_events_were_lost(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    production, _other = versions_of(model_factory, "rollout-reconcile", seeds=(51, 52))
    name = production.name
    client = model_factory.client
    model_factory.set_production(name, "1")
    with serving(isolated_platform, reconcile_interval_s=0.5) as base:
        # Straight to MLflow: no event, only the reconcile can notice.
        client.set_registered_model_tag(name, "shipyard.canary_weight", "0.4")
        client.set_registered_model_alias(name, "canary", "2")
        client.set_registered_model_alias(name, "shadow", "2")
        status = wait_for(
            lambda: (st := model_status(base, name))["canary"] and st["shadow"]
            and st["canary"]["status"] == st["shadow"]["status"] == "serving" and st,
            timeout=60, what="canary and shadow loaded by the reconcile",
        )
        assert status["canary_weight"] == 0.4 and status["canary"]["version"] == "2"
        client.delete_registered_model_alias(name, "canary")
        client.delete_registered_model_alias(name, "shadow")
        wait_for(lambda: (st := model_status(base, name))["canary"] is None and st["shadow"] is None,
                 timeout=60, what="canary and shadow unloaded by the reconcile")
        assert model_status(base, name)["version"] == "1"


def test_registry_canary_weight_and_alias_removal_are_checked_audited_and_announced(
    isolated_platform: PlatformSettings, model_factory: ModelFactory
) -> None:
    name = unique_name("reg-canary")
    for seed in (1, 2):
        model_factory.register_classifier(name, seed=seed)
    with running_app(create_registry_app(RegistrySettings(platform=isolated_platform))) as base:
        promote = f"{base}/models/{name}/versions/{{}}/promote"
        for body in ({"alias": "production", "weight": 0.5}, {"alias": "canary", "weight": 0},
                     {"alias": "canary", "weight": 1.5}, {"alias": "shadow", "weight": 0.1}):
            refused = httpx.post(promote.format(2), json=body, headers=ADMIN)
            assert refused.status_code == 422, (body, refused.text)
        assert httpx.post(promote.format(1), json={}, headers=APPROVER).status_code == 403
        httpx.post(promote.format(1), json={}, headers=ADMIN).raise_for_status()
        first = httpx.post(promote.format(2), json={"alias": "canary"}, headers=ADMIN).json()
        assert first["weight"] == 0.1  # the default
        second = httpx.post(promote.format(2), json={"alias": "canary", "weight": 0.25}, headers=ADMIN)
        assert second.json()["weight"] == 0.25
        model = model_factory.client.get_registered_model(name)
        assert model.aliases["canary"] == "2" and model.tags["shipyard.canary_weight"] == "0.25"

        assert httpx.delete(f"{base}/models/{name}/aliases/canary", headers=VIEWER).status_code == 403
        assert httpx.delete(f"{base}/models/{name}/aliases/prod", headers=APPROVER).status_code == 422
        removed = httpx.delete(f"{base}/models/{name}/aliases/canary", params={"reason": "done"},
                               headers=APPROVER)
        assert removed.json() == {"model": name, "alias": "canary", "previous_version": "2"}
        assert httpx.delete(f"{base}/models/{name}/aliases/canary", headers=APPROVER).status_code == 404
        assert "canary" not in model_factory.client.get_registered_model(name).aliases

        audit = httpx.get(f"{base}/audit", params={"model": name}, headers=VIEWER).json()
        assert [(r["action"], r["alias"], r["version"], r["weight"]) for r in audit] == [
            ("remove", "canary", "2", None), ("promote", "canary", "2", 0.25),
            ("promote", "canary", "2", 0.1), ("promote", "production", "1", None),
        ]
        assert audit[0]["reason"] == "done"
    database = Database(isolated_platform.database_url)
    try:
        from shipyard_common.records import EventRecord

        with database.session() as session:
            payloads = [r.payload for r in session.scalars(select(EventRecord)) if r.payload["model"] == name]
    finally:
        database.dispose()
    assert [(p["type"], p["alias"], p.get("weight")) for p in payloads] == [
        ("model.alias_moved", "production", None), ("model.alias_moved", "canary", 0.1),
        ("model.alias_moved", "canary", 0.25), ("model.alias_removed", "canary", None),
    ]


# -- the parts, without servers ----------------------------------------------------------------


class _Runtime:
    format = "fake"

    def __init__(self) -> None:
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


def test_a_retired_version_is_closed_only_after_its_requests_are_done() -> None:
    runtime, lease = _Runtime(), Lease()
    assert lease.acquire()
    retire_runtime(runtime, lease, grace_s=0)  # type: ignore[arg-type]
    # The retirement has begun when new requests are turned away; the one holding it still runs.
    wait_for(lambda: not lease.acquire() and lease.holders == 1, timeout=30, what="the lease retired")
    assert not runtime.closed.is_set()
    lease.release()
    assert runtime.closed.wait(30)


def test_the_shadow_pool_skips_and_counts_copies_it_has_no_room_for() -> None:
    mirror = ShadowMirror(workers=1, capacity=1)
    release = threading.Event()
    started = threading.Event()
    shadow: Any = type("Shadow", (), {"name": "m", "version": "2"})()

    def slow(_: object) -> None:
        started.set()
        release.wait(30)

    assert mirror.submit(shadow, slow)
    assert started.wait(30)
    assert not mirror.submit(shadow, slow)  # full: skipped at once, never waited for
    assert mirror.skipped.labels("m")._value.get() == 1
    release.set()
    mirror.close()
    assert mirror.mirrored.labels("m", "2")._value.get() == 1
    assert not mirror.submit(shadow, slow)  # closed


@pytest.mark.parametrize("weight", ["0", "1.5", "abc", None])
def test_an_unusable_canary_weight_tag_falls_back_to_the_default(weight: str | None) -> None:
    from services.serving.core.follower import weight_from_tags

    tags = {} if weight is None else {"shipyard.canary_weight": weight}
    assert weight_from_tags(tags) == 0.1
    assert weight_from_tags({"shipyard.canary_weight": "0.3"}) == 0.3


def test_a_request_that_picked_a_retired_version_is_answered_by_its_successor() -> None:
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from services.serving.core.loaded import LoadedModels, ServedModel
    from services.serving.core.metrics import ServingMetrics
    from services.serving.core.routing import Router, leased
    from services.serving.runtimes.base import Signature
    from shipyard_common.errors import Unavailable

    models = LoadedModels(ServingMetrics(CollectorRegistry()))
    dataplane = SimpleNamespace(models=models, router=Router())

    def served(version: str) -> ServedModel:
        return ServedModel(name="m", version=version, runtime=_Runtime(),  # type: ignore[arg-type]
                           signature=Signature(inputs=(), outputs=()), loaded_at=datetime.now(UTC))

    @leased
    def answer(*, dataplane: object, served: ServedModel) -> tuple[str, int]:
        return served.version, served.lease.holders

    old, new = served("1"), served("2")
    models.install(old)
    assert answer(dataplane=dataplane, served=old) == ("1", 1)  # held while it runs
    assert old.lease.holders == 0
    models.install(new)
    assert old.lease.retire(timeout=0)
    assert answer(dataplane=dataplane, served=old) == ("2", 1)
    models.remove("m")
    assert new.lease.retire(timeout=30)
    with pytest.raises(Unavailable):
        answer(dataplane=dataplane, served=new)
