"""The GPU scaler's controller against a fake Kubernetes API (a real HTTP server) and a real database
(SQLite and PostgreSQL): the replicas it sets over ticks as jobs queue, run and end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from kubernetes import client

from services.trainer.jobs.counts import active_jobs
from services.trainer.jobs.tables import JobRecord
from services.trainer.scaler.controller import Scaler
from services.trainer.scaler.decision import Action
from services.trainer.scaler.kube import KubernetesError, WorkerDeployment
from services.trainer.scaler.metrics import ScalerMetrics, serve_metrics
from services.trainer.scaler.settings import ScalerSettings
from shipyard_common.db import Database, utcnow
from tests.services.trainer.support import ROOT, job_spec
from tests.support import free_port, own_database_url, test_platform, wait_for

NAMESPACE = "ml"
DEPLOYMENT = "trainer-worker-gpu"
SCALE_PATH = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{DEPLOYMENT}/scale"


class FakeKubernetesApi(ThreadingHTTPServer):
    """A FAKE of the Kubernetes API server, because none runs here: one Deployment's ``GET`` (read),
    and its ``scale`` subresource's ``GET`` and merge ``PATCH``, the calls the scaler's client makes.
    ``refuse`` answers every request with that status instead (403: missing RBAC)."""

    def __init__(self, port: int, replicas: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.replicas = replicas
        self.patches: list[int] = []
        self.refuse: int | None = None
        self.url = f"http://127.0.0.1:{port}"

    def scale_body(self) -> dict[str, Any]:
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": DEPLOYMENT, "namespace": NAMESPACE},
                "spec": {"replicas": self.replicas}, "status": {"replicas": self.replicas}}

    def deployment_body(self) -> dict[str, Any]:
        labels = {"app": DEPLOYMENT}
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": DEPLOYMENT, "namespace": NAMESPACE},
                "spec": {"replicas": self.replicas, "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels},
                                      "spec": {"containers": [{"name": "worker", "image": "w"}]}}}}


class _Handler(BaseHTTPRequestHandler):
    server: FakeKubernetesApi

    def do_GET(self) -> None:
        if self._refused():
            return
        if self.path == SCALE_PATH:
            self._answer(200, self.server.scale_body())
        elif self.path == SCALE_PATH.removesuffix("/scale"):
            self._answer(200, self.server.deployment_body())
        else:
            self._answer(404, _status(404, "NotFound", f"{self.path} not found"))

    def do_PATCH(self) -> None:
        if self._refused():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != SCALE_PATH or self.headers["Content-Type"] != "application/merge-patch+json":
            self._answer(404, _status(404, "NotFound", f"no PATCH {self.path} here"))
            return
        self.server.replicas = int(body["spec"]["replicas"])
        self.server.patches.append(self.server.replicas)
        self._answer(200, self.server.scale_body())

    def _refused(self) -> bool:
        if self.server.refuse is None:
            return False
        self._answer(self.server.refuse, _status(self.server.refuse, "Forbidden", "forbidden"))
        return True

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # the base class names it format
        pass


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "reason": reason,
            "message": message}


@pytest.fixture
def kube() -> Iterator[FakeKubernetesApi]:
    server = FakeKubernetesApi(free_port())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of this test's own: the scaler counts every job in it."""
    return own_database_url(request, tmp_path, prefix="scaler")


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.create_tables()
    yield database
    database.dispose()


