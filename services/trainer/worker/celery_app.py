"""The Celery side: the app both the API (to send) and the worker (to run) build from settings.

The broker carries only job ids; the database holds the jobs. Acknowledging late, and
rejecting on a lost worker, means a job whose worker dies goes back on the queue instead of
vanishing; :func:`services.trainer.jobs.store.claim_job` keeps the second delivery from
running a job twice. The task's Request class (:mod:`services.trainer.worker.lost`) notes on the job
why a pool process died under it (SIGKILL: the out-of-memory killer, most likely).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined, unused-ignore]

from services.trainer.jobs.queues import TASK_NAME
from services.trainer.jobs.schemas import Queue as QueueName
from services.trainer.settings import TrainerSettings
from services.trainer.worker.lost import request_class

log = logging.getLogger("shipyard.trainer.worker")


def make_celery(settings: TrainerSettings) -> Celery:
    platform = settings.platform
    app = Celery("shipyard-trainer", broker=platform.redis_url, set_as_current=False)
    queues = [settings.queue_name(q.value) for q in QueueName]
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(name, routing_key=name) for name in queues],  # type: ignore[no-untyped-call]
        task_default_queue=queues[0],
        task_create_missing_queues=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": settings.unacked_restore_throttle,
            "socket_connect_timeout": 5,
        },
        # Fail a send within seconds when Redis is away: the job row is kept, and the API's
        # reconciler sends it later, so waiting here would only hold the HTTP request.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        worker_hijack_root_logger=False,
        # Libraries that print (rather than log) are not warning about anything.
        worker_redirect_stdouts_level="INFO",
        worker_send_task_events=False,
    )

    # Request: a pool process lost under a job (the OOM killer's SIGKILL) is noted on the job (worker.lost).
    @app.task(name=TASK_NAME, bind=True, max_retries=None, acks_late=True,  # type: ignore[untyped-decorator]
              Request=request_class(settings))
    def train(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
        from services.trainer.jobs.store import Claim
        from services.trainer.worker.runner import run_job

        claim = run_job(job_id=job_id, settings=settings)
        if claim == Claim.CLAIMED:
            advance_sweep(settings, job_id, enqueue=lambda job, queue: self.app.send_task(
                TASK_NAME, args=[job], queue=settings.queue_name(queue)))
        if claim == Claim.BUSY:
            # Another worker holds it, or held it until it died a moment ago: look again once
            # a silent row would count as stale.
            raise self.retry(countdown=settings.stale_after_s)

    return app


def advance_sweep(settings: TrainerSettings, job_id: str, *, enqueue: Callable[[str, str], None]) -> None:
    """If the job that just ended is a sweep's trial, advance its sweep now (next trials, or the end);
    failing that, the API's reconciler does it within ``reconcile_interval_s``."""
    from services.trainer.sweeps.driver import Driving, advance_after_job
    from services.trainer.worker.runner import database_for

    platform = settings.platform
    try:
        advance_after_job(Driving(database=database_for(settings), database_url=platform.database_url,
                                  tracking_uri=platform.mlflow_tracking_uri, enqueue=enqueue), job_id)
    except Exception:
        log.warning("could not advance the sweep of job %s; the reconciler will", job_id, exc_info=True)


def worker_argv(*, queues: Sequence[str], concurrency: int, pool: str, loglevel: str) -> list[str]:
    return [
        "worker",
        f"--queues={','.join(queues)}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--loglevel={loglevel}",
        # Mingle and gossip talk to other workers on the same Redis; a trainer needs neither.
        "--without-mingle",
        "--without-gossip",
        "--hostname=trainer@%h",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    from services.trainer.worker.metrics import WorkerMetricsSettings, serve_worker_metrics
    from shipyard_common.logging import configure_logging
    from shipyard_common.mlflow_client import apply_mlflow_client_limits
    from shipyard_common.settings import disable_telemetry

    parser = argparse.ArgumentParser(prog="python -m services.trainer.worker", description=__doc__)
    parser.add_argument("--queues", default="cpu,gpu", help="comma-separated spec queues (cpu, gpu)")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs trained at once")
    parser.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    args = parser.parse_args(argv)

    disable_telemetry()
    # MLflow prints a "View run" link on stdout for every run it ends; in a worker log that is noise.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    settings = TrainerSettings()
    platform = settings.platform
    # Each MLflow call fails within seconds while MLflow is down; the job then waits with its own
    # backoff, and says so (services.trainer.worker.runner), instead of hanging in MLflow's retries.
    apply_mlflow_client_limits(platform)
    configure_logging("trainer-worker", level=platform.log_level, json_lines=platform.log_json)
    known = {q.value for q in QueueName}
    wanted = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in known]
    if unknown or not wanted:
        parser.error(f"unknown queue(s) {unknown or wanted}; choose from {sorted(known)}")
    queues = [settings.queue_name(q) for q in wanted]
    broker = urlsplit(platform.redis_url)
    log.info("trainer worker consuming %s on redis %s%s", queues, broker.hostname, broker.path)
    serve_worker_metrics(WorkerMetricsSettings(), queues=wanted, concurrency=args.concurrency)
    app = make_celery(settings)
    app.worker_main(
        worker_argv(queues=queues, concurrency=args.concurrency, pool=args.pool, loglevel=platform.log_level)
    )

