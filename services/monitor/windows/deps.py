"""What the windows step needs of the monitor: :class:`WindowsMonitor`, which the monitor's context
(``services.monitor.context.Monitor``) is. A protocol, so that this layer names what it uses and never
imports the context that assembles it (the context stands above the windows: it holds their book)."""

from __future__ import annotations

import threading
from typing import Protocol

from mlflow.tracking import MlflowClient

from services.monitor.metrics import MonitorMetrics
from services.monitor.settings import MonitorSettings
from services.monitor.windows.book import WindowBook
from services.monitor.windows.references import ReferenceCache
from shipyard_common.db import Database


class WindowsMonitor(Protocol):
    """The monitor's parts the windows step reads: its settings, database, MLflow client, reference
    cache, metrics, stop signal and the book it keeps between passes."""

    settings: MonitorSettings
    database: Database
    mlflow: MlflowClient
    references: ReferenceCache
    metrics: MonitorMetrics
    stop: threading.Event
    windows: WindowBook
