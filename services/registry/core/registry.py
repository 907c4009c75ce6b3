"""The registry's parts, built once per app: settings, MLflow, the database, events and peers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.registry.core.peers import Peers
from services.registry.core.store import Store
from services.registry.core.tables import ModelLockRecord
from services.registry.settings import RegistrySettings
from shipyard_common.db import Database
from shipyard_common.events import EventBus


@dataclass
class Registry:
    settings: RegistrySettings
    store: Store
    database: Database
    events: EventBus
    peers: Peers

    @contextmanager
    def locked(self, model: str) -> Iterator[Session]:
        """A transaction that holds ``model``'s lock row until it commits or rolls back.

        Its first statement updates the row: PostgreSQL locks the row, SQLite takes its write
        lock, so a second transaction for the same model, in any thread, process or host, waits
        here and then sees everything the first committed. Alias moves happen only in here.
        """
        self._ensure_lock_row(model)
        with self.database.session() as session:
            session.execute(
                update(ModelLockRecord)
                .where(ModelLockRecord.model == model)
                .values(generation=ModelLockRecord.generation + 1)
            )
            yield session

    def _ensure_lock_row(self, model: str) -> None:
        with self.database.session() as session:
            if session.get(ModelLockRecord, model) is not None:
                return
        try:
            with self.database.session() as session:
                session.add(ModelLockRecord(model=model, generation=0))
        except IntegrityError:
            pass  # another process made it first


def create_registry(*, settings: RegistrySettings, database: Database) -> Registry:
    platform = settings.platform
    return Registry(
        settings=settings,
        store=Store.connect(platform.mlflow_tracking_uri, timeout_s=settings.mlflow_timeout_s),
        database=database,
        events=EventBus(redis_url=platform.redis_url, channel=platform.events_channel, database=database),
        peers=Peers(
            serving_url=platform.serving_url,
            monitor_url=platform.monitor_url,
            timeout_s=settings.peer_timeout_s,
        ),
    )
