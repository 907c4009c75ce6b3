"""The platform database on SQLite and PostgreSQL, and events through the real Redis."""

import threading
import uuid

from sqlalchemy import select

from shipyard_common.db import Database
from shipyard_common.events import EventBus, ModelAliasMoved
from shipyard_common.records import EventRecord, PredictionRecord


def test_tables_are_created_and_used(db_url):
    request_id = uuid.uuid4().hex  # the PostgreSQL database is shared by the whole session
    database = Database(db_url)
    database.create_tables()
    database.create_tables()  # a second start must not fail
    with database.session() as session:
        session.add(
            PredictionRecord(
                request_id=request_id,
                model="m",
                version="1",
                inputs=[[1.0, 2.0]],
                outputs=[[0.3, 0.7]],
                latency_ms=1.5,
            )
        )
    with database.session() as session:
        row = session.scalars(select(PredictionRecord).where(PredictionRecord.request_id == request_id)).one()
        assert row.inputs == [[1.0, 2.0]] and row.outputs == [[0.3, 0.7]]
    database.ping()
    database.dispose()


def test_event_is_recorded_then_published(db_url, redis_url):
    database = Database(db_url)
    database.create_tables()
    channel = f"test-events-{threading.get_ident()}"
    bus = EventBus(redis_url=redis_url, channel=channel, database=database)
    received: list[dict] = []
    got = threading.Event()
    stop = threading.Event()

    def handler(payload):
        received.append(payload)
        got.set()

    thread = bus.subscribe(handler, stop)
    # Pub/sub only delivers to subscribers already listening; wait until ours is.
    import time

    import redis

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 10
    while client.pubsub_numsub(channel)[0][1] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    bus.publish(ModelAliasMoved(model="m", alias="production", version="2", previous_version="1", actor="t"))
    assert got.wait(10), "event never arrived"
    stop.set()
    thread.join(5)
    assert received[0]["model"] == "m" and received[0]["version"] == "2"
    with database.session() as session:
        rows = session.scalars(select(EventRecord).where(EventRecord.type == "model.alias_moved")).all()
        assert any(r.payload["version"] == "2" and r.payload["model"] == "m" for r in rows)


def test_publish_survives_a_missing_redis(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'x.db'}")
    database.create_tables()
    bus = EventBus(redis_url="redis://127.0.0.1:1/0", channel="c", database=database)
    bus.publish(ModelAliasMoved(model="m", alias="production", version="1", actor="t"))
    with database.session() as session:
        assert len(session.scalars(select(EventRecord)).all()) == 1
