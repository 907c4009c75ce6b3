"""Jobs in the database: create, read, list, update, and the claim a worker makes before training.

Every write a worker makes is a conditional UPDATE, so that two deliveries of one task (Redis
redelivers unacknowledged messages) cannot both run the job, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import CursorResult, and_, func, or_, select, update

from services.trainer.api.schemas import TERMINAL_STATES, JobCreate, JobPublic, JobState, Progress
from services.trainer.api.tables import JobLogRecord, JobRecord
from shipyard_common.db import Database, utcnow
from shipyard_common.errors import Conflict, NotFound

log = logging.getLogger("shipyard.trainer")

# (job id, queue name from the spec) → the task is on the broker, or an exception.
Enqueue = Callable[[str, str], None]

MAX_LIST_LIMIT = 1000
MAX_LOG_LIMIT = 5000

CANCELLABLE_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)


def to_public(record: JobRecord) -> JobPublic:
    return JobPublic(
        id=record.id,
        state=JobState(record.state),
        progress=Progress.model_validate(record.progress or {}),
        metrics={k: float(v) for k, v in (record.metrics or {}).items()},
        model_name=record.model_name,
        model_version=record.model_version,
        mlflow_run_id=record.mlflow_run_id,
        device=record.device,
        error=record.error,
        created_at=record.created_at,
        updated_at=record.updated_at,
        spec=JobCreate.model_validate(record.spec),
    )


def create_job(*, database: Database, spec: JobCreate, enqueue: Enqueue) -> JobPublic:
    """Store the job, then hand it to the broker.

    The row is written first so that a worker never receives an id the database does not
    know. If the broker refuses, the job stays stored as ``queued`` with no ``enqueued_at``
    and the caller still gets 201: :func:`send_unsent_jobs` sends it once the broker is back.
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
    _send(database=database, enqueue=enqueue, job_id=record.id, queue=spec.resources.queue.value)
    return get_job(database=database, job_id=record.id)


def _send(*, database: Database, enqueue: Enqueue, job_id: str, queue: str) -> bool:
    try:
        enqueue(job_id, queue)
    except Exception as exc:  # any broker failure: the row is the record, the reconciler retries
        log.warning("job %s is stored but could not be queued yet: %s", job_id, exc)
        return False
    with database.session() as session:
        session.execute(
            update(JobRecord)
            .where(JobRecord.id == job_id, JobRecord.enqueued_at.is_(None))
            .values(enqueued_at=utcnow())
        )
    return True


def send_unsent_jobs(*, database: Database, enqueue: Enqueue, older_than_s: float = 10.0) -> int:
    """Send queued jobs the broker never accepted; return how many went out.

    ``older_than_s`` leaves alone jobs that :func:`create_job` is sending right now. A job sent
    twice is harmless: the second delivery finds it claimed (see :func:`claim_job`).
    """
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    statement = select(JobRecord.id, JobRecord.spec).where(
        JobRecord.state == JobState.QUEUED.value,
        JobRecord.enqueued_at.is_(None),
        JobRecord.created_at < cutoff,
    )
    with database.session() as session:
        pending = list(session.execute(statement.order_by(JobRecord.created_at)))
    sent = 0
    for job_id, spec in pending:
        queue = str((spec.get("resources") or {}).get("queue", "cpu"))
        if _send(database=database, enqueue=enqueue, job_id=job_id, queue=queue):
            sent += 1
        else:
            break  # the broker is still away; try again next round
    return sent


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


def get_job(*, database: Database, job_id: str) -> JobPublic:
    with database.session() as session:
        record = session.get(JobRecord, job_id)
        if record is None:
            raise NotFound(f"no training job with id {job_id!r}")
        return to_public(record)


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


def update_job(
    *, database: Database, job_id: str, expect_state: JobState | None = None, **values: Any
) -> bool:
    """Set columns of one job; with ``expect_state``, only while the job is in that state.

    Returns whether the row changed. A worker passes ``expect_state=RUNNING`` so that it never
    overwrites a job that another party has since ended (a cancel, or a takeover).
    """
    for key in ("state",):
        if isinstance(values.get(key), JobState):
            values[key] = values[key].value
    statement = update(JobRecord).where(JobRecord.id == job_id).values(**values)
    if expect_state is not None:
        statement = statement.where(JobRecord.state == expect_state.value)
    with database.session() as session:
        result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
        return bool(result.rowcount)


