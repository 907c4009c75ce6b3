"""What every part of the monitor works with: one :class:`Monitor` per app, passed by keyword."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import httpx
from mlflow.tracking import MlflowClient
from prometheus_client import CollectorRegistry

from services.monitor.metrics import MonitorMetrics
from services.monitor.settings import MonitorSettings
from services.monitor.windows.book import WindowBook
from services.monitor.windows.references import ReferenceCache
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database

# The trainer answers a pipeline start in one Prefect call; never hold the loop longer for it.
TRAINER_TIMEOUT_S = 15.0


@dataclass
class Monitor:
    settings: MonitorSettings
    database: Database
    mlflow: MlflowClient
    references: ReferenceCache
    metrics: MonitorMetrics
    # The trainer's API (pipeline runs), with the monitor's own token.
    trainer: httpx.Client
    stop: threading.Event = field(default_factory=threading.Event)
    # What the windows step remembers between passes (the pairs with logs, lineage it read).
    windows: WindowBook = field(default_factory=WindowBook)

    def close(self) -> None:
        self.trainer.close()


def create_monitor(*, settings: MonitorSettings, database: Database, registry: CollectorRegistry) -> Monitor:
    platform = settings.platform
    repo = DataRepo.from_settings(platform)
    headers = {}
    if settings.trainer_token is not None:
        headers["Authorization"] = f"Bearer {settings.trainer_token.get_secret_value()}"
    return Monitor(
        settings=settings,
        database=database,
        mlflow=MlflowClient(tracking_uri=platform.mlflow_tracking_uri),
        references=ReferenceCache(repo.read, settings.reference_cache_size),
        metrics=MonitorMetrics(registry),
        trainer=httpx.Client(base_url=platform.trainer_url, headers=headers, timeout=TRAINER_TIMEOUT_S),
    )
