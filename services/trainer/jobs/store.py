"""Jobs in the database, as the API and the worker both use them: read, update, claim, log, send.

Every write a worker makes is a conditional UPDATE, so that two deliveries of one task (Redis
redelivers unacknowledged messages) cannot both run the job, on SQLite and PostgreSQL alike.
What only the HTTP API does (create, list, cancel, read the logs) is :mod:`services.trainer.api.service`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import CursorResult, and_, func, or_, select, update

from services.trainer.jobs.schemas import (
    DETAIL_KEY,
    TERMINAL_STATES,
    JobCreate,
    JobPublic,
    JobState,
    Progress,
)
from services.trainer.jobs.tables import JobLogRecord, JobRecord
from shipyard_common.db import Database, utcnow
from shipyard_common.errors import NotFound

log = logging.getLogger("shipyard.trainer")

# (job id, queue name from the spec) → the task is on the broker, or an exception.
Enqueue = Callable[[str, str], None]


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
        # What it waited for is shown only while it runs (a job that gave up says why in ``error``).
        detail=(record.progress or {}).get(DETAIL_KEY) if record.state == JobState.RUNNING.value else None,
        created_at=record.created_at,
        updated_at=record.updated_at,
        spec=JobCreate.model_validate(record.spec),
    )


def get_job(*, database: Database, job_id: str) -> JobPublic:
    with database.session() as session:
        record = session.get(JobRecord, job_id)
        if record is None:
            raise NotFound(f"no training job with id {job_id!r}")
        return to_public(record)


# (job id, attempt) of the job this thread runs, set by :func:`fenced`.
_FENCE: ContextVar[tuple[str, int] | None] = ContextVar("shipyard_job_fence", default=None)


@contextmanager
def fenced(job_id: str, attempt: int) -> Iterator[None]:
    """Within the block, this thread's writes to job ``job_id`` apply only while its ``attempts`` is
    still ``attempt``: a worker whose job another took over (its row went silent, a database outage
    say, and the job was sent again and claimed) finds its next write refused and stops, instead of
    training and registering beside the new one."""
    token = _FENCE.set((job_id, attempt))
    try:
        yield
    finally:
        _FENCE.reset(token)


def attempt_of(*, database: Database, job_id: str) -> int:
    """How many times job ``job_id`` was claimed (the claim just made included)."""
    with database.session() as session:
        return int(session.scalar(select(JobRecord.attempts).where(JobRecord.id == job_id)) or 0)


def update_job(
    *, database: Database, job_id: str, expect_state: JobState | None = None, **values: Any
) -> bool:
    """Set columns of one job; with ``expect_state``, only while the job is in that state.

    Returns whether the row changed. A worker passes ``expect_state=RUNNING`` so that it never
    overwrites a job that another party has since ended (a cancel, or a takeover); inside
    :func:`fenced`, only while the job is at the attempt this worker claimed.
    """
    for key in ("state",):
        if isinstance(values.get(key), JobState):
            values[key] = values[key].value
    statement = update(JobRecord).where(JobRecord.id == job_id).values(**values)
    if expect_state is not None:
        statement = statement.where(JobRecord.state == expect_state.value)
    fence = _FENCE.get()
    if fence is not None and fence[0] == job_id:
        statement = statement.where(JobRecord.attempts == fence[1])
    with database.session() as session:
        result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
        return bool(result.rowcount)


def set_detail(*, database: Database, job_id: str, detail: str | None) -> bool:
    """Show (or, with None, clear) what the running job waits for; False if it is no longer running.

    Only the job's worker writes its progress, so reading and writing it back loses nothing.
    """
    with database.session() as session:
        record = session.get(JobRecord, job_id)
        progress = dict(record.progress or {}) if record is not None else {}
    if detail is None:
        progress.pop(DETAIL_KEY, None)
    else:
        progress[DETAIL_KEY] = detail
    return update_job(database=database, job_id=job_id, expect_state=JobState.RUNNING, progress=progress)


def send(*, database: Database, enqueue: Enqueue, job_id: str, queue: str) -> bool:
    """Hand the job to the broker and note when; False (the row kept as it is) if the broker refused."""
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
        if send(database=database, enqueue=enqueue, job_id=job_id, queue=queue):
            sent += 1
        else:
            break  # the broker is still away; try again next round
    return sent


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
        # What the last lost worker's main process noted (see note_lost_worker), if anything.
        last_loss = record.error if state == JobState.RUNNING else None
    if state in TERMINAL_STATES:
        return Claim.FINISHED
    if state == JobState.RUNNING and record.updated_at >= stale_cutoff:
        return Claim.BUSY
    error = f"the job was started {attempts} times and its worker was lost each time; giving up"
    failed = update_job(
        database=database,
        job_id=job_id,
        expect_state=state,
        state=JobState.FAILED,
        error=f"{error}. The last time, {last_loss}" if last_loss else error,
    )
    return Claim.EXHAUSTED if failed else Claim.BUSY


def note_lost_worker(*, database: Database, job_id: str, reason: str) -> bool:
    """Record on a running job why its worker's process died (``reason``, e.g. killed by SIGKILL).

    The job stays ``running`` and keeps its ``updated_at``: whether and when it is taken over is still
    :func:`claim_job`'s to say. The next claim clears the note (the runner logs it first, see
    :func:`lost_worker_note`); the claim that gives up puts it in the job's error.
    """
    statement = (
        update(JobRecord)
        .where(JobRecord.id == job_id, JobRecord.state == JobState.RUNNING.value)
        .values(error=reason[:2000], updated_at=JobRecord.updated_at)  # not onupdate's now
    )
    with database.session() as session:
        result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
        return bool(result.rowcount)


def lost_worker_note(*, database: Database, job_id: str) -> str | None:
    """What :func:`note_lost_worker` recorded on job ``job_id`` while it is running, or None."""
    with database.session() as session:
        record = session.get(JobRecord, job_id)
        if record is None or record.state != JobState.RUNNING.value:
            return None
        return record.error


def requeue_lost_jobs(
    *,
    database: Database,
    enqueue: Enqueue,
    on_broker: Callable[[], set[str]],
    lost_after_s: float,
    stale_after_s: float,
    waiting: Callable[[], set[str]] | None = None,
) -> int:
    """Send again the jobs whose broker message is gone (a flushed or replaced Redis), or held by a
    lost worker.

    Candidates are queued jobs sent more than ``lost_after_s`` ago, and running jobs whose row
    has been silent for ``stale_after_s`` (a lost worker whose message went with the broker).
    ``on_broker`` names the job ids that have a message waiting in a queue or held unacked by a
    worker; only candidates outside it are sent. With ``waiting`` (the ids whose message waits in a
    queue, held ones left out), a silent running job is sent again unless a message waits for it:
    a live worker keeps its row fresh, so the message held for it is a killed worker's, which the
    broker would give back only after its visibility timeout (hours). A needless second message is
    harmless: the claim turns it away.
    """
    now = utcnow()
    statement = select(JobRecord.id, JobRecord.spec, JobRecord.state).where(
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
    queued = waiting() if waiting is not None else present
    sent = 0
    for job_id, spec, state in candidates:
        if job_id in (queued if state == JobState.RUNNING.value else present):
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
        if job_id in present:
            log.warning("job %s: its row has been silent for %.0f s, so its worker was lost; sent it again",
                        job_id, stale_after_s)
        else:
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