class Claim(StrEnum):
    CLAIMED = "claimed"  # this worker runs the job now
    FINISHED = "finished"  # the job already ended; nothing to do
    BUSY = "busy"  # another worker runs it and was heard from recently
    EXHAUSTED = "exhausted"  # workers were lost too often; the job is now failed
    MISSING = "missing"  # no such job (a message from another database)


def claim_job(*, database: Database, job_id: str, stale_after_s: float, max_attempts: int) -> Claim:
    """Move the job to ``running`` for this worker, if nobody else is running it.

    A queued job is claimed at once. A running job whose row has been silent for
    ``stale_after_s`` lost its worker (Redis redelivered the message), so it is taken over,
    at most ``max_attempts`` times in all.
    """
    stale_cutoff = utcnow() - timedelta(seconds=stale_after_s)
    claim = (
        update(JobRecord)
        .where(
            JobRecord.id == job_id,
            JobRecord.attempts < max_attempts,
            or_(
                JobRecord.state == JobState.QUEUED.value,
                and_(JobRecord.state == JobState.RUNNING.value, JobRecord.updated_at < stale_cutoff),
            ),
        )
        .values(state=JobState.RUNNING.value, attempts=JobRecord.attempts + 1, error=None)
    )
    with database.session() as session:
        claimed: CursorResult[Any] = session.execute(claim)  # type: ignore[assignment]
        if claimed.rowcount:
            return Claim.CLAIMED
        record = session.get(JobRecord, job_id)
        if record is None:
            return Claim.MISSING
        state = JobState(record.state)
        attempts = record.attempts
    if state in TERMINAL_STATES:
        return Claim.FINISHED
    if state == JobState.RUNNING and record.updated_at >= stale_cutoff:
        return Claim.BUSY
    failed = update_job(
        database=database,
        job_id=job_id,
        expect_state=state,
        state=JobState.FAILED,
        error=f"the job was started {attempts} times and its worker was lost each time; giving up",
    )
    return Claim.EXHAUSTED if failed else Claim.BUSY


def cancel_job(*, database: Database, job_id: str) -> JobPublic:
    """End a queued or running job as ``cancelled``.

    Only the row changes. A queued job's message stays on the broker, and the worker that
    receives it finds the job finished (see :func:`claim_job`); a running job's worker sees
    its next progress write refused and stops without registering a model.
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


def requeue_lost_jobs(
    *,
    database: Database,
    enqueue: Enqueue,
    on_broker: Callable[[], set[str]],
    lost_after_s: float,
    stale_after_s: float,
) -> int:
    """Send again the jobs whose broker message is gone (a flushed or replaced Redis).

    Candidates are queued jobs sent more than ``lost_after_s`` ago, and running jobs whose row
    has been silent for ``stale_after_s`` (a lost worker whose message went with the broker).
    ``on_broker`` names the job ids that have a message waiting in a queue or held unacked by a
    worker; only candidates outside it are sent. A needless second message is harmless: the
    claim turns it away.
    """
    now = utcnow()
    statement = select(JobRecord.id, JobRecord.spec).where(
        or_(
            and_(
                JobRecord.state == JobState.QUEUED.value,
                JobRecord.enqueued_at.is_not(None),
                JobRecord.enqueued_at < now - timedelta(seconds=lost_after_s),
            ),
            and_(
                JobRecord.state == JobState.RUNNING.value,
                JobRecord.updated_at < now - timedelta(seconds=stale_after_s),
            ),
        )
    )
    with database.session() as session:
        candidates = list(session.execute(statement.order_by(JobRecord.created_at)))
    if not candidates:
        return 0
    present = on_broker()  # read after the rows: a job sent since then is not a candidate
    sent = 0
    for job_id, spec in candidates:
        if job_id in present:
            continue
        queue = str((spec.get("resources") or {}).get("queue", "cpu"))
        try:
            enqueue(job_id, queue)
        except Exception as exc:
            log.warning("could not re-send job %s whose message was lost: %s", job_id, exc)
            break
        with database.session() as session:
            # Restart the clock, so that the job is not sent again before a worker could take it.
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(enqueued_at=utcnow()))
        log.warning("job %s had no message on the broker; sent it again", job_id)
        sent += 1
    return sent


def last_log_line(*, database: Database, job_id: str) -> int:
    with database.session() as session:
        value = session.scalar(select(func.max(JobLogRecord.line)).where(JobLogRecord.job_id == job_id))
    return int(value or 0)


def append_log(*, database: Database, job_id: str, line: int, level: str, message: str) -> None:
    with database.session() as session:
        session.add(JobLogRecord(job_id=job_id, line=line, level=level, message=message, created_at=utcnow()))


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
