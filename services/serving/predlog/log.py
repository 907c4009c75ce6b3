"""The prediction log: every answered request, written to the database off the request path.

Each answered request's record is copied into this process's journal (journal.py: a memory
copy into a shared mapping of a file, no system call) before the answer goes out; a shipper
process (shipper.py), one per serving process, follows the journal and inserts the records
into the database in batches. The database work is in another process because a thread here
would share the GIL with the event loop: building rows and driving the database took ~20 µs
of the requests' time per record. So ``append`` is a room check, an orjson dump, the copy and
a counter: no queue, no lock but the journal's, no thread to wake.

Room: this process may be at most ``capacity`` records ahead of the database (``appended`` less
``shipped``, the count the shipper keeps in the journal's shared progress file). When the
database falls behind and the room fills, requests wait for room rather than lose their record:
the monitor computes drift from this log, and a log that silently drops rows under load would
hide exactly the traffic worth watching. The event loop never waits: it reserves a place with
:meth:`PredictionLog.try_reserve` before running a model, and a full log sends the request to
a thread, whose ``append`` waits.

A shipper that dies is started again (by a watch thread that looks every second, and by any
``append`` waiting for room); the new one resumes from the journal's ``committed`` mark, leaving
out rows its predecessor wrote but did not mark. Closing the log waits for the shipper to ship
everything and end; what it could not ship stays in the journal, and what a crashed process
left there is written at the next start (:func:`replay_orphans`): an answered request's record
survives ``kill -9`` too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from services.serving.predlog.journal import Journal, JournalClosed, orphans
from services.serving.predlog.records import dumps, row_of
from services.serving.predlog.shipper import DATABASE_URL_ENV, fresh
from shipyard_common.db import Database
from shipyard_common.errors import Unavailable
from shipyard_common.records import Row, insert_rows

log = logging.getLogger("shipyard.serving.prediction_log")

# How long an append without room sleeps before looking again.
_WAIT_S = 0.001
# A shipper that ended is started again at most this often.
_RESTART_INTERVAL_S = 0.5
_WATCH_INTERVAL_S = 1.0
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class PredictionLog:
    def __init__(
        self,
        database: Database,
        *,
        capacity: int,
        batch_size: int,
        flush_interval_s: float,
        journal_dir: Path,
    ) -> None:
        self._database = database
        self._journal_dir = journal_dir
        self._journal: Journal | None = None
        self._capacity = capacity
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._shipper: subprocess.Popen[bytes] | None = None
        self._shipper_lock = threading.Lock()
        self._shipper_started_at = 0.0
        self._stop_watch = threading.Event()
        self._watch: threading.Thread | None = None
        self._closed = False
        # Kept once the journal is closed.
        self._final_written = 0
        self._final_pending = 0
        self.recovered = 0

    @property
    def written(self) -> int:
        """Rows the database has taken from this process's journal."""
        journal = self._journal
        if journal is None or self._closed:
            return self._final_written
        return journal.shipped()

    def start(self) -> None:
        self.recovered = replay_orphans(self._database, self._journal_dir)
        self._journal = Journal(self._journal_dir, capacity=self._capacity)
        self._start_shipper()
        self._watch = threading.Thread(target=self._watch_shipper, name="prediction-log-shipper-watch",
                                       daemon=True)
        self._watch.start()

    def pending(self) -> int:
        """Records appended and not yet in the database."""
        journal = self._journal
        if journal is None or self._closed:
            return self._final_pending
        return journal.pending()

    def append(self, record: dict[str, Any], *, reserved: bool = False) -> None:
        """Journal one row of the ``predictions`` table; waits for room unless ``reserved`` holds it."""
        journal = self._journal
        if journal is None:
            raise Unavailable("the prediction log is not started")
        line = dumps(record)
        try:
            if journal.append_line(line, reserved=reserved) is not None:
                return
            # Full: the shipper is behind. Wait for it (requests slow down, records are kept).
            while True:
                journal.hurry()
                self._ensure_shipper()
                time.sleep(_WAIT_S)
                if journal.append_line(line) is not None:
                    return
        except JournalClosed:
            raise Unavailable("serving is shutting down and no longer logs predictions") from None

    def append_reserved(self, records: list[dict[str, Any]]) -> None:
        """Journal several rows, in one copy, into places held by ``try_reserve(len(records))``."""
        journal = self._journal
        if journal is None:
            raise Unavailable("the prediction log is not started")
        try:
            lines = dumps(records[0]) if len(records) == 1 else b"".join([dumps(rec) for rec in records])
            journal.append_lines(lines, len(records), reserved=True)
        except JournalClosed:
            raise Unavailable("serving is shutting down and no longer logs predictions") from None

    def try_reserve(self, count: int = 1) -> bool:
        """Hold room for ``count`` records without waiting; False (nothing held) when the log is full.

        For the event loop, which must never block: it reserves before running the model, so a
        full log sends the request to a thread before any work is done (none is done twice). The
        place is used by ``append(record, reserved=True)`` or given back by :meth:`release`.
        """
        journal = self._journal
        if journal is None:
            return False
        if journal.try_reserve(count):
            return True
        journal.hurry()
        return False

    def release(self, count: int = 1) -> None:
        """Give back room reserved by :meth:`try_reserve` and not used."""
        if self._journal is not None:
            self._journal.release(count)

    def close(self, timeout: float | None = 60) -> None:
        """Stop accepting records, have the shipper write every journalled one, and stop it."""
        journal = self._journal
        if journal is None or self._closed:
            return
        journal.seal()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done = journal.pending() == 0
            shipper = self._shipper
            if done and (shipper is None or shipper.poll() is not None):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not done:
                self._ensure_shipper()  # one killed meanwhile
            time.sleep(0.005)
        pending = journal.pending()
        self._final_written, self._final_pending = journal.shipped(), pending
        self._closed = True
        self._stop_watch.set()
        if self._watch is not None:
            self._watch.join()
        with self._shipper_lock:
            shipper = self._shipper
            if shipper is not None and shipper.poll() is None:
                if pending:
                    log.error("the prediction log shipper did not finish in %ss; %d rows left in the "
                              "journal for the next start", timeout, pending)
                shipper.kill()
                shipper.wait()
            elif pending:
                log.error("the prediction log shipper ended with %d rows unwritten; left in the journal "
                          "for the next start", pending)
        # Rows the database did not take stay in the journal for the next start to write.
        journal.close(remove=pending == 0)

    @property
    def shipper_pid(self) -> int | None:
        """The shipper process's id (for tests and diagnostics)."""
        return self._shipper.pid if self._shipper is not None else None

    def _start_shipper(self) -> None:
        assert self._journal is not None
        env = {**os.environ, DATABASE_URL_ENV: self._database.url}
        # Importable however this process was started (an installed package, or the source tree).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        root = logging.getLogger()
        json_logs = any(type(h.formatter).__name__ == "JsonFormatter" for h in root.handlers)
        command = [
            sys.executable, "-m", "services.serving.predlog.shipper",
            "--journal", str(self._journal.path), "--parent", str(os.getpid()),
            "--batch-size", str(self._batch_size), "--flush-interval-s", str(self._flush_interval_s),
            "--log-level", logging.getLevelName(root.getEffectiveLevel()),
        ]
        if json_logs:
            command.append("--log-json")
        self._shipper = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        self._shipper_started_at = time.monotonic()

    def _ensure_shipper(self) -> None:
        """Start the shipper again if it ended (killed, crashed) while there is work for it."""
        shipper = self._shipper
        if shipper is None or shipper.poll() is None or self._closed:
            return
        with self._shipper_lock:
            shipper = self._shipper
            journal = self._journal
            if self._closed or journal is None or shipper is None or shipper.poll() is None:
                return
            if time.monotonic() - self._shipper_started_at < _RESTART_INTERVAL_S:
                return
            if shipper.returncode == 0 and journal.pending() == 0:
                return  # it finished: the journal is closed and everything shipped
            log.warning("the prediction log shipper (pid %d) ended with %s; starting another",
                        shipper.pid, shipper.returncode)
            self._start_shipper()

    def _watch_shipper(self) -> None:
        while not self._stop_watch.wait(_WATCH_INTERVAL_S):
            try:
                self._ensure_shipper()
            except Exception:
                log.exception("could not start the prediction log shipper again")


def replay_orphans(database: Database, folder: Path) -> int:
    """Write the journalled records that crashed processes left in ``folder``; how many.

    A shipper may have died after its batch was committed but before it marked the journal, so
    rows already present (same request id, role, version and time) are not written twice.
    """
    total = 0
    for path, records in orphans(folder):
        rows: list[Row] = []
        if records:
            with database.session() as session:
                rows = fresh(session, [row_of(record) for record in records])
                if rows:
                    insert_rows(session, rows)
        total += len(rows)
        if rows:
            log.warning("wrote %d prediction log rows that a stopped process left in %s",
                        len(rows), path.name)
    return total

