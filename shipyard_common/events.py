"""Platform events: written to the database (the record), then published on Redis (the signal).

Redis pub/sub can lose a message (a subscriber that is down, a Redis restart); subscribers
therefore also reconcile from the source of truth on a timer. The database row lets anyone
see what happened and when.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

import redis
from pydantic import BaseModel, Field

from shipyard_common.db import Database
from shipyard_common.records import EventRecord

log = logging.getLogger("shipyard.events")


class ModelAliasMoved(BaseModel):
    """A registry alias now points at another version (promotion, rollback, canary …)."""

    type: Literal["model.alias_moved"] = "model.alias_moved"
    model: str
    alias: str
    version: str
    previous_version: str | None = None
    #: For the canary alias: the share of requests it answers (the model's canary weight tag).
    weight: float | None = None
    actor: str
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ModelAliasRemoved(BaseModel):
    """An alias was deleted: it names no version any more (a canary or shadow taken down)."""

    type: Literal["model.alias_removed"] = "model.alias_removed"
    model: str
    alias: str
    previous_version: str
    actor: str
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


Event = ModelAliasMoved | ModelAliasRemoved


class EventBus:
    def __init__(self, *, redis_url: str, channel: str, database: Database | None = None) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self.database = database

    def publish(self, event: Event) -> None:
        payload = event.model_dump(mode="json")
        if self.database is not None:
            with self.database.session() as session:
                session.add(EventRecord(type=event.type, payload=payload))
        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            client.publish(self.channel, json.dumps(payload))
            client.close()
        except redis.RedisError as exc:
            # The row above is the record; subscribers reconcile on a timer and will catch up.
            log.warning("could not publish event on Redis: %s", exc)

    def subscribe(
        self, handler: Callable[[dict[str, object]], None], stop: threading.Event
    ) -> threading.Thread:
        """Call ``handler`` for each event in a daemon thread until ``stop`` is set."""

        def run() -> None:
            while not stop.is_set():
                try:
                    client = redis.Redis.from_url(self.redis_url, socket_timeout=None)
                    pubsub = client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.channel)
                    while not stop.is_set():
                        message = pubsub.get_message(timeout=0.5)
                        if message and message.get("type") == "message":
                            try:
                                handler(json.loads(message["data"]))
                            except Exception:
                                log.exception("event handler failed")
                    pubsub.close()
                    client.close()
                except redis.RedisError as exc:
                    log.warning("event subscription lost (%s); retrying", exc)
                    stop.wait(1.0)

        thread = threading.Thread(target=run, name="event-subscriber", daemon=True)
        thread.start()
        return thread
