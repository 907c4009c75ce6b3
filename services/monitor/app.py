from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.monitor.router import router
from services.monitor.service import Refresher, create_monitor
from services.monitor.settings import MonitorSettings
from shipyard_common.db import Database
from shipyard_common.settings import disable_telemetry
from shipyard_common.web import install_common, mlflow_health_check


def create_app(settings: MonitorSettings) -> FastAPI:
    # Evidently ships a telemetry client that stays quiet only when DO_NOT_TRACK is set.
    disable_telemetry()
    platform = settings.platform
    database = Database(platform.database_url)


    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Serving may not have logged anything yet; the queries need the table to exist.
        database.create_tables()
        refresher = Refresher(app.state.monitor)
        refresher.start()
        try:
            yield
        finally:
            app.state.ready = False
            refresher.stop()
            database.dispose()

    app = FastAPI(title="Shipyard monitor", version="0.1.0", lifespan=lifespan)
    readiness = {"database": database.ping}
    if platform.mlflow_tracking_uri.startswith(("http://", "https://")):
        readiness["mlflow"] = mlflow_health_check(platform.mlflow_tracking_uri)
    registry = install_common(app, service="monitor", platform=platform, readiness_checks=readiness)
    app.state.monitor = create_monitor(settings=settings, database=database, registry=registry)
    app.include_router(router)
    return app
