"""Reliability fixtures: an MLflow server of a module's own, which its tests kill and start again.

The session's shared MLflow (``tests/conftest.py``) must stay up for every other test, so a fault is
played on a server of the module's own: same port and same stores across restarts, so that what it
held before the fault is there after it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.trainer.settings import TrainerSettings
from shipyard_cli.processes import ProcessRecord
from shipyard_cli.stack import Stack
from tests.support import free_port, stop_process_group, test_platform, wait_for

ROOT = Path(__file__).resolve().parents[2]
# The trainer's settings a worker must share with the API that sends it jobs, or that a test shortens.
WORKER_SETTINGS = (
    "queue_prefix", "mlflow_wait_retries", "mlflow_wait_backoff_s", "mlflow_wait_max_backoff_s",
)


def refuses(uri: str) -> bool:
    """Whether nothing listens at ``uri``'s port any more (connections are refused)."""
    port = int(uri.rsplit(":", 1)[1])
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


class KillableMlflow:
    """A real MLflow tracking and registry server (SQLite store, local artifacts) on a fixed port."""

    def __init__(self, state: Path) -> None:
        self.uri = f"http://127.0.0.1:{free_port()}"
        self.stack = Stack(test_platform(state, mlflow_tracking_uri=self.uri))
        self.record: ProcessRecord | None = None

    @property
    def up(self) -> bool:
        return self.record is not None and self.record.alive()

    def start(self) -> None:
        """Start it (again), on the same port and stores; return once it answers its health route."""
        if self.up:
            return
        self.record = self.stack.start_component(self.stack.mlflow_component())
        self.stack.wait_ready(self.record, timeout=120)

    def freeze(self) -> None:
        """SIGSTOP the server: connections are still accepted (by the kernel) but never answered."""
        assert self.record is not None
        os.killpg(self.record.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.record is not None:
            os.killpg(self.record.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server's whole process group, as a crash would; return once its port refuses."""
        if self.record is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.record.pid, signal.SIGKILL)
            os.killpg(self.record.pid, signal.SIGCONT)  # a frozen one too
        stop_process_group(self.record.pid, timeout=5)  # reaps it
        self.record = None
        wait_for(lambda: refuses(self.uri), timeout=15, what=f"MLflow at {self.uri} to stop listening")


@pytest.fixture(scope="module")
def killable_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KillableMlflow]:
    """This module's own MLflow server, up; its tests kill it and start it again."""
    server = KillableMlflow(tmp_path_factory.mktemp("killable-mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Worker:
    """``python -m services.trainer.worker`` on the cpu queue, with ``settings`` (its platform's and
    those of :data:`WORKER_SETTINGS`) in its environment; its output in ``log_path``."""

    def __init__(self, settings: TrainerSettings, log_path: Path) -> None:
        self.log_path = log_path
        env = {**os.environ, **settings.platform.as_env(), "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        for name in WORKER_SETTINGS:
            env[f"SHIPYARD_TRAINER_{name.upper()}"] = str(getattr(settings, name))
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.trainer.worker", "--queues", "cpu", "--concurrency", "1"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop_process_group(self.process.pid, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
