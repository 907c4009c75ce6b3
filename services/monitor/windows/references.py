"""Reference frames: the training data of a served version, read from DVC at its revision, once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import pandas as pd


class ReferenceCache:
    """Reference frames by (dataset, rev): a revision never changes, so a hit is always valid.

    Bounded, because every promoted version may pin a different revision.
    """

    def __init__(self, loader: Callable[[str, str], pd.DataFrame], size: int) -> None:
        self._loader = loader
        self._size = size
        self._frames: OrderedDict[tuple[str, str], pd.DataFrame] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, dataset: str, rev: str) -> pd.DataFrame:
        key = (dataset, rev)
        with self._lock:
            if key in self._frames:
                self._frames.move_to_end(key)
                return self._frames[key]
        # Read outside the lock: a DVC fetch can take seconds and must not stall other models.
        frame = self._loader(dataset, rev)
        with self._lock:
            self._frames[key] = frame
            self._frames.move_to_end(key)
            while len(self._frames) > self._size:
                self._frames.popitem(last=False)
        return frame
