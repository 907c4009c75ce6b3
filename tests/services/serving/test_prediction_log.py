"""The prediction log's promises, on the real database with a real shipper process.

Never drop, never write twice, wait for room when the database is behind, survive the shipper
or the serving process being killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from services.serving.predlog.log import PredictionLog
from shipyard_common.db import Database, utcnow
from shipyard_common.records import PredictionRecord
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[3]


def record(prefix: str, index: int) -> dict[str, Any]:
    return {"request_id": f"{prefix}{index}", "model": "m", "version": "1", "role": "production",
            "inputs": [[float(index)]], "outputs": [[0.5]], "latency_ms": 1.0, "created_at": utcnow()}


def ids(database: Database, prefix: str) -> list[str]:
    """Request ids of the rows whose id starts with ``prefix``, duplicates included."""
    with database.session() as session:
        return list(session.scalars(
            select(PredictionRecord.request_id).where(PredictionRecord.request_id.like(f"{prefix}%"))
        ))


def exactly_once(database: Database, prefix: str, count: int) -> None:
    found = ids(database, prefix)
    assert len(found) == count and set(found) == {f"{prefix}{i}" for i in range(count)}


def new_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}-"


class DatabaseLock:
    """Another client holding the predictions table: the shipper's writes wait (a slow database)."""

    def __init__(self, db_url: str) -> None:
        self._connection: Any
        if db_url.startswith("sqlite"):
            self._connection = sqlite3.connect(db_url.split("sqlite:///", 1)[1], isolation_level=None)
            self._connection.execute("BEGIN EXCLUSIVE")
        else:
            import psycopg2

            self._connection = psycopg2.connect(db_url.replace("postgresql+psycopg2://", "postgresql://", 1))
            self._connection.cursor().execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")

    def release(self) -> None:
        self._connection.rollback()
        self._connection.close()


def open_log(database: Database, journal: Path, **settings: Any) -> PredictionLog:
    options = {"capacity": 1000, "batch_size": 50, "flush_interval_s": 0.05, **settings}
    log = PredictionLog(database, journal_dir=journal, **options)
    log.start()
    return log


def test_every_record_is_in_the_database_once_after_close(db_url: str, tmp_path: Path) -> None:
    database = Database(db_url)
    database.create_tables()
    prefix = new_prefix()
    log = open_log(database, tmp_path / "journal", flush_interval_s=30)
    shipper = log.shipper_pid
    for index in range(300):
        row = record(prefix, index)
        if index % 2:  # callers may pass arrays as they are
            row["inputs"] = np.asarray(row["inputs"], dtype=np.float32)
            row["outputs"] = np.asarray(row["outputs"])
        if index % 3 == 0:
            assert log.try_reserve()
            log.append(row, reserved=True)
        else:
            log.append(row)
    assert log.pending() + log.written == 300
    log.close()
    assert log.pending() == 0 and log.written == 300 and log.shipper_pid == shipper
    exactly_once(database, prefix, 300)
    with database.session() as session:
        row = session.scalars(
            select(PredictionRecord).where(PredictionRecord.request_id == f"{prefix}7")
        ).one()
    assert row.inputs == [[7.0]] and row.outputs == [[0.5]] and row.version == "1"
    assert list((tmp_path / "journal").iterdir()) == []  # everything shipped: the journal is gone
    database.dispose()


def test_a_slow_database_makes_appends_wait_and_nothing_is_dropped(db_url: str, tmp_path: Path) -> None:
    database = Database(db_url)
    database.create_tables()
    prefix = new_prefix()
    lock = DatabaseLock(db_url)
    try:
        log = open_log(database, tmp_path / "journal", capacity=3, batch_size=2, flush_interval_s=0.01)
        # The event loop reserves before running a model; a full log refuses at once.
        assert log.try_reserve() and log.try_reserve() and log.try_reserve()
        assert not log.try_reserve()
        log.release()  # a request that failed gives its place back
        log.append(record(prefix, 0), reserved=True)
        log.append(record(prefix, 1), reserved=True)  # never waits: the places were held
        appended: list[int] = []

        def produce() -> None:
            for index in range(2, 20):
                log.append(record(prefix, index))
                appended.append(index)

        producer = threading.Thread(target=produce)
        producer.start()
        time.sleep(0.5)
        # One place was free; then the producer waits for the database, which is held.
        assert producer.is_alive() and appended == [2]
        assert log.pending() == 3 and not log.try_reserve()
    finally:
        lock.release()
    producer.join(10)
    assert not producer.is_alive() and len(appended) == 18
    log.close()
    exactly_once(database, prefix, 20)
    database.dispose()


