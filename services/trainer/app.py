from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI

from services.trainer import service
from services.trainer.broker import on_broker_for
from services.trainer.datasets import router as datasets_router
from services.trainer.metrics import JobCollector
from services.trainer.pipeline_runs import router as pipeline_runs_router
from services.trainer.router import router
from services.trainer.settings import TrainerSettings
from services.trainer.worker import TASK_NAME, make_celery
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database
from shipyard_common.web import install_common

log = logging.getLogger("shipyard.trainer")


def create_app(settings: TrainerSettings) -> FastAPI:
    platform = settings.platform
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
            target=_reconcile_until, args=(stop, settings, database, enqueue),
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
    app.state.settings = settings
    app.state.database = database
    app.state.enqueue = enqueue
    app.state.data_repo = DataRepo.from_settings(platform)
    app.include_router(router)
    app.include_router(datasets_router)
    app.include_router(pipeline_runs_router)
    return app


def _reconcile_until(
    stop: threading.Event, settings: TrainerSettings, database: Database, enqueue: service.Enqueue
) -> None:
    """Make the broker agree with the database, every ``reconcile_interval_s``.

    Jobs stored while the broker was away are sent (see ``service.create_job``), and jobs whose
    message the broker lost are sent again (see ``service.requeue_lost_jobs``).
    """
    on_broker = on_broker_for(settings)
    while not stop.wait(settings.reconcile_interval_s):
        try:
            sent = service.send_unsent_jobs(
                database=database, enqueue=enqueue, older_than_s=min(10.0, settings.lost_after_s)
            )
            if sent:
                log.info("sent %d job(s) the broker had not accepted before", sent)
            resent = service.requeue_lost_jobs(
                database=database, enqueue=enqueue, on_broker=on_broker,
                lost_after_s=settings.lost_after_s, stale_after_s=settings.stale_after_s,
            )
            if resent:
                log.info("sent again %d job(s) whose broker message was lost", resent)
        except Exception:  # a database or Redis outage must not end the thread for good
            log.exception("reconciling jobs with the broker failed")
