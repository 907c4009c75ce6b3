"""The monitor tests' helpers: monitors made for a test (each with its own metrics registry) and what
they recorded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import select

from services.monitor.context import Monitor, create_monitor
from services.monitor.settings import MonitorSettings
from services.monitor.tables import WindowRecord
from shipyard_common.db import Database
from shipyard_common.settings import PlatformSettings

#: Each monitor's own metrics registry, by id(monitor), so that a test reads its gauges alone.
REGISTRIES: dict[int, CollectorRegistry] = {}


@contextmanager
def monitor_maker(
    platform: PlatformSettings, *, data_repo: Path, dvc_remote: Path
) -> Iterator[Callable[..., Monitor]]:
    """``make(db_url=None, **options)``: a monitor over the data repository (windows of 200 rows, no grace
    by default); every one made is closed at the end."""
    made: list[Monitor] = []

    def make(db_url: str | None = None, **options: Any) -> Monitor:
        update: dict[str, Any] = {"data_repo": data_repo, "dvc_remote": dvc_remote}
        if db_url:
            update["db_url"] = db_url
        settings = MonitorSettings(platform=platform.model_copy(update=update),
                                   **{"window_grace_s": 0, "window": {"rows": 200}, **options})
        database = Database(settings.platform.database_url)
        database.create_tables()
        registry = CollectorRegistry()
        monitor = create_monitor(settings=settings, database=database, registry=registry)
        REGISTRIES[id(monitor)] = registry
        made.append(monitor)
        return monitor

    try:
        yield make
    finally:
        for monitor in made:
            REGISTRIES.pop(id(monitor), None)
            monitor.close()
            monitor.database.dispose()


def windows(monitor: Monitor, model: str) -> list[WindowRecord]:
    """The model's windows, oldest first."""
    with monitor.database.session() as session:
        return list(session.scalars(select(WindowRecord).where(WindowRecord.model == model)
                                    .order_by(WindowRecord.id)))


def gauge(monitor: Monitor, name: str, **labels: str) -> float | None:
    return REGISTRIES[id(monitor)].get_sample_value(name, labels)
