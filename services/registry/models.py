from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Float, Index, Integer, String, Text, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from shipyard_common.db import Base, utcnow


class AuditRecord(Base):
    """One alias move: who pointed which alias of which model at which version, and why.

    ``action`` is ``promote`` (the alias now names ``version``) or ``remove`` (the alias, which
    named ``version``, was deleted); ``weight`` is the canary weight a canary promotion set.
    """

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_model_at", "model", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(32))
    alias: Mapped[str] = mapped_column(String(32))
    previous_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    action: Mapped[str] = mapped_column(String(16), default="promote", server_default="promote")
    weight: Mapped[float | None] = mapped_column(Float, nullable=True)
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# Columns added after the table's first release: an older database gets them on start.
_ADDED_COLUMNS = {
    "action": "VARCHAR(16) NOT NULL DEFAULT 'promote'",
    "weight": "FLOAT",
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
