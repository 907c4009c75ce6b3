from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.serving.dataplane import DataPlane
from services.serving.metrics import ServingMetrics
from services.serving.models import LoadedModels, ModelFollower
from services.serving.prediction_log import PredictionLog
from services.serving.router import router
from services.serving.settings import ServingSettings
from shipyard_common.db import Database
from shipyard_common.errors import Unavailable
from shipyard_common.web import install_common


def create_app(settings: ServingSettings) -> FastAPI:
    platform = settings.platform
    database = Database(platform.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database.create_tables()
        dataplane: DataPlane = app.state.dataplane
        follower: ModelFollower = app.state.follower
        dataplane.prediction_log.start()
        follower.start()
        try:
            yield
        finally:
            app.state.ready = False
            follower.stop()
            # After uvicorn has finished the requests in flight, so every answered one is written.
            dataplane.prediction_log.close()
            database.dispose()

    app = FastAPI(title="Shipyard serving", version="0.1.0", lifespan=lifespan)
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
    )
    metrics.prediction_log_pending.set_function(prediction_log.pending)
    app.state.dataplane = DataPlane(
        settings=settings, models=models, prediction_log=prediction_log, metrics=metrics
    )
    app.state.follower = ModelFollower(settings=settings, models=models, metrics=metrics)
    app.include_router(router)
    return app
