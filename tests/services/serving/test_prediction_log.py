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
