"""What the windows part of one monitor process remembers between passes (nothing that is a record)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from services.monitor.windows.cutting import Tally
from services.monitor.windows.lineage import LineageCache


@dataclass(frozen=True)
class Trouble:
    """Why the loop's last pass could not bring a model's windows up to date (MLflow, the reference
    data or the database away), and since when (``time.time()``)."""

    reason: str
    since: float


@dataclass
class WindowBook:
    """The (model, version) pairs with logged predictions that may have windows to close.

    ``scanned_to``: the highest prediction id looked at; each pass reads only the pairs logged
    beyond it, so that finding work costs one indexed query however long the log is. A pair leaves
    ``known`` once it has nothing pending and no alias, and comes back with its next prediction.
    ``troubles``: the models whose last pass failed for want of a component, so that the drift
    routes say their stored answer is stale, and why, without asking that component themselves.
    """

    known: set[tuple[str, str]] = field(default_factory=set)
    scanned_to: int = 0
    lineage: LineageCache = field(default_factory=LineageCache)
    # Windows by time: the rows of each version's open period, counted incrementally.
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)
    troubles: dict[str, Trouble] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note_pass(self, model: str, trouble: str | None) -> None:
        """Record how the last pass over ``model`` went: ``trouble`` is why it failed, None if it did not."""
        with self.lock:
            if trouble is None:
                self.troubles.pop(model, None)
            elif model not in self.troubles:
                self.troubles[model] = Trouble(trouble, time.time())
            else:
                self.troubles[model] = Trouble(trouble, self.troubles[model].since)

    def trouble(self, model: str) -> Trouble | None:
        with self.lock:
            return self.troubles.get(model)
