"""The prediction log: every answered request, written to the database off the request path.

Requests hand their record to a bounded queue; one writer thread drains it in batches. When the
database falls behind and the queue fills, requests wait for room rather than lose their record:
the monitor computes drift from this log, and a log that silently drops rows under load would
hide exactly the traffic worth watching. Closing the log writes everything still queued.

With a :class:`~services.serving.journal.Journal`, each record is also appended to a local file
before the request is answered, and what a crashed process left there is written at the next
start: an answered request's record survives ``kill -9`` too.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import insert
from sqlalchemy.orm import Session

from services.serving.journal import Journal, orphans
from shipyard_common.db import Database
from shipyard_common.errors import Unavailable
from shipyard_common.records import PredictionRecord

log = logging.getLogger("shipyard.serving.prediction_log")

_CLOSE = object()
# Attempts to write a batch while shutting down, before the rows are given up as lost.
_SHUTDOWN_WRITE_ATTEMPTS = 5


class PredictionLog:
    def __init__(
        self,
        database: Database,
        *,
        capacity: int,
        batch_size: int,
        flush_interval_s: float,
        journal_dir: Path | None = None,
    ) -> None:
        self._database = database
        self._journal_dir = journal_dir
        self._journal: Journal | None = None
        # Unbounded itself: room is counted by ``_room``, so that the event loop can hold a place
        # before running a model (``try_reserve``) and never find the log full after the work is done.
        self._queue: queue.Queue[Any] = queue.Queue()
        self._room = threading.Semaphore(capacity)
        self._batch_size = batch_size
        # Set by producers once a batch's worth is queued (or the queue is full), and by close().
        self._wake = threading.Event()
        self._wake_at = min(batch_size, capacity)
        self._flush_interval_s = flush_interval_s
        # Held while putting, so that close() cannot slip its marker ahead of a record being added.
        self._accepting = threading.Lock()
        self._closed = False
        self._closing = threading.Event()
        self._writer: threading.Thread | None = None
        self.written = 0
        self.recovered = 0
        self._gave_up = False

    def start(self) -> None:
        if self._journal_dir is not None:
            self.recovered = replay_orphans(self._database, self._journal_dir)
            self._journal = Journal(self._journal_dir)
        self._writer = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)
        self._writer.start()

    def pending(self) -> int:
        return self._queue.qsize()

    def append(self, record: dict[str, Any], *, reserved: bool = False) -> None:
        """Queue one row of the ``predictions`` table; waits for room unless ``reserved`` already holds it."""
        if not reserved:
            self._room.acquire()
        with self._accepting:
            if self._closed:
                self._room.release()
                raise Unavailable("serving is shutting down and no longer logs predictions")
            offset = self._journal.append(record) if self._journal is not None else 0
            self._queue.put_nowait((record, offset))
            if len(self._queue.queue) >= self._wake_at:
                self._wake.set()

    def try_reserve(self) -> bool:
        """Hold room for one record without waiting; False when the log is full.

        For the event loop, which must never block: it reserves before running the model, so a
        full log sends the request to a thread before any work is done (none is done twice). The
        place is used by ``append(record, reserved=True)`` or given back by :meth:`release`.
        """
        return self._room.acquire(blocking=False)

    def release(self) -> None:
        """Give back room reserved by :meth:`try_reserve` and not used."""
        self._room.release()

    def close(self, timeout: float | None = 60) -> None:
        """Stop accepting records, write every queued one, and stop the writer."""
        # Set first: a writer stuck retrying a dead database then gives up, which frees room for
        # the producers waiting for it (they find the log closed and say so).
        self._closing.set()
        with self._accepting:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_CLOSE)
            self._wake.set()
        if self._writer is not None:
            self._writer.join(timeout)
            if self._writer.is_alive():
                log.error("the prediction log writer did not finish in %ss; %d rows unwritten",
                          timeout, self.pending())
        if self._journal is not None:
            # Rows the database did not take stay in the journal for the next start to write.
            self._journal.close(remove=self.pending() == 0 and not self._gave_up)

    def _run(self) -> None:
        while True:
            batch, closing = self._next_batch()
            if batch:
                self._write(batch)
            if closing:
                return

    def _next_batch(self) -> tuple[list[tuple[dict[str, Any], int]], bool]:
        """Up to one batch: waits for a first record, then takes what is queued up to the flush time.

        Between the first record and the flush time it sleeps until a batch's worth is queued (the
        producers wake it then), rather than waking for every record: each wake-up would take the
        GIL from the requests in the middle of their work.
        """
        batch: list[tuple[dict[str, Any], int]] = []
        item = self._queue.get()
        if item is _CLOSE:
            return batch, True
        batch.append(item)
        self._room.release()
        deadline = time.monotonic() + self._flush_interval_s
        while True:
            if self._take_queued(batch):
                # Everything put before the marker is already out of the queue or in this batch.
                return batch, True
            remaining = deadline - time.monotonic()
            if len(batch) >= self._batch_size or remaining <= 0:
                return batch, False
            self._wake.wait(remaining)
            self._wake.clear()

    def _take_queued(self, batch: list[tuple[dict[str, Any], int]]) -> bool:
        """Move what is queued into ``batch`` (up to the batch size) in one step; True at the close marker.

        One lock round for many records instead of a ``get`` each: the writer shares the GIL with
        the requests, so its per-record overhead is theirs too.
        """
        q = self._queue
        taken = 0
        closing = False
        with q.mutex:
            while q.queue and len(batch) < self._batch_size:
                item = q.queue.popleft()
                if item is _CLOSE:
                    closing = True
                    break
                batch.append(item)
                taken += 1
        if taken:
            self._room.release(taken)  # producers waiting for room go on
        return closing

    def _write(self, entries: list[tuple[dict[str, Any], int]]) -> None:
        batch = [record for record, _ in entries]
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._database.session() as session:
                    _insert(session, batch)
                break
            except Exception as exc:
                if self._closing.is_set() and attempt >= _SHUTDOWN_WRITE_ATTEMPTS:
                    kept = "kept in the journal for the next start" if self._journal else "lost"
                    log.error("could not write %d prediction log rows at shutdown (%s): %s",
                              len(batch), kept, exc)
                    self._gave_up = True
                    return
                # Keep the batch and retry: the queue fills meanwhile, and requests wait for room.
                log.warning("writing %d prediction log rows failed (%s); retrying in %.1fs",
                            len(batch), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.written += len(batch)
        if self._journal is not None:
            self._journal.committed(entries[-1][1])


# SQLite allows 32766 parameters per statement (8 per row).
_ROWS_PER_STATEMENT = 1000
_COLUMNS = ("request_id", "model", "version", "role", "inputs", "outputs", "latency_ms", "created_at")


def _insert(session: Session, batch: list[dict[str, Any]]) -> None:
    """Insert ``batch`` into the predictions table: multi-row INSERTs of up to 1000 rows.

    On SQLite and PostgreSQL the rows go straight to the driver, with the JSON columns encoded
    by orjson (SQLAlchemy's per-row parameter processing, ``json.dumps`` and, on SQLite, datetime
    formatting cost ~25 µs of Python per row, under the GIL the requests need). The stored values
    are what SQLAlchemy would store (SQLite keeps datetimes as ``YYYY-MM-DD HH:MM:SS.ffffff``),
    except for JSON whitespace, and NaN/±Inf in JSON (only with ``allow_non_finite``) become null.
    Other databases go through SQLAlchemy's insert.
    """
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name not in ("sqlite", "postgresql"):
        session.execute(insert(PredictionRecord), batch)
        return
    sqlite = dialect.name == "sqlite"
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    one_row = f"({', '.join([mark] * len(_COLUMNS))})"
    head = f"INSERT INTO {PredictionRecord.__tablename__} ({', '.join(_COLUMNS)}) VALUES "
    dumps = orjson.dumps
    option = orjson.OPT_SERIALIZE_NUMPY
    for start in range(0, len(batch), _ROWS_PER_STATEMENT):
        chunk = batch[start:start + _ROWS_PER_STATEMENT]
        params: list[Any] = []
        for record in chunk:
            created = record["created_at"]
            params.extend((
                record["request_id"], record["model"], record["version"], record.get("role", "production"),
                dumps(record["inputs"], option=option).decode(),
                dumps(record["outputs"], option=option).decode(),
                record["latency_ms"],
                created.isoformat(sep=" ", timespec="microseconds") if sqlite else created,
            ))
        # One multi-row statement, not executemany: the driver releases the GIL once per statement
        # run, and per-row releases would hand the GIL back and forth with the requests.
        connection.exec_driver_sql(head + ", ".join([one_row] * len(chunk)), tuple(params))


def replay_orphans(database: Database, folder: Path) -> int:
    """Write the journalled records that crashed processes left in ``folder``; how many.

    A process may have died after its batch was committed but before it marked the journal, so
    rows already present (same request id, role, version and time) are not written twice.
    """
    from sqlalchemy import select

    total = 0
    for path, records in orphans(folder):
        fresh: list[dict[str, Any]] = []
        if records:
            ids = {r["request_id"] for r in records}
            with database.session() as session:
                present = {tuple(row) for row in session.execute(
                    select(PredictionRecord.request_id, PredictionRecord.role, PredictionRecord.version,
                           PredictionRecord.created_at).where(PredictionRecord.request_id.in_(ids))
                )}
                fresh = [r for r in records
                         if (r["request_id"], r["role"], r["version"], r["created_at"]) not in present]
                if fresh:
                    session.execute(insert(PredictionRecord), fresh)
        total += len(fresh)
        if fresh:
            log.warning("wrote %d prediction log rows that a stopped process left in %s",
                        len(fresh), path.name)
    return total
