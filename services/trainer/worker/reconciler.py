"""The reconciler: a thread in the API process that makes the broker agree with the database.

Jobs stored while the broker was away are sent, jobs whose message the broker lost are sent again,
and so are jobs whose worker was lost (a row silent for ``stale_after_s``, while a live worker's
heartbeat keeps its row fresh) even though that worker's message is still held unacknowledged, where
it would wait for the broker's visibility timeout (6 h by default);
:func:`services.trainer.jobs.store.claim_job` keeps a second delivery from running twice.
"""

from __future__ import annotations

import logging
import threading

from services.trainer.jobs import store
from services.trainer.settings import TrainerSettings
from services.trainer.sweeps import driver as sweeps
from services.trainer.worker.broker import on_broker_for, waiting_for
from shipyard_common.db import Database

log = logging.getLogger("shipyard.trainer")


def reconcile_until(
    stop: threading.Event, settings: TrainerSettings, database: Database, enqueue: store.Enqueue
) -> None:
    """Make the broker agree with the database, every ``reconcile_interval_s``.

    Jobs stored while the broker was away are sent (see ``store.send_unsent_jobs``), and jobs whose
    message the broker lost are sent again (see ``store.requeue_lost_jobs``).
    """
    on_broker, waiting = on_broker_for(settings), waiting_for(settings)
    # Sweeps are advanced here too: a trial whose worker died before advancing its sweep is settled.
    driving = sweeps.Driving(database=database, database_url=settings.platform.database_url,
                             tracking_uri=settings.platform.mlflow_tracking_uri, enqueue=enqueue)
    while not stop.wait(settings.reconcile_interval_s):
        try:
            sent = store.send_unsent_jobs(
                database=database, enqueue=enqueue, older_than_s=min(10.0, settings.lost_after_s)
            )
            if sent:
                log.info("sent %d job(s) the broker had not accepted before", sent)
            resent = store.requeue_lost_jobs(
                database=database, enqueue=enqueue, on_broker=on_broker, waiting=waiting,
                lost_after_s=settings.lost_after_s, stale_after_s=settings.stale_after_s,
            )
            if resent:
                log.info("sent again %d job(s) whose broker message was lost", resent)
            sweeps.advance_all(driving)
        except Exception:  # a database or Redis outage must not end the thread for good
            log.exception("reconciling jobs with the broker failed")
