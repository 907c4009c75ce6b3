"""Tables more than one service reads: events and the prediction log; and the one writer of
prediction log rows, which serving's shipper and the batch scoring flow both call."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import JSON, BigInteger, DateTime, Float, Index, Integer, String, insert
from sqlalchemy.orm import Mapped, Session, mapped_column

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


# -- writing prediction log rows ------------------------------------------------------------------

#: A record as the predictions table's columns, in this order: request_id, model, version, role,
#: inputs and outputs (JSON text), latency_ms, created_at (as written: seconds since the epoch,
#: an ISO string, or a datetime).
Row = tuple[str, str, str, str, str, str, float, Any]
ROW_COLUMNS = ("request_id", "model", "version", "role", "inputs", "outputs", "latency_ms", "created_at")


def record_of(found: Row) -> dict[str, Any]:
    """A :data:`Row` as a record: its inputs and outputs parsed, ``created_at`` a naive UTC datetime."""
    record = dict(zip(ROW_COLUMNS, found, strict=True))
    record["inputs"] = orjson.loads(record["inputs"])
    record["outputs"] = orjson.loads(record["outputs"])
    record["created_at"] = as_datetime(record["created_at"])
    return record


def as_datetime(created: Any) -> Any:
    """A record's ``created_at`` as the naive UTC datetime the table holds: from seconds since the
    epoch (what the data plane records: a clock read, no datetime per request) or an ISO string."""
    if isinstance(created, str):
        return datetime.fromisoformat(created).replace(tzinfo=None)
    if isinstance(created, int | float):
        return datetime.fromtimestamp(created, UTC).replace(tzinfo=None)
    return created


# SQLite allows 32766 parameters per statement (8 per row).
_ROWS_PER_STATEMENT = 1000


def insert_rows(session: Session, batch: list[Row]) -> None:
    """Insert ``batch`` into the predictions table: multi-row INSERTs of up to 1000 rows.

    On SQLite and PostgreSQL the rows go straight to the driver: the inputs and outputs as the
    journal holds them (JSON text), SQLite's times formatted here (SQLAlchemy's per-row parameter
    processing, ``json.dumps`` and datetime formatting cost ~25 µs of Python per row). The stored
    values are what SQLAlchemy would store (SQLite keeps datetimes as ``YYYY-MM-DD
    HH:MM:SS.ffffff``), except for JSON whitespace, and NaN/±Inf in JSON (only with
    ``allow_non_finite``) become null. Other databases go through SQLAlchemy's insert.
    """
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name not in ("sqlite", "postgresql"):
        session.execute(insert(PredictionRecord), [record_of(row) for row in batch])
        return
    sqlite = dialect.name == "sqlite"
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    one_row = f"({', '.join([mark] * len(ROW_COLUMNS))})"
    head = f"INSERT INTO {PredictionRecord.__tablename__} ({', '.join(ROW_COLUMNS)}) VALUES "
    time_of = _SqliteTime() if sqlite else as_datetime
    for start in range(0, len(batch), _ROWS_PER_STATEMENT):
        chunk = batch[start:start + _ROWS_PER_STATEMENT]
        params: list[Any] = []
        for row in chunk:
            params += row
            params[-1] = time_of(params[-1])  # created_at, the last column
        # One multi-row statement, not executemany: one round trip for many rows.
        connection.exec_driver_sql(head + ", ".join([one_row] * len(chunk)), tuple(params))


class _SqliteTime:
    """A record's time as SQLAlchemy writes a naive UTC datetime to SQLite: ``YYYY-MM-DD HH:MM:SS.ffffff``.

    From seconds since the epoch (the journal's), with the date and time of the last second
    kept: the records of a batch mostly share their second.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._prefix = ""

    def __call__(self, created: Any) -> str:
        if type(created) is not float:
            return str(as_datetime(created).isoformat(sep=" ", timespec="microseconds"))
        # Rounded as datetime.fromtimestamp rounds (half to even, on the microseconds).
        fraction, whole = math.modf(created)
        micros = round(fraction * 1e6)
        second = int(whole)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        elif micros < 0:
            second, micros = second - 1, micros + 1_000_000
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S.")
        return f"{self._prefix}{micros:06d}"
