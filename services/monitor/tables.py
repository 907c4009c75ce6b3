"""The monitor's tables in the platform database: windows, ground truth, retraining policies and triggers.

The database is the record: a restarted monitor reads every verdict, label, policy and trigger back
from these rows, and nothing it answers is computed for the request that asks.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from shipyard_common.db import Base, utcnow

_ID = BigInteger().with_variant(Integer, "sqlite")


class WindowRecord(Base):
    """One closed window of one model version's logged predictions, and what was found in it.

    A window covers the prediction records ``first_prediction_id`` … ``last_prediction_id`` (the
    ids of :class:`~shipyard_common.records.PredictionRecord`) answered by ``version``. ``status``
    says whether drift could be computed (``ok``) or why not (``empty``, ``all_missing``,
    ``schema_change``, ``too_few_rows``, ``error``), with ``message`` for a person.
    The ``labelled`` … ``rmse`` columns are the live metrics from ground truth joined to the
    window's predictions (:mod:`services.monitor.feedback`); they change as late labels arrive.
    """

    __tablename__ = "monitor_windows"
    __table_args__ = (Index("ix_monitor_windows_model_version", "model", "version", "id"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(32))
    # How the window was closed: "rows" (a count reached) or "time" (its period ended).
    kind: Mapped[str] = mapped_column(String(8))
    first_prediction_id: Mapped[int | None] = mapped_column(_ID, nullable=True)
    last_prediction_id: Mapped[int | None] = mapped_column(_ID, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    ended_at: Mapped[datetime] = mapped_column(DateTime)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    rows: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    dataset: Mapped[str | None] = mapped_column(String(128), nullable=True)
    dataset_rev: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dataset_drift: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    drift_share: Mapped[float | None] = mapped_column(Float, nullable=True)
    drifted_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prediction_drift: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    prediction_drift_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Per feature: name, score, method, threshold, drifted (Evidently's verdicts).
    features: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # Data quality: missing / out-of-range shares, unseen categories, the schema found vs expected.
    quality: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Evidently's report of this window, relative to the monitor's report folder.
    report_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    computed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Live metrics from ground truth (None until a label for a row of this window arrives).
    labelled: Mapped[int] = mapped_column(Integer, default=0)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    f1: Mapped[float | None] = mapped_column(Float, nullable=True)
    mae: Mapped[float | None] = mapped_column(Float, nullable=True)
    rmse: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Classification: the labelled rows' confusion counts, [[true index, predicted index, count], …]
    # in the order of the version's classes, so that macro F1 over many windows is exact.
    confusion: Mapped[list[list[int]] | None] = mapped_column(JSON, nullable=True)
    # Null until the live metrics are computed; set back to null when a late label marks it for re-scoring.
    performance_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class FeedbackRecord(Base):
    """The true label (or value) of one row of one answered request (``X-Request-ID``)."""

    __tablename__ = "monitor_feedback"
    __table_args__ = (UniqueConstraint("request_id", "row", name="uq_monitor_feedback_request_row"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    row: Mapped[int] = mapped_column(Integer, default=0)
    label: Mapped[Any] = mapped_column(JSON)
    # Filled when joined to its prediction: the window it counts in, so late labels re-score it.
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    prediction_id: Mapped[int | None] = mapped_column(_ID, nullable=True, index=True)
    # Why this label cannot be scored (a class the version does not know, no such row …); kept, not lost.
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    created_by: Mapped[str | None] = mapped_column(String(128), nullable=True)


class PolicyRecord(Base):
    """When a model retrains by itself: drift for N windows, an accuracy floor, a schedule; a cooldown."""

    __tablename__ = "monitor_policies"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    drift_share_above: Mapped[float | None] = mapped_column(Float, nullable=True)
    consecutive_windows: Mapped[int] = mapped_column(Integer, default=3)
    accuracy_below: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_labelled: Mapped[int] = mapped_column(Integer, default=50)
    schedule_interval_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    cooldown_s: Mapped[float] = mapped_column(Float, default=3600.0)
    # Parameters passed on to the retrain flow (spec_overrides, promotion, timeout_s …).
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # The schedule counts from here until the model's first retraining.
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # A row every trigger decision updates first, so two monitors never start two retrainings.
    lock_version: Mapped[int] = mapped_column(Integer, default=0)


class TriggerRecord(Base):
    """One retraining the monitor started (or refused to start), its flow run and its outcome."""

    __tablename__ = "monitor_triggers"
    __table_args__ = (
        Index("ix_monitor_triggers_model_created", "model", "created_at"),
        # At most one retraining of a model at a time, whoever starts it: the model's name while
        # pending, started or running, null once it ended (nulls never clash).
        UniqueConstraint("active_model", name="uq_monitor_triggers_active_model"),
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(32))
    # What fired: "drift", "accuracy", "schedule", "manual".
    cause: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    # pending → started → running → completed | failed.
    state: Mapped[str] = mapped_column(String(16), index=True)
    active_model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    flow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The run's page in Prefect's UI.
    flow_run_url: Mapped[str | None] = mapped_column(String(512), nullable=True)
    # The retrain flow's parameters as sent (model_name, parent_version, reason and the policy's).
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # What the retrain flow produced: job id, new version, promotion request id; or why it failed.
    outcome: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    window_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # Who asked: a person's name (manual), else "monitor".
    created_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
