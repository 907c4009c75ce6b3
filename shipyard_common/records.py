"""Tables more than one service reads: events and the prediction log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from shipyard_common.orm import Base, utcnow


class EventRecord(Base):
    """Every event published on the bus, so that a lost Redis message can be replayed."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    type: Mapped[str] = mapped_column(String(64), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class PredictionRecord(Base):
    """One answered prediction request: what came in, what went out, who answered."""

    __tablename__ = "predictions"
    __table_args__ = (Index("ix_predictions_model_created", "model", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(16), default="production")
    inputs: Mapped[list[Any]] = mapped_column(JSON)
    outputs: Mapped[list[Any]] = mapped_column(JSON)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
