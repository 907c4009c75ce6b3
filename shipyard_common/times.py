"""Datetimes as the APIs answer them: aware, in UTC.

The DateTime columns store naive UTC (:func:`shipyard_common.orm.utcnow`), and SQLite and PostgreSQL
both hand them back naive; rendered as they are, they carry no offset, fail OpenAPI's ``date-time``
format and read as local time in clients. Every public schema's datetime field is :data:`UtcDatetime`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC: a naive one is UTC already (what the platform stores), an aware one converted."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# Serialized by pydantic as ISO 8601 with ``Z``: ``2026-01-02T03:04:05.123456Z``.
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]
