"""The declarative base every table of the platform is declared on, and the clock its rows use.

Apart from :mod:`shipyard_common.db` so that :mod:`shipyard_common.records` can declare its tables
without importing the module that creates them (no import cycle); ``shipyard_common.db`` re-exports both.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import DeclarativeBase

# The largest value a BIGINT column (PostgreSQL's, and SQLite's INTEGER) holds: integers that reach a
# query, ids and offsets alike, are bounded by it where they enter (a 422), not by the driver's
# OverflowError (a 500).
MAX_BIGINT = 2**63 - 1


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    """Now in UTC, naive: what the DateTime columns store."""
    return datetime.now(UTC).replace(tzinfo=None)
