"""Running a service process: settings from the environment, logging, uvicorn, a draining stop.

SIGTERM (what Kubernetes, systemd and ``shipyard down`` send) stops a service in three steps:

1. readiness goes false at once (``app.state.ready``: ``GET /readyz`` answers 503), while the
   service keeps accepting and answering requests for ``drain_grace_s``, so that a load
   balancer sees it not ready and stops sending it new ones;
2. uvicorn's graceful shutdown: it stops accepting, closes idle connections and lets the
   requests in flight finish, for up to ``shutdown_timeout_s``;
3. the app's lifespan shutdown (serving writes what its prediction log still holds).

The process then exits 0: the stop was asked for and went as planned. A second SIGTERM cuts the
grace short; SIGINT (Ctrl+C) skips it, as uvicorn always has.

With ``workers`` > 1, uvicorn's supervisor process holds the socket and starts that many worker
processes, each of which builds the app from an import string (``app_factory``, a factory
function) and runs a :class:`DrainingServer`; on SIGTERM the supervisor sends SIGTERM to each
worker, which drains as above, and exits once they all have.

The drain subclasses uvicorn's ``Server`` and its worker supervisor and keeps a copy of the
supervisor's ``keep_subprocess_alive``: like serving's HTTP protocol
(``services/serving/fastlane/uvicorn_protocol.py``), it is written against one uvicorn release,
:data:`UVICORN_VERSION` (requirements.lock pins it), and a test fails when the installed one differs.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.supervisors.multiprocess import Multiprocess
from uvicorn.supervisors.multiprocess import Process as WorkerProcess

from shipyard_common.logging import configure_logging
from shipyard_common.settings import ServiceSettings, disable_telemetry

log = logging.getLogger("shipyard.runner")

#: The uvicorn release whose internals this module and serving's HTTP protocol are written against.
UVICORN_VERSION = "0.55.0"


def bound_uvicorn() -> bool:
    """Whether the installed uvicorn is the release :data:`UVICORN_VERSION` names."""
    return bool(uvicorn.__version__ == UVICORN_VERSION)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that, on SIGTERM, reports not ready for ``drain_grace_s`` before stopping."""

    def __init__(self, config: uvicorn.Config, *, app: Any = None, drain_grace_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_grace_s = drain_grace_s
        #: When the grace ends (monotonic seconds); None until SIGTERM.
        self.drain_deadline: float | None = None
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)
            return
        # Not recorded in _captured_signals: uvicorn would raise it again once it has stopped,
        # and the default SIGTERM action would turn this orderly stop into a death by signal.
        if self.drain_deadline is not None:
            self.should_exit = True  # asked twice: stop waiting
            return
        self.begin_drain()

    def begin_drain(self) -> None:
        """Readiness false now; graceful shutdown once the grace is over."""
        state = getattr(self._served_app(), "state", None)
        if state is not None:
            state.ready = False
        self.drain_deadline = time.monotonic() + self.drain_grace_s
        if self.drain_grace_s <= 0:
            self.should_exit = True

    def _served_app(self) -> Any:
        """The app given, or (in a worker process, built from an import string) the one uvicorn loaded."""
        app = self.app if self.app is not None else getattr(self.config, "loaded_app", None)
        # uvicorn may wrap it in its own middleware (proxy headers): the app is the one with a state.
        for _ in range(10):
            if app is None or hasattr(app, "state"):
                break
            app = getattr(app, "app", None)
        return app

    async def on_tick(self, counter: int) -> bool:
        # Logged here, not in the signal handler, which may interrupt a thread holding a log lock.
        if self.drain_deadline is not None and not self._drain_logged:
            self._drain_logged = True
            log.info("SIGTERM: not ready from now; draining for %.1fs, then finishing requests in flight",
                     self.drain_grace_s)
        if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
            self.should_exit = True
        return await super().on_tick(counter)


class _DrainingWorker(WorkerProcess):
    """One worker process of the supervisor, serving with a :class:`DrainingServer`."""

    def __init__(self, config: uvicorn.Config, sockets: list[Any], *, drain_grace_s: float) -> None:
        super().__init__(config, sockets)
        self.drain_grace_s = drain_grace_s  # pickled with the process object, read in the worker

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = DrainingServer(self.config, drain_grace_s=self.drain_grace_s)
        return self._server


class DrainingSupervisor(Multiprocess):
    """uvicorn's worker supervisor, with workers that drain on SIGTERM (which it forwards to them)."""

    def __init__(self, config: uvicorn.Config, sockets: list[Any], *, drain_grace_s: float) -> None:
        super().__init__(config, sockets)
        self.drain_grace_s = drain_grace_s

    def _worker(self) -> _DrainingWorker:
        return _DrainingWorker(self.config, self.sockets, drain_grace_s=self.drain_grace_s)

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            process = self._worker()
            process.start()
            self.processes.append(process)

    def keep_subprocess_alive(self) -> None:
        # uvicorn's, with our worker class for the replacement.
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker process %s failed to start; stopping", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.warning("worker process %s died; starting another", process.pid)
            replacement = self._worker()
            replacement.start()
            self.processes[index] = replacement


STARTUP_FAILURE = 3  # uvicorn's exit status when the server did not start


def serve(
    service: str,
    settings: ServiceSettings,
    create_app: Callable[[Any], Any],
    *,
    drain_grace_s: float = 0.0,
    shutdown_timeout_s: int = 10,
    workers: int = 1,
    app_factory: str | None = None,
    **uvicorn_options: Any,
) -> None:
    """Run ``create_app(settings)`` under uvicorn; with ``workers`` > 1, ``app_factory`` in each worker.

    ``app_factory``: ``"module:function"``, a function of no arguments that reads the settings
    from the environment and returns the app (each worker is a fresh interpreter).
    """
    disable_telemetry()
    configure_logging(service, level=settings.platform.log_level, json_lines=settings.platform.log_json)
    if workers > 1:
        if app_factory is None:
            raise ValueError("several workers need an app factory import string")
        config = uvicorn.Config(
            app_factory, factory=True, workers=workers, host=settings.host, port=settings.port,
            log_config=None, access_log=False, timeout_graceful_shutdown=shutdown_timeout_s,
            **uvicorn_options,
        )
        supervisor = DrainingSupervisor(config, [config.bind_socket()], drain_grace_s=drain_grace_s)
        supervisor.run()
        if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
            sys.exit(STARTUP_FAILURE)
        log.info("%s stopped", service)
        return
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=shutdown_timeout_s,
        **uvicorn_options,
    )
    server = DrainingServer(config, app=app, drain_grace_s=drain_grace_s)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # as uvicorn.run exits
    log.info("%s stopped", service)
