"""What the HTTP API does with jobs: create, list, cancel, and read a job's logs.

The functions a worker uses too (read, update, claim, log, send again) are the job store's,
:mod:`services.trainer.jobs.store`; callers import them from there.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import CursorResult, select, update

from services.trainer.jobs.schemas import JobCreate, JobPublic, JobState, Progress
from services.trainer.jobs.store import Enqueue, get_job, send, to_public
from services.trainer.jobs.tables import JobLogRecord, JobRecord
from shipyard_common.db import Database, utcnow
from shipyard_common.errors import Conflict, NotFound

log = logging.getLogger("shipyard.trainer")

MAX_LIST_LIMIT = 1000
MAX_LOG_LIMIT = 5000

CANCELLABLE_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)


def create_job(*, database: Database, spec: JobCreate, enqueue: Enqueue) -> JobPublic:
    """Store the job, then hand it to the broker.

    The row is written first so that a worker never receives an id the database does not
    know. If the broker refuses, the job stays stored as ``queued`` with no ``enqueued_at``
    and the caller still gets 201: the job store's
    :func:`~services.trainer.jobs.store.send_unsent_jobs` sends it once the broker is back.
    Answering 503 instead would be a lie ("nothing happened") that invites a retry, and a
    retried POST would train the same model twice (the pipeline retries POSTs on 503).
    """
    now = utcnow()
    record = JobRecord(
        id=str(uuid.uuid4()),
        state=JobState.QUEUED.value,
        spec=spec.model_dump(mode="json"),
        progress=Progress(epochs=spec.training.epochs).model_dump(),
        metrics={},
        model_name=spec.model_name,
        attempts=0,
        created_at=now,
        updated_at=now,
    )
    with database.session() as session:
        session.add(record)
    send(database=database, enqueue=enqueue, job_id=record.id, queue=spec.resources.queue.value)
    return get_job(database=database, job_id=record.id)


def models_trained_on(*, database: Database, dataset: str, rev: str) -> list[dict[str, Any]]:
    """The succeeded jobs that trained on ``dataset`` at ``rev`` (a full commit id), newest first."""
    statement = (
        select(JobRecord)
        .where(JobRecord.state == JobState.SUCCEEDED.value)
        .order_by(JobRecord.created_at.desc())
    )
    found = []
    with database.session() as session:
        for record in session.scalars(statement):
            data = (record.spec or {}).get("data") or {}
            if data.get("dataset") == dataset and data.get("rev") == rev:
                found.append({"job_id": record.id, "model_name": record.model_name,
                              "model_version": record.model_version, "created_at": record.created_at})
    return found


def list_jobs(
    *,
    database: Database,
    state: JobState | None = None,
    model_name: str | None = None,
    limit: int = 100,
) -> list[JobPublic]:
    """Newest first."""
    statement = select(JobRecord).order_by(JobRecord.created_at.desc(), JobRecord.id)
    if state is not None:
        statement = statement.where(JobRecord.state == state.value)
    if model_name is not None:
        statement = statement.where(JobRecord.model_name == model_name)
    statement = statement.limit(max(1, min(limit, MAX_LIST_LIMIT)))
    with database.session() as session:
        return [to_public(record) for record in session.scalars(statement)]


def cancel_job(*, database: Database, job_id: str) -> JobPublic:
    """End a queued or running job as ``cancelled``.

    Only the row changes. A queued job's message stays on the broker, and the worker that
    receives it finds the job finished (see :func:`~services.trainer.jobs.store.claim_job`); a
    running job's worker sees its next progress write refused and stops without registering a model.
    """
    statement = (
        update(JobRecord)
        .where(JobRecord.id == job_id, JobRecord.state.in_(CANCELLABLE_STATES))
        .values(state=JobState.CANCELLED.value, error="cancelled on request")
    )
    with database.session() as session:
        result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
        changed = bool(result.rowcount)
    job = get_job(database=database, job_id=job_id)  # 404 for an unknown id
    if not changed:
        raise Conflict(
            f"training job {job_id!r} has already ended as {job.state.value!r}; "
            "only a queued or running job can be cancelled",
            details={"state": job.state.value},
        )
    log.info("job %s cancelled", job_id)
    return job


def read_logs(
    *, database: Database, job_id: str, after: int = 0, limit: int = 1000
) -> tuple[JobState, list[dict[str, Any]]]:
    """The job's state and its log lines numbered above ``after``, oldest first (404 if unknown).

    The state is read before the lines: a client that sees a final state and then no more
    lines has seen every line.
    """
    statement = (
        select(JobLogRecord)
        .where(JobLogRecord.job_id == job_id, JobLogRecord.line > after)
        .order_by(JobLogRecord.line)
        .limit(max(1, min(limit, MAX_LOG_LIMIT)))
    )
    with database.session() as session:
        record = session.get(JobRecord, job_id)
        if record is None:
            raise NotFound(f"no training job with id {job_id!r}")
        state = JobState(record.state)
        lines = [
            {"line": row.line, "time": row.created_at.isoformat() + "Z", "level": row.level,
             "message": row.message}
            for row in session.scalars(statement)
        ]
    return state, lines
