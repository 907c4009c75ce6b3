"""Claiming a job: one delivery runs it, a duplicate does not, a lost worker's job is taken over."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.trainer.api import service
from services.trainer.jobs import store
from services.trainer.jobs.schemas import JobCreate, JobState
from services.trainer.jobs.store import Claim
from shipyard_common.db import Database, utcnow
from tests.services.trainer.support import job_spec

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def database(db_url: str):
    database = Database(db_url)
    database.create_tables()
    yield database
    database.dispose()


def new_job(database: Database) -> str:
    sent: list[tuple[str, str]] = []
    job = service.create_job(
        database=database, spec=JobCreate.model_validate(job_spec(rev=REV)),
        enqueue=lambda job_id, queue: sent.append((job_id, queue)),
    )
    assert sent == [(job.id, "cpu")]
    return job.id


def age(database: Database, job_id: str, seconds: float) -> None:
    from sqlalchemy import update

    from services.trainer.jobs.tables import JobRecord

    with database.session() as session:
        session.execute(
            update(JobRecord).where(JobRecord.id == job_id)
            .values(updated_at=utcnow() - timedelta(seconds=seconds))
        )


def claim(database: Database, job_id: str, *, stale_after_s: float = 60, max_attempts: int = 3) -> Claim:
    return store.claim_job(
        database=database, job_id=job_id, stale_after_s=stale_after_s, max_attempts=max_attempts
    )


def test_second_delivery_does_not_run_a_running_job(database):
    job_id = new_job(database)
    assert claim(database, job_id) == Claim.CLAIMED
    assert claim(database, job_id) == Claim.BUSY
    assert store.get_job(database=database, job_id=job_id).state == JobState.RUNNING


def test_a_silent_running_job_is_taken_over_until_attempts_run_out(database):
    job_id = new_job(database)
    assert claim(database, job_id, max_attempts=2) == Claim.CLAIMED
    age(database, job_id, 120)
    assert claim(database, job_id, max_attempts=2) == Claim.CLAIMED
    age(database, job_id, 120)
    assert claim(database, job_id, max_attempts=2) == Claim.EXHAUSTED
    job = store.get_job(database=database, job_id=job_id)
    assert job.state == JobState.FAILED and "2 times" in (job.error or "")


def test_finished_and_unknown_jobs_are_not_claimed(database):
    job_id = new_job(database)
    assert claim(database, job_id) == Claim.CLAIMED
    assert store.update_job(
        database=database, job_id=job_id, expect_state=JobState.RUNNING, state=JobState.SUCCEEDED
    )
    # A writer that expects the job to be running no longer touches it.
    assert not store.update_job(
        database=database, job_id=job_id, expect_state=JobState.RUNNING, error="x"
    )
    assert claim(database, job_id, stale_after_s=0) == Claim.FINISHED
    assert claim(database, "nope") == Claim.MISSING
