from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shipyard_common.db import Base, utcnow


class JobRecord(Base):
    """A training job. This row, not the Celery message, is the record of the job."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model_name: Mapped[str] = mapped_column(String(128), index=True)
    model_version: Mapped[str | None] = mapped_column(String(32), default=None)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), default=None)
    device: Mapped[str | None] = mapped_column(String(32), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # How many workers have started this job; a redelivered task after a lost worker adds one.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Null until the broker has accepted the task: the reconciler re-sends such jobs.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class JobLogRecord(Base):
    """One log line a worker wrote while running a job; ``line`` counts from 1 per job."""

    __tablename__ = "job_logs"
    __table_args__ = (UniqueConstraint("job_id", "line", name="uq_job_logs_job_line"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    line: Mapped[int] = mapped_column(Integer)
    level: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