def test_records_wait_in_the_journal_while_the_database_is_unavailable(tmp_path: Path) -> None:
    # No tables yet: every insert fails, and the shipper retries with back-off.
    database = Database(f"sqlite:///{tmp_path / 'shipyard.db'}")
    prefix = new_prefix()
    log = open_log(database, tmp_path / "journal", capacity=5, batch_size=2, flush_interval_s=0.01)
    for index in range(5):
        log.append(record(prefix, index))
    time.sleep(0.5)
    assert log.written == 0 and log.pending() == 5 and not log.try_reserve()
    waiting = threading.Thread(target=log.append, args=(record(prefix, 5),))
    waiting.start()
    time.sleep(0.2)
    assert waiting.is_alive()
    database.create_tables()  # the database is back
    waiting.join(10)
    assert not waiting.is_alive()
    wait_for(lambda: log.written == 6, timeout=10, what="the journal shipped")
    log.close()
    exactly_once(database, prefix, 6)
    database.dispose()


def test_a_killed_shipper_is_started_again_and_nothing_is_lost_or_doubled(
    db_url: str, tmp_path: Path
) -> None:
    database = Database(db_url)
    database.create_tables()
    prefix = new_prefix()
    total = 4000
    log = open_log(database, tmp_path / "journal", capacity=200, batch_size=50, flush_interval_s=0.01)
    done = threading.Event()

    def produce() -> None:
        for index in range(total):
            log.append(record(prefix, index))
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    for _ in range(3):
        wait_for(lambda: log.written > 0, timeout=10, what="the shipper writing")
        shipper = log.shipper_pid
        assert shipper is not None
        time.sleep(0.05)
        os.kill(shipper, signal.SIGKILL)  # most likely in the middle of a batch
        wait_for(lambda: log.shipper_pid != shipper, timeout=10, what="another shipper")  # noqa: B023
    producer.join(30)
    assert done.is_set()
    log.close()
    assert log.pending() == 0 and log.written == total
    exactly_once(database, prefix, total)
    database.dispose()


def serving_process(db_url: str, journal: Path, prefix: str, count: int) -> subprocess.Popen[str]:
    """A serving process's log: records appended (answered), none shipped yet (a long flush interval)."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from shipyard_common.db import Database, utcnow
        from services.serving.predlog.log import PredictionLog
        database = Database({db_url!r})
        database.create_tables()
        log = PredictionLog(database, capacity=1000, batch_size=1000, flush_interval_s=600,
                            journal_dir=Path({str(journal)!r}))
        log.start()
        for i in range({count}):
            log.append({{"request_id": f"{prefix}{{i}}", "model": "m", "version": "1", "role": "production",
                        "inputs": [[float(i)]], "outputs": [[0.5]], "latency_ms": 1.0,
                        "created_at": utcnow()}})
        print(log.shipper_pid, flush=True)
        time.sleep(600)
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_records_acknowledged_before_a_kill_9_are_written_at_the_next_start(
    db_url: str, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    database = Database(db_url)
    database.create_tables()
    prefix = new_prefix()
    # The whole process group killed (the server and its shipper): the journal holds the records.
    process = serving_process(db_url, journal, prefix, 25)
    try:
        assert process.stdout is not None and process.stdout.readline().strip()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    assert ids(database, prefix) == []

    restarted = open_log(database, journal)
    restarted.close()
    assert restarted.recovered == 25
    exactly_once(database, prefix, 25)
    assert list(journal.iterdir()) == []  # replayed, and the new process's own journal closed clean

    again = open_log(database, journal)
    again.close()
    assert again.recovered == 0  # nothing is written twice
    exactly_once(database, prefix, 25)
    database.dispose()


def test_a_shipper_outliving_its_server_ships_what_it_left_once(db_url: str, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    database = Database(db_url)
    database.create_tables()
    prefix = new_prefix()
    process = serving_process(db_url, journal, prefix, 25)
    try:
        assert process.stdout is not None
        shipper = int(process.stdout.readline())
        os.kill(process.pid, signal.SIGKILL)  # the server only
        process.wait(timeout=10)
        wait_for(lambda: gone(shipper), timeout=10, what="the orphaned shipper to finish")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    exactly_once(database, prefix, 25)

    restarted = open_log(database, journal)
    restarted.close()
    assert restarted.recovered == 0  # its shipper had written them
    exactly_once(database, prefix, 25)
    assert list(journal.iterdir()) == []
    database.dispose()


def test_a_shipper_killed_between_its_commit_and_its_mark_is_not_written_twice(
    db_url: str, tmp_path: Path
) -> None:
    from services.serving.predlog.journal import Journal, JournalTail
    from services.serving.predlog.shipper import Shipper
    from shipyard_common.records import insert_rows

    database = Database(db_url)
    database.create_tables()
    prefix = new_prefix()
    journal = Journal(tmp_path / "journal")
    for index in range(10):
        journal.append(record(prefix, index))
    # A shipper whose batch of four is committed to the database, killed before it marks the journal.
    dead = JournalTail(journal.path)
    batch, _lines, _ = dead.take_rows(4)
    with database.session() as session:
        insert_rows(session, batch)
    dead.close()
    journal.seal()
    # Its successor starts from the old mark and leaves out what is already there.
    Shipper(database, journal.path, parent=os.getppid(), batch_size=4, flush_interval_s=0.01).run()
    assert journal.pending() == 0
    journal.close(remove=True)
    exactly_once(database, prefix, 10)
    database.dispose()
