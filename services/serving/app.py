from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from services.serving.api.http import BodyLimit
from services.serving.api.ours import router
from services.serving.api.tfserving import router as tfserving_router
from services.serving.api.v2 import route_error as v2_route_error
from services.serving.api.v2 import router as v2_router
from services.serving.core.dataplane import DataPlane
from services.serving.core.follower import ModelFollower
from services.serving.core.loaded import LoadedModels
from services.serving.core.metrics import ServingMetrics
from services.serving.core.routing import ShadowMirror
from services.serving.fastlane.lane import FastLane
from services.serving.predlog.log import PredictionLog
from services.serving.settings import ServingSettings
from shipyard_common.db import Database
from shipyard_common.errors import Unavailable
from shipyard_common.mlflow_client import apply_mlflow_client_limits
from shipyard_common.web import install_common

log = logging.getLogger("shipyard.serving")


def _create_tables(database: Database, attempts: int = 5) -> None:
    """Create the tables; several worker processes may race to create them at once."""
    for attempt in range(1, attempts + 1):
        try:
            database.create_tables()
            return
        except Exception as exc:
            if attempt == attempts:
                raise
            log.info("creating tables failed (%s); another worker may be at it, retrying", exc)
            time.sleep(0.2 * attempt)


class ServingApp(FastAPI):
    """The FastAPI app with the prediction fast lane (fastlane.py) in front of its middleware stack."""

    #: The fast lane's body limit; None: no fast lane, FastAPI's routes answer predictions.
    fast_lane_body_limit: int | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if self.fast_lane_body_limit is None:
            return stack
        return FastLane(stack, state=self.state, body_limit=self.fast_lane_body_limit)


async def _start_grpc(app: FastAPI, settings: ServingSettings) -> Any:
    """The gRPC inference server (api/grpc.py), started on the app's event loop.

    Imported here, only when ``grpc_port`` is set: its messages are tritonclient's generated stubs.
    """
    from services.serving.api.grpc import start_server

    dataplane: DataPlane = app.state.dataplane

    def ready() -> bool:  # as GET /v2/health/ready
        return bool(app.state.ready) and dataplane.models.reconciled.is_set()

    return await start_server(settings, dataplane=dataplane, authenticator=app.state.authenticator,
                              ready=ready, version=app.version, http_metrics=app.state.http_metrics)


def _lifespan(
    settings: ServingSettings, database: Database, executor: ThreadPoolExecutor
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the prediction log, the follower and gRPC with the app; stop them in an order that keeps
    every answered request logged."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _create_tables(database)
        dataplane: DataPlane = app.state.dataplane
        follower: ModelFollower = app.state.follower
        dataplane.prediction_log.start()
        follower.start()
        # The fast lane checks tokens on the event loop: an identity provider's keys are read now.
        await asyncio.to_thread(app.state.authenticator.prefetch)
        grpc_server = None
        try:
            if settings.grpc_port:
                grpc_server = await _start_grpc(app, settings)
            if settings.gc_freeze:
                # Everything imported so far (MLflow, SQLAlchemy, numpy...: most of the heap) leaves the
                # collector's view: full collections then take a few ms instead of tens (the p99).
                gc.collect()
                gc.freeze()
            yield
        finally:
            app.state.ready = False
            if grpc_server is not None:  # its calls in flight finish (a few seconds at most) first
                from services.serving.api.grpc import stop_server

                await stop_server(grpc_server)
            # Copies to shadow versions already taken finish (and are logged) before runtimes close.
            dataplane.shadow.close()
            follower.stop()
            # After uvicorn has finished the requests in flight, so every answered one is written.
            executor.shutdown(wait=True)
            dataplane.prediction_log.close()
            database.dispose()

    return lifespan


def create_app(settings: ServingSettings) -> FastAPI:
    platform = settings.platform
    # MLflow's client retries for minutes by default; the follower retries on its own timer.
    apply_mlflow_client_limits(platform)
    database = Database(platform.database_url)
    # Model calls too costly for the event loop (batching/adaptive.py); its threads end with the lifespan.
    executor = ThreadPoolExecutor(settings.request_threads, thread_name_prefix="predict")
    # No OpenTelemetry: FastAPI would otherwise look for a configured provider on every request.
    app = ServingApp(title="Shipyard serving", version="0.1.0",
                     lifespan=_lifespan(settings, database, executor),
                     telemetry={"tracing": False, "metrics": False, "logs": False})
    app.fast_lane_body_limit = settings.max_body_bytes if settings.fast_lane else None
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    models = LoadedModels(metrics)

    def models_reconciled() -> None:
        if not models.reconciled.is_set():
            raise Unavailable("the models named by the registry have not been loaded yet")

    install_common(
        app,
        service="serving",
        platform=platform,
        readiness_checks={"database": database.ping, "models": models_reconciled},
        registry=registry,
    )
    prediction_log = PredictionLog(
        database,
        capacity=settings.prediction_log_capacity,
        batch_size=settings.prediction_log_batch,
        flush_interval_s=settings.prediction_log_flush_s,
        journal_dir=platform.state_dir / "serving-journal",
    )
    metrics.prediction_log_pending.set_function(prediction_log.pending)
    app.state.dataplane = DataPlane(
        settings=settings, models=models, prediction_log=prediction_log, metrics=metrics,
        shadow=ShadowMirror(registry), executor=executor,
    )
    app.state.follower = ModelFollower(settings=settings, models=models, metrics=metrics)
    # TF Serving's ":predict" routes before ours, although no path matches both.
    app.include_router(tfserving_router)
    app.include_router(router)
    app.include_router(v2_router)
    app.add_exception_handler(StarletteHTTPException, v2_route_error)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def configure_process(settings: ServingSettings) -> None:
    """Process-wide settings of a serving process (each worker's too)."""
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)


def create_app_from_env() -> FastAPI:
    """The app with settings from the environment: uvicorn's factory for several worker processes.

    Each worker process is a fresh interpreter: it sets up logging and loads the models itself.
    """
    from shipyard_common.logging import configure_logging
    from shipyard_common.settings import disable_telemetry

    disable_telemetry()
    settings = ServingSettings()
    configure_logging("serving", level=settings.platform.log_level, json_lines=settings.platform.log_json)
    configure_process(settings)
    log.info("serving worker process %d starting", os.getpid())
    return create_app(settings)
