"""How many jobs of one queue wait and run now: what the GPU scaler decides from, in one query.

The job table is the record (a Redis message can be lost; the row cannot), so the scaler counts rows,
not broker messages. A job's queue is its spec's ``resources.queue`` (``cpu`` when the spec names none).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from services.trainer.jobs.schemas import JobState
from services.trainer.jobs.schemas import Queue as QueueName
from services.trainer.jobs.tables import JobRecord
from shipyard_common.db import Database


@dataclass(frozen=True)
class ActiveJobs:
    """Jobs of one queue that wait for a worker (``queued``) and that a worker runs (``running``)."""

    queued: int
    running: int


def active_jobs(*, database: Database, queue: str) -> ActiveJobs:
    """Count queue ``queue``'s queued and running jobs with one grouped query."""
    queue_of_job = func.coalesce(JobRecord.spec[("resources", "queue")].as_string(), QueueName.CPU.value)
    statement = (
        select(JobRecord.state, func.count())
        .where(JobRecord.state.in_((JobState.QUEUED.value, JobState.RUNNING.value)), queue_of_job == queue)
        .group_by(JobRecord.state)
    )
    with database.session() as session:
        counts = {str(state): int(count) for state, count in session.execute(statement)}
    return ActiveJobs(queued=counts.get(JobState.QUEUED.value, 0),
                      running=counts.get(JobState.RUNNING.value, 0))
