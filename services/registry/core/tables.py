"""The registry's rows in the platform database: alias moves (the audit), promotion requests,
gates, per-model locks and web UI sessions. MLflow keeps models, versions and aliases; these
tables keep only what MLflow has no place for."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Index, Integer, String, Text, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from shipyard_common.db import Base, utcnow

_ID = BigInteger().with_variant(Integer, "sqlite")


class AuditRecord(Base):
    """One registry change: an alias move, an alias removal, or a version archived/restored.

    ``action``: ``promote`` (the alias now names ``version``), ``rollback`` (the same, back to
    the version production named before), ``remove`` (the alias, which named ``version``, was
    deleted), ``archive`` / ``restore`` (``alias`` is empty). ``request_id`` names the approved
    promotion request behind a move; ``direct`` marks an admin's move without one.
    """

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_model_at", "model", "at"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(32))
    alias: Mapped[str] = mapped_column(String(32))
    previous_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    action: Mapped[str] = mapped_column(String(16), default="promote", server_default="promote")
    weight: Mapped[float | None] = mapped_column(Float, nullable=True)
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    request_id: Mapped[int | None] = mapped_column(_ID, nullable=True)
    direct: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class PromotionRequestRecord(Base):
    """A request to point an alias at a version, waiting for (or given) a second person's decision.

    ``state``: ``pending`` → ``approved`` | ``rejected`` | ``cancelled`` (by its requester).
    """

    __tablename__ = "promotion_requests"
    __table_args__ = (Index("ix_promotion_requests_model_state", "model", "state"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(32))
    alias: Mapped[str] = mapped_column(String(32))
    weight: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(String(128))
    requested_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    decided_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    decision_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class GateRecord(Base):
    """A model's promotion gate: rules over a candidate version's metrics, set by an admin."""

    __tablename__ = "promotion_gates"

    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    rules: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    aliases: Mapped[list[str]] = mapped_column(JSON)
    updated_by: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ModelLockRecord(Base):
    """One row per model, updated first in every transaction that moves one of its aliases.

    The update takes the row's lock on PostgreSQL and the write lock on SQLite, so alias moves
    of one model are serialised across threads, processes and hosts.
    """

    __tablename__ = "registry_model_locks"

    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    generation: Mapped[int] = mapped_column(_ID, default=0)


class UiSessionRecord(Base):
    """A signed-in browser: the cookie holds a key; the row, only that key's hash and what it unlocks.

    ``token_sealed`` is the user's API token encrypted with a key that only the cookie carries, so
    the database alone never yields a usable token.
    """

    __tablename__ = "ui_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    principal: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    token_sealed: Mapped[str] = mapped_column(Text)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


# Columns added to the audit table after its first release: an older database gets them on start.
_ADDED_COLUMNS = {
    "action": "VARCHAR(16) NOT NULL DEFAULT 'promote'",
    "weight": "FLOAT",
    "request_id": "BIGINT",
    "direct": "BOOLEAN NOT NULL DEFAULT false",
}


def upgrade_audit_table(engine: Engine) -> None:
    """Add the columns an audit table created by an older release lacks."""
    present = {column["name"] for column in inspect(engine).get_columns(AuditRecord.__tablename__)}
    missing = [name for name in _ADDED_COLUMNS if name not in present]
    if not missing:
        return
    with engine.begin() as connection:
        for name in missing:
            connection.execute(
                text(f"ALTER TABLE {AuditRecord.__tablename__} ADD COLUMN {name} {_ADDED_COLUMNS[name]}")
            )
