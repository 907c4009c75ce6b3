"""The prediction log's shipper: a process that writes one serving process's journal to the database.

Why a process: the database writing (building rows, the driver's work, waiting for the database)
used to be a thread of the serving process, and every one of its steps took the GIL from the
event loop answering requests (about 20 µs per request, measured). Here the serving process
only copies each record into its journal (journal.py); this process, one per serving process,
started by :class:`~services.serving.prediction_log.PredictionLog`, follows the journal:

- every ``--flush-interval-s``, or sooner once a batch's worth is waiting or the serving process
  asks it to hurry (a request waits for room), it reads the complete records beyond the
  ``committed`` mark and inserts them in multi-row statements, ``--batch-size`` rows a batch;
- after each batch it moves the mark and the shared ``shipped`` count (the serving process's
  room) and deletes the segments behind the mark;
- when the database fails it keeps the batch and retries with back-off; meanwhile the journal's
  room fills and requests wait for it;
- the first batch of a shipper (and a batch retried after an error) leaves out rows already in the
  database: a shipper killed between its commit and its mark would otherwise have its successor
  write them twice;
- it exits once the serving process has closed the journal and everything is shipped, or when
  the serving process is gone, after shipping what it can (what it cannot stays in the journal
  for the next start to replay). It ignores SIGINT and SIGTERM: a signal to the process group is
  for the server, whose shutdown still needs it to ship the last records.

The database URL comes in the environment (``SHIPYARD_SHIPPER_DATABASE_URL``), not in argv,
where anyone on the machine could read a password.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.serving.predlog.journal import JournalTail
from shipyard_common.db import Database
from shipyard_common.records import PredictionRecord, Row, as_datetime, insert_rows

log = logging.getLogger("shipyard.serving.shipper")

DATABASE_URL_ENV = "SHIPYARD_SHIPPER_DATABASE_URL"
# How often it looks at the journal's progress file (closed, hurry, appended) and its parent:
# often while records wait (a request may be waiting for room), less when there are none.
_TICK_S = 0.01
_IDLE_TICK_S = 0.05
# Attempts at a batch once the serving process is gone, before leaving it to the next start.
_ORPHANED_ATTEMPTS = 5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.serving.predlog.shipper")
    parser.add_argument("--journal", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True, help="the serving process's pid")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--flush-interval-s", type=float, default=0.5)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from shipyard_common.logging import configure_logging

    configure_logging("serving-shipper", level=args.log_level, json_lines=args.log_json)
    url = os.environ.pop(DATABASE_URL_ENV, None)
    if not url:
        log.error("no database URL in %s", DATABASE_URL_ENV)
        return 2
    database = Database(url)
    try:
        Shipper(database, args.journal, parent=args.parent, batch_size=args.batch_size,
                flush_interval_s=args.flush_interval_s).run()
    finally:
        database.dispose()
    return 0


class Shipper:
    def __init__(
        self, database: Database, journal: Path, *, parent: int, batch_size: int, flush_interval_s: float
    ) -> None:
        self._database = database
        self._tail = JournalTail(journal)
        self._parent = parent
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._dedupe = True  # the first batch: see the module docstring

    def run(self) -> None:
        tail = self._tail
        try:
            last_ship = time.monotonic()
            seen_hurry = tail.hurry()
            while True:
                gone = os.getppid() != self._parent
                closed = tail.closed()
                hurry = tail.hurry()
                backlog = tail.appended() - tail.shipped
                if backlog > 0 and (gone or closed or hurry != seen_hurry or backlog >= self._batch_size
                                    or time.monotonic() - last_ship >= self._flush_interval_s):
                    seen_hurry = hurry
                    if not self._ship_all(orphaned=gone):
                        return  # orphaned, and the database will not take it: left for the next start
                    last_ship = time.monotonic()
                if gone:
                    return
                idle = tail.appended() == tail.shipped
                if closed and idle:
                    return
                time.sleep(_IDLE_TICK_S if idle and tail.hurry() == seen_hurry else _TICK_S)
        finally:
            tail.close()

    def _ship_all(self, *, orphaned: bool) -> bool:
        """Ship every complete record in the journal; False if it gave up (orphaned only)."""
        while True:
            records, lines, position = self._tail.take_rows(self._batch_size)
            if not lines:
                return True
            if records and not self._write(records, orphaned=orphaned):
                return False
            self._tail.commit(position, lines)
            if lines < self._batch_size:
                return True

    def _write(self, records: list[Row], *, orphaned: bool) -> bool:
        delay = 0.1
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._database.session() as session:
                    rows = fresh(session, records) if self._dedupe else records
                    if rows:
                        insert_rows(session, rows)
                self._dedupe = False
                return True
            except Exception as exc:
                # A failed commit may have gone through: the retry leaves out what is there.
                self._dedupe = True
                orphaned = orphaned or os.getppid() != self._parent
                if orphaned and attempt >= _ORPHANED_ATTEMPTS:
                    log.error("could not write %d prediction log rows after the serving process ended "
                              "(%s); left in its journal for the next start", len(records), exc)
                    return False
                log.warning("writing %d prediction log rows failed (%s); retrying in %.1fs",
                            len(records), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def fresh(session: Session, records: list[Row]) -> list[Row]:
    """``records`` less those already in the database (same request id, role, version and time)."""
    if not records:
        return records
    ids = {r[0] for r in records}
    present = {tuple(row) for row in session.execute(
        select(PredictionRecord.request_id, PredictionRecord.role, PredictionRecord.version,
               PredictionRecord.created_at).where(PredictionRecord.request_id.in_(ids))
    )}
    if not present:
        return records
    return [r for r in records if (r[0], r[3], r[2], as_datetime(r[7])) not in present]


if __name__ == "__main__":
    sys.exit(main())
