"""Where one (model, version)'s windows start and end: by a count of rows, or by fixed periods of time.

By rows: a window takes the requests logged after the previous window's last prediction id, in id
order, until it holds at least N rows (a request's batch is never split). By time: periods of S
seconds aligned on the Unix epoch, ``[start, end)`` by the time each request was answered; a
period with no rows is an ``empty`` window while the version holds an alias (a run of empty
periods is one window), and is skipped once it does not. Either way only requests answered at
least ``grace`` ago are taken: the prediction log is written a moment after the answer. By rows,
the rows a version has left once it lost its alias are its last window, however few.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from services.monitor.tables import WindowRecord
from shipyard_common.records import PredictionRecord as P

ROWS = "rows"
TIME = "time"


class rows_of(FunctionElement[int]):  # noqa: N801  (an SQL function's name)
    """The rows of one logged request: its batch length; for named inputs (``{name: array}``: a
    table's columns, or a model's several inputs), the length of the first; 1 for anything else."""

    type = Integer()
    inherit_cache = True


@compiles(rows_of, "postgresql")
def _rows_of_postgresql(element: rows_of, compiler: Any, **kw: Any) -> str:
    value = compiler.process(element.clauses, **kw)
    first = (f"(SELECT CASE json_typeof(e.value) WHEN 'array' THEN json_array_length(e.value) ELSE 1 END "
             f"FROM json_each({value}) AS e LIMIT 1)")
    return (f"(CASE json_typeof({value}) WHEN 'array' THEN json_array_length({value}) "
            f"WHEN 'object' THEN COALESCE({first}, 1) ELSE 1 END)")


@compiles(rows_of)
def _rows_of_sqlite(element: rows_of, compiler: Any, **kw: Any) -> str:
    value = compiler.process(element.clauses, **kw)
    first = (f"(SELECT CASE e.type WHEN 'array' THEN json_array_length(e.value) ELSE 1 END "
             f"FROM json_each({value}) AS e LIMIT 1)")
    return (f"(CASE json_type({value}) WHEN 'array' THEN json_array_length({value}) "
            f"WHEN 'object' THEN COALESCE({first}, 1) ELSE 1 END)")


@dataclass(frozen=True)
class Due:
    """A window to close: its bounds and what the log holds in it (no rows: an empty window)."""

    kind: str
    started_at: datetime
    ended_at: datetime
    first_id: int | None = None
    last_id: int | None = None
    requests: int = 0
    rows: int = 0
    periods: int = 1


@dataclass(frozen=True)
class Plan:
    due: list[Due]
    pending_rows: int


@dataclass(frozen=True)
class Cursor:
    """Where a version's windows stand: the last prediction id in one, the newest window's end and kind."""

    last_id: int | None
    ended_at: datetime | None
    kind: str | None


def read_cursor(session: Session, *, model: str, version: str) -> Cursor:
    newest = session.execute(
        select(WindowRecord.ended_at, WindowRecord.kind)
        .where(WindowRecord.model == model, WindowRecord.version == version)
        .order_by(WindowRecord.id.desc()).limit(1)
    ).first()
    last_id = session.scalar(
        select(func.max(WindowRecord.last_prediction_id))
        .where(WindowRecord.model == model, WindowRecord.version == version)
    )
    if newest is None:
        return Cursor(last_id=None, ended_at=None, kind=None)
    return Cursor(last_id=last_id, ended_at=newest.ended_at, kind=newest.kind)


def plan_rows(
    session: Session, *, model: str, version: str, after_id: int | None, size: int, until: datetime,
    most: int, served: bool = True,
) -> Plan:
    """Up to ``most`` windows of at least ``size`` rows each, of requests answered before ``until``.

    A version that no longer holds an alias gets no more rows: what it has left once ``until``
    passed its last request is its last window, however few rows it holds.
    """
    found = session.execute(
        select(P.id, rows_of(P.inputs), P.created_at)
        .where(P.model == model, P.version == version, P.id > (after_id or 0))
        .order_by(P.id).limit(most * size + 1)
    ).all()
    due: list[Due] = []
    batch: list[Sequence[Any]] = []
    held = pending = 0
    for index, (_, rows, created_at) in enumerate(found):
        if len(due) >= most or created_at > until:
            pending += sum(int(row[1]) for row in found[index:])
            break
        batch.append(found[index])
        held += int(rows)
        if held >= size:
            due.append(_rows_window(batch))
            batch, held = [], 0
    if batch and not served and not pending and len(due) < most:
        due.append(_rows_window(batch))
        held = 0
    return Plan(due=due, pending_rows=pending + held)


def _rows_window(batch: Sequence[Sequence[Any]]) -> Due:
    return Due(kind=ROWS, started_at=batch[0][2], ended_at=max(row[2] for row in batch),
               first_id=int(batch[0][0]), last_id=int(batch[-1][0]), requests=len(batch),
               rows=sum(int(row[1]) for row in batch))


def period_floor(moment: datetime, seconds: float) -> datetime:
    """The start of the period of ``seconds`` (aligned on the Unix epoch) that holds ``moment``."""
    stamp = moment.replace(tzinfo=UTC).timestamp()
    return datetime.fromtimestamp(math.floor(stamp / seconds) * seconds, UTC).replace(tzinfo=None)


def plan_time(
    session: Session, *, model: str, version: str, cursor: Cursor, seconds: float, until: datetime,
    served: bool, most: int, tally: Tally | None = None,
) -> Plan:
    """Up to ``most`` windows of the periods of ``seconds`` that ended before ``until``."""
    key = (P.model == model, P.version == version)
    start = _time_start(session, key, cursor, seconds)
    due: list[Due] = []
    while start is not None and len(due) < most:
        end = period_floor(start, seconds) + timedelta(seconds=seconds)
        if end > until:
            break
        window = _aggregate(session, key, start, end)
        if window is not None:
            due.append(window)
            start = end
            continue
        following = session.scalar(select(func.min(P.created_at)).where(*key, P.created_at >= end))
        # Up to the period of the next request, and never past the last period closed by now.
        resume = period_floor(min(following or until, until), seconds)
        if served:
            periods = max(1, round((resume - start).total_seconds() / seconds))
            due.append(Due(kind=TIME, started_at=start, ended_at=resume, periods=periods))
        start = resume if served or following is not None else None
    return Plan(due=due, pending_rows=_pending_since(session, key, start or until, tally))


@dataclass
class Tally:
    """Rows logged since ``since`` up to prediction id ``scanned_id``: each pass adds only the new ones."""

    since: datetime
    scanned_id: int = 0
    rows: int = 0


def _pending_since(session: Session, key: tuple[Any, ...], since: datetime, tally: Tally | None) -> int:
    """Rows answered since ``since`` (the open period); ``tally`` carries the count between passes,
    so that a long period's rows are not all counted again on every pass."""
    if tally is None:
        return int(session.scalar(
            select(func.coalesce(func.sum(rows_of(P.inputs)), 0)).where(*key, P.created_at >= since)
        ) or 0)
    if tally.since != since:
        tally.since, tally.scanned_id, tally.rows = since, 0, 0
    newest, rows = session.execute(
        select(func.max(P.id), func.coalesce(func.sum(rows_of(P.inputs)), 0))
        .where(*key, P.created_at >= since, P.id > tally.scanned_id)
    ).one()
    if newest is not None:
        tally.scanned_id, tally.rows = int(newest), tally.rows + int(rows)
    return tally.rows


def _time_start(session: Session, key: tuple[Any, ...], cursor: Cursor, seconds: float) -> datetime | None:
    if cursor.ended_at is not None:
        # After a window by rows (the settings changed), its last request must not count twice.
        return cursor.ended_at + (timedelta(microseconds=1) if cursor.kind == ROWS else timedelta())
    first = session.scalar(select(func.min(P.created_at)).where(*key))
    return None if first is None else period_floor(first, seconds)


def _aggregate(session: Session, key: tuple[Any, ...], start: datetime, end: datetime) -> Due | None:
    requests, rows, first_id, last_id = session.execute(
        select(func.count(), func.coalesce(func.sum(rows_of(P.inputs)), 0), func.min(P.id), func.max(P.id))
        .where(*key, P.created_at >= start, P.created_at < end)
    ).one()
    if not requests:
        return None
    return Due(kind=TIME, started_at=start, ended_at=end, first_id=int(first_id), last_id=int(last_id),
               requests=int(requests), rows=int(rows))
