"""What the windows part of one monitor process remembers between passes (nothing that is a record)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from services.monitor.windows.cutting import Tally
from services.monitor.windows.lineage import LineageCache


@dataclass
class WindowBook:
    """The (model, version) pairs with logged predictions that may have windows to close.

    ``scanned_to``: the highest prediction id looked at; each pass reads only the pairs logged
    beyond it, so that finding work costs one indexed query however long the log is. A pair leaves
    ``known`` once it has nothing pending and no alias, and comes back with its next prediction.
    """

    known: set[tuple[str, str]] = field(default_factory=set)
    scanned_to: int = 0
    lineage: LineageCache = field(default_factory=LineageCache)
    # Windows by time: the rows of each version's open period, counted incrementally.
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
