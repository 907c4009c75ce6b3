"""Each dataset version's frame, as parsing its CSV gives it, kept as Parquet beside DVC's cache.

A version's data stays CSV (its bytes are what DVC tracks and hashes, docs/data.md), and what a reader
sees is ``pd.read_csv`` of them. Parsing costs seconds a million rows, so the parsed frame is kept once
per content hash in ``.dvc/cache/shipyard-frames/<md5>.parquet`` (deleted with DVC's cache, never
pushed) and read back from there, in a fraction of the time. A frame is kept only after it read back
from Parquet exactly as parsed (same columns, dtypes and values; NaN, -0.0 and ``None`` told apart), so
a reader sees the same frame either way; a file that cannot be read is ignored (the CSV is parsed).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd

FOLDER = "shipyard-frames"


class FrameCache:
    """Parsed frames by the md5 of their CSV bytes, under ``<repository>/.dvc/cache/``."""

    def __init__(self, repository: Path) -> None:
        self.folder = repository / ".dvc" / "cache" / FOLDER

    def path(self, md5: str) -> Path:
        return self.folder / f"{md5}.parquet"

    def get(self, md5: str | None) -> pd.DataFrame | None:
        """The frame kept for CSV bytes of ``md5``, or None (none kept, or not readable)."""
        if not md5 or not self.path(md5).is_file():
            return None
        try:
            return _as_parsed(pd.read_parquet(self.path(md5)))
        except Exception:  # an optimisation only: a broken file means parsing the CSV, as without it
            return None

    def keep(self, md5: str, frame: pd.DataFrame) -> bool:
        """Keep ``frame`` (``pd.read_csv`` of CSV bytes of ``md5``) if Parquet gives it back exactly;
        written under a temporary name and renamed, so that a kept file is whole. Whether it is kept."""
        target = self.path(md5)
        if target.is_file():
            return True
        partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            frame.to_parquet(partial, index=False)
            if not same_frame(frame, _as_parsed(pd.read_parquet(partial))):
                return False
            os.replace(partial, target)
            return True
        except Exception:  # a frame Parquet cannot hold, a full disk: readers parse the CSV
            return False
        finally:
            partial.unlink(missing_ok=True)


def _as_parsed(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame read from Parquet as ``read_csv`` gives it: a text column's nulls are NaN, not None."""
    for position, dtype in enumerate(frame.dtypes):
        if dtype.kind == "O":
            values = frame.iloc[:, position].to_numpy(copy=True)
            values[pd.isna(values)] = np.nan
            frame.isetitem(position, values)
    return frame


def same_frame(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether ``a`` and ``b`` hold the same columns, dtypes, index and values, exactly: NaN where NaN,
    -0.0 where -0.0, and in a text column the same types (NaN is not None, ``"1"`` is not 1)."""
    if list(a.columns) != list(b.columns) or list(a.dtypes) != list(b.dtypes) or not a.index.equals(b.index):
        return False
    for position in range(a.shape[1]):
        x, y = a.iloc[:, position].to_numpy(), b.iloc[:, position].to_numpy()
        if x.dtype.kind == "f":
            if not (np.array_equal(x, y, equal_nan=True) and np.array_equal(np.signbit(x), np.signbit(y))):
                return False
        elif x.dtype.kind == "O":
            if [type(v) for v in x] != [type(v) for v in y]:
                return False
            gaps = pd.isna(x)
            if not np.array_equal(gaps, pd.isna(y)) or x[~gaps].tolist() != y[~gaps].tolist():
                return False
        elif not np.array_equal(x, y):
            return False
    return True
