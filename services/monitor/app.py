from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.monitor import tables  # noqa: F401  (registers the monitor's tables before create_tables)
from services.monitor.context import create_monitor
from services.monitor.feedback.router import router as feedback_router
from services.monitor.loop import Loop
from services.monitor.retraining.router import router as retraining_router
from services.monitor.settings import MonitorSettings
from services.monitor.windows.router import router as windows_router
from shipyard_common.db import Database
from shipyard_common.edge import install_edge
from shipyard_common.mlflow_client import apply_mlflow_client_limits
from shipyard_common.settings import disable_telemetry
from shipyard_common.web import install_common, mlflow_health_check


def create_app(settings: MonitorSettings) -> FastAPI:
    # Evidently ships a telemetry client that stays quiet only when DO_NOT_TRACK is set.
    disable_telemetry()
    platform = settings.platform
    # A call to MLflow fails within seconds when it is down, not after minutes of retries.
    apply_mlflow_client_limits(platform)
    database = Database(platform.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Serving may not have logged anything yet; the queries need the tables to exist.
        database.create_tables()
        loop = Loop(app.state.monitor)
        loop.start()
        try:
            yield
        finally:
            app.state.ready = False
            loop.stop()
            app.state.monitor.close()
            database.dispose()

    app = FastAPI(title="Shipyard monitor", version="0.1.0", lifespan=lifespan)
    readiness = {"database": database.ping}
    if platform.mlflow_tracking_uri.startswith(("http://", "https://")):
        readiness["mlflow"] = mlflow_health_check(platform.mlflow_tracking_uri)
    registry = install_common(app, service="monitor", platform=platform, readiness_checks=readiness)
    install_edge(app, settings, service="monitor")
    app.state.monitor = create_monitor(settings=settings, database=database, registry=registry)
    for router in (windows_router, feedback_router, retraining_router):
        app.include_router(router)
    return app
