"""The prediction log's promises, on the real database: never drop, block when full, flush on close."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.serving.prediction_log import PredictionLog
from shipyard_common.db import Database, utcnow
from shipyard_common.records import PredictionRecord
from tests.support import wait_for


def record(index: int) -> dict[str, Any]:
    return {"request_id": f"r{index}", "model": "m", "version": "1", "role": "production",
            "inputs": [[float(index)]], "outputs": [[0.5]], "latency_ms": 1.0, "created_at": utcnow()}


class GatedDatabase:
    """The real database, whose writes wait until the test opens the gate: a slow database."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.gate = threading.Event()

    @contextmanager
    def session(self) -> Iterator[Session]:
        self.gate.wait()
        with self.database.session() as session:
            yield session


def count(database: Database) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).select_from(PredictionRecord)) or 0)


def test_producers_wait_for_room_and_nothing_is_dropped(db_url: str) -> None:
    database = Database(db_url)
    database.create_tables()
    before = count(database)
    gated = GatedDatabase(database)
    log = PredictionLog(gated, capacity=3, batch_size=2, flush_interval_s=0.01)  # type: ignore[arg-type]
    log.start()
    appended: list[int] = []

    def produce() -> None:
        for index in range(20):
            log.append(record(index))
            appended.append(index)

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.5)
    # The writer holds at most one batch while the database stalls; the rest wait in the queue.
    assert producer.is_alive() and len(appended) <= 3 + 2
    gated.gate.set()
    producer.join(10)
    assert len(appended) == 20
    log.close()
    assert count(database) - before == 20
    database.dispose()


def test_reserved_room_is_held_for_its_record_and_given_back_when_unused(db_url: str) -> None:
    """The event loop reserves a place before running a model; a full log refuses at once."""
    database = Database(db_url)
    database.create_tables()
    before = count(database)
    gated = GatedDatabase(database)
    # Batches of one: the writer holds one record while the database stalls, two wait in the queue.
    log = PredictionLog(gated, capacity=2, batch_size=1, flush_interval_s=30)  # type: ignore[arg-type]
    log.start()
    assert log.try_reserve() and log.try_reserve()
    assert not log.try_reserve()  # full: the caller goes to a thread before doing any work
    log.release()  # a request that failed gives its place back
    assert log.try_reserve()
    log.append(record(1), reserved=True)
    log.append(record(2), reserved=True)  # never waits: the places were held
    wait_for(lambda: log.pending() == 1, timeout=5, what="the writer to take the first record")
    log.append(record(3))  # the place the writer freed

    waiting = threading.Thread(target=log.append, args=(record(4),))
    waiting.start()
    time.sleep(0.3)
    assert waiting.is_alive() and not log.try_reserve()  # full again: an append waits for room...
    gated.gate.set()
    waiting.join(10)
    assert not waiting.is_alive()  # ...which the writer frees as it takes the queued records
    log.close()
    assert count(database) - before == 4
    database.dispose()


def test_close_writes_everything_still_queued(db_url: str) -> None:
    database = Database(db_url)
    database.create_tables()
    before = count(database)
    log = PredictionLog(database, capacity=1000, batch_size=50, flush_interval_s=30)
    log.start()
    for index in range(120):
        log.append(record(index))
    log.close()
    assert count(database) - before == 120 and log.pending() == 0
    database.dispose()


def test_records_acknowledged_before_a_kill_9_are_written_at_the_next_start(db_url, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    journal = tmp_path / "journal"
    # A serving process's log: records appended (answered), none written yet (a long flush
    # interval), then the process is killed without any chance to flush.
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(root)!r})
        from pathlib import Path
        from shipyard_common.db import Database, utcnow
        from services.serving.prediction_log import PredictionLog
        database = Database({db_url!r})
        database.create_tables()
        log = PredictionLog(database, capacity=1000, batch_size=1000, flush_interval_s=600,
                            journal_dir=Path({str(journal)!r}))
        log.start()
        for i in range(25):
            log.append({{"request_id": f"k{{i}}", "model": "m", "version": "1", "role": "production",
                        "inputs": [[float(i)]], "outputs": [[0.5]], "latency_ms": 1.0,
                        "created_at": utcnow()}})
        print("acknowledged", flush=True)
        time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "acknowledged"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    database = Database(db_url)
    database.create_tables()
    with database.session() as session:
        assert session.scalar(select(func.count()).where(PredictionRecord.request_id.like("k%"))) == 0

    restarted = PredictionLog(database, capacity=100, batch_size=10, flush_interval_s=0.05,
                              journal_dir=journal)
    restarted.start()
    restarted.close()
    assert restarted.recovered == 25
    with database.session() as session:
        ids = set(session.scalars(
            select(PredictionRecord.request_id).where(PredictionRecord.request_id.like("k%"))
        ))
    assert ids == {f"k{i}" for i in range(25)}
    assert list(journal.iterdir()) == []  # replayed, and the new process's own journal closed clean

    again = PredictionLog(database, capacity=100, batch_size=10, flush_interval_s=0.05, journal_dir=journal)
    again.start()
    again.close()
    assert again.recovered == 0  # nothing is written twice
