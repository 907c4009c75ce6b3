from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI

from services.trainer.api.datasets import router as datasets_router
from services.trainer.api.jobs import router
from services.trainer.api.metrics import JobCollector
from services.trainer.api.pipeline_runs import router as pipeline_runs_router
from services.trainer.api.sweeps import router as sweeps_router
from services.trainer.jobs.queues import TASK_NAME
from services.trainer.settings import TrainerSettings
from services.trainer.worker.celery_app import make_celery
from services.trainer.worker.reconciler import reconcile_until
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database
from shipyard_common.edge import BodyRoute, install_edge
from shipyard_common.mlflow_client import apply_mlflow_client_limits
from shipyard_common.web import install_common

log = logging.getLogger("shipyard.trainer")


def create_app(settings: TrainerSettings) -> FastAPI:
    platform = settings.platform
    # A call to MLflow fails within seconds when it is down, not after minutes of retries.
    apply_mlflow_client_limits(platform)
    database = Database(platform.database_url)
    celery = make_celery(settings)

    def enqueue(job_id: str, queue: str) -> None:
        # By name: the API never imports the task, and so never imports torch.
        celery.send_task(TASK_NAME, args=[job_id], queue=settings.queue_name(queue))

    def redis_answers() -> None:
        client = redis.Redis.from_url(platform.redis_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database.create_tables()
        stop = threading.Event()
        reconciler = threading.Thread(
            target=reconcile_until, args=(stop, settings, database, enqueue),
            name="job-reconciler", daemon=True,
        )
        reconciler.start()
        try:
            yield
        finally:
            app.state.ready = False
            stop.set()
            reconciler.join(timeout=10)
            celery.close()
            database.dispose()

    app = FastAPI(title="Shipyard trainer", version="0.1.0", lifespan=lifespan)
    registry = install_common(
        app, service="trainer", platform=platform,
        readiness_checks={"database": database.ping, "redis": redis_answers},
    )
    registry.register(JobCollector(database, settings))
    # Dataset uploads are files, not requests: their own limit (dataset_max_bytes, 1 GiB by default).
    install_edge(app, settings, service="trainer",
                 body_routes=[BodyRoute("POST", r"/datasets/[^/]+", settings.dataset_max_bytes)])
    app.state.settings = settings
    app.state.database = database
    app.state.enqueue = enqueue
    app.state.data_repo = DataRepo.from_settings(platform)
    app.include_router(router)
    app.include_router(datasets_router)
    app.include_router(pipeline_runs_router)
    app.include_router(sweeps_router)
    return app