class Clock:
    """Monotonic seconds the test moves by hand, so a 60 s cooldown takes no time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_scaler(kube: FakeKubernetesApi, database: Database, clock: Clock, **overrides: Any) -> Scaler:
    values: dict[str, Any] = {"namespace": NAMESPACE, "deployment": DEPLOYMENT, "max_replicas": 3,
                              "cooldown_s": 60, "interval_s": 1}
    values.update(overrides)
    settings = ScalerSettings(platform=test_platform(Path("unused")), **values)
    configuration = client.Configuration()
    configuration.host = kube.url
    deployment = WorkerDeployment(client.ApiClient(configuration), namespace=NAMESPACE, name=DEPLOYMENT,
                                  timeout_s=5)
    return Scaler(settings, database=database, deployment=deployment, metrics=ScalerMetrics(settings.queue),
                  clock=clock)


def add_jobs(database: Database, count: int, *, state: str = "queued", queue: str = "gpu") -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    now = utcnow()
    with database.session() as session:
        for job_id in ids:
            session.add(JobRecord(id=job_id, state=state, spec=job_spec(rev="0" * 40, resources__queue=queue),
                                  progress={}, metrics={}, model_name="m", attempts=0, created_at=now,
                                  updated_at=now))
    return ids


def set_state(database: Database, ids: list[str], state: str) -> None:
    with database.session() as session:
        session.execute(sqlalchemy.update(JobRecord).where(JobRecord.id.in_(ids)).values(state=state))


def tick_at(scaler: Scaler, clock: Clock, at: float) -> tuple[int, Action]:
    clock.now = 1000.0 + at
    decision = scaler.tick()
    assert decision is not None
    return decision.replicas, decision.action


def test_replicas_follow_the_queue_over_ticks(kube, database):
    """Up when jobs queue (cpu jobs and ended ones not counted), capped at max, held through the
    cooldown, down to the running jobs, then to zero when idle."""
    clock = Clock()
    scaler = make_scaler(kube, database, clock)
    add_jobs(database, 4, queue="cpu")
    add_jobs(database, 2, state="succeeded")
    assert tick_at(scaler, clock, 0) == (0, Action.HOLD)

    first = add_jobs(database, 2)
    assert tick_at(scaler, clock, 1) == (2, Action.UP) and kube.replicas == 2
    set_state(database, first, "running")
    assert tick_at(scaler, clock, 2) == (2, Action.HOLD)
    more = add_jobs(database, 3)
    assert tick_at(scaler, clock, 3) == (3, Action.UP)  # 5 jobs, capped at the maximum 3

    set_state(database, more, "cancelled")  # 2 running need 2 of the 3 workers
    assert tick_at(scaler, clock, 4) == (3, Action.HOLD)
    assert tick_at(scaler, clock, 62) == (3, Action.HOLD)  # the cooldown counts from t=3
    assert tick_at(scaler, clock, 63) == (2, Action.DOWN)  # never below the 2 running
    set_state(database, first[:1], "succeeded")
    assert tick_at(scaler, clock, 64) == (2, Action.HOLD)
    assert tick_at(scaler, clock, 123) == (1, Action.DOWN)
    set_state(database, first[1:], "failed")
    assert tick_at(scaler, clock, 124) == (1, Action.HOLD)
    assert tick_at(scaler, clock, 183) == (0, Action.DOWN)
    assert tick_at(scaler, clock, 500) == (0, Action.HOLD)
    assert kube.patches == [2, 3, 2, 1, 0]


def test_never_below_running_jobs_even_above_the_maximum(kube, database):
    clock = Clock()
    kube.replicas = 3
    scaler = make_scaler(kube, database, clock, max_replicas=1)
    add_jobs(database, 3, state="running")
    assert tick_at(scaler, clock, 0) == (3, Action.HOLD)
    assert tick_at(scaler, clock, 10_000) == (3, Action.HOLD)
    add_jobs(database, 2)  # queued jobs wait: no scale up past the maximum
    assert tick_at(scaler, clock, 10_001) == (3, Action.HOLD) and kube.patches == []


def test_a_change_made_by_someone_else_restarts_the_cooldown(kube, database):
    clock = Clock()
    scaler = make_scaler(kube, database, clock)
    assert tick_at(scaler, clock, 0) == (0, Action.HOLD)
    kube.replicas = 2  # kubectl scale, say
    assert tick_at(scaler, clock, 100) == (2, Action.HOLD)
    assert tick_at(scaler, clock, 159) == (2, Action.HOLD)
    assert tick_at(scaler, clock, 160) == (0, Action.DOWN)


def test_counts_are_one_query_on_the_job_table(database):
    add_jobs(database, 2)
    add_jobs(database, 1, state="running")
    add_jobs(database, 5, queue="cpu")
    add_jobs(database, 1, state="failed")
    counts = active_jobs(database=database, queue="gpu")
    assert (counts.queued, counts.running) == (2, 1)
    assert active_jobs(database=database, queue="cpu").queued == 5


def test_failures_change_nothing_and_are_counted(kube, database, tmp_path, caplog):
    clock = Clock()
    scaler = make_scaler(kube, database, clock)
    add_jobs(database, 1)
    kube.refuse = 403
    assert scaler.tick() is None
    assert "grant get and patch on deployments/scale" in caplog.text
    with pytest.raises(KubernetesError, match=f"could not read deployment '{DEPLOYMENT}' in namespace 'ml'"):
        scaler.deployment.check()
    kube.refuse = None
    scaler.database = Database(f"sqlite:///{tmp_path / 'no-tables.db'}")  # no job table: a database error
    assert scaler.tick() is None and kube.patches == []
    assert "no such table: jobs" in caplog.text
    registry = scaler.metrics.registry
    for source in ("kubernetes", "database"):
        labels = {"queue": "gpu", "source": source}
        assert registry.get_sample_value("shipyard_scaler_errors_total", labels) == 1
    scaler.database.dispose()
    scaler.database = database
    assert tick_at(scaler, clock, 1) == (1, Action.UP)


def test_a_missing_deployment_is_named(kube, database):
    scaler = make_scaler(kube, database, Clock())
    scaler.deployment.name = "no-such-deployment"
    with pytest.raises(KubernetesError, match="'no-such-deployment' in namespace 'ml': it does not exist"):
        scaler.deployment.replicas()


def test_metrics_endpoint(kube, database):
    clock = Clock()
    scaler = make_scaler(kube, database, clock)
    add_jobs(database, 2)
    add_jobs(database, 1, state="running")
    tick_at(scaler, clock, 0)
    port = free_port()
    server = serve_metrics(scaler.metrics, host="127.0.0.1", port=port)
    assert server is not None
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.shutdown()
    for line in ('shipyard_scaler_desired_replicas{queue="gpu"} 3.0',
                 'shipyard_scaler_queued_jobs{queue="gpu"} 2.0',
                 'shipyard_scaler_running_jobs{queue="gpu"} 1.0',
                 'shipyard_scaler_current_replicas{queue="gpu"} 0.0',
                 'shipyard_scaler_decisions_total{action="up",queue="gpu"} 1.0',
                 'shipyard_scaler_decisions_total{action="down",queue="gpu"} 0.0'):
        assert line in text


def _kubeconfig(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {"token": "t"}}],
        "contexts": [{"name": "fake",
                      "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}],
    }))
    return path


def test_the_process_scales_until_sigterm(kube, tmp_path):
    """``python -m services.trainer.scaler`` outside a cluster: kubeconfig, real ticks, a clean stop."""
    db_url = f"sqlite:///{tmp_path / 'shipyard.db'}"
    database = Database(db_url)
    database.create_tables()
    add_jobs(database, 2)
    env = {**os.environ, "KUBECONFIG": str(_kubeconfig(tmp_path, kube.url)), "SHIPYARD_DB_URL": db_url,
           "SHIPYARD_SCALER_NAMESPACE": NAMESPACE, "SHIPYARD_SCALER_DEPLOYMENT": DEPLOYMENT,
           "SHIPYARD_SCALER_MAX_REPLICAS": "4", "SHIPYARD_SCALER_INTERVAL_S": "0.2",
           "SHIPYARD_SCALER_METRICS_PORT": "0", "SHIPYARD_LOG_JSON": "false"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    process = subprocess.Popen([sys.executable, "-m", "services.trainer.scaler"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: kube.patches == [2], timeout=60, what="the scaler's first scale up")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    database.dispose()
    assert process.returncode == 0, output
    assert "scale up from 0 to 2: 2 queued + 0 running" in output


def test_the_process_explains_bad_settings():
    env = {key: value for key, value in os.environ.items() if not key.startswith("SHIPYARD_SCALER_")}
    done = subprocess.run([sys.executable, "-m", "services.trainer.scaler"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid settings" in done.stderr and "deployment" in done.stderr
