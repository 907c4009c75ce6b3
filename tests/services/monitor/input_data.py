"""Data for the monitor's tests of tables and sequences (issue 16), generated here: a table with strings
and nulls, and variable-length sequences (a list column, or long format)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

COLOURS = ["red", "green", "blue", "white"]
CODES = [1, 2, 3]


def table_frame(rows: int, *, seed: int) -> pd.DataFrame:
    """A table with strings and nulls (``colour``), numbers with nulls (``size``) and numbers the
    model takes as categories (``code``, declared categorical in the job)."""
    rng = np.random.default_rng(seed)
    colour = rng.choice(COLOURS, rows, p=[0.4, 0.3, 0.2, 0.1]).astype(object)
    colour[rng.random(rows) < 0.1] = None
    size = rng.normal(10, 2, rows).round(3)
    size[rng.random(rows) < 0.1] = np.nan
    return pd.DataFrame({"colour": colour, "size": size, "code": rng.choice(CODES, rows, p=[0.5, 0.3, 0.2]),
                         "y": rng.choice(["no", "yes"], rows)})


def sequences(count: int, *, seed: int, lengths: tuple[int, int] = (3, 20), width: int = 1,
              shift: float = 0.0) -> list[np.ndarray]:
    """``count`` sequences of (lengths[0]..lengths[1], width) numbers, ``shift`` added to column 0."""
    rng = np.random.default_rng(seed)
    found = [rng.normal(size=(int(rng.integers(lengths[0], lengths[1] + 1)), width)).round(5)
             for _ in range(count)]
    for values in found:
        values[:, 0] += shift
    return found


def sign(values: np.ndarray) -> str:
    return "positive" if float(values[:, 0].sum()) > 0 else "negative"


def long_format(found: list[np.ndarray]) -> pd.DataFrame:
    """One row per step (id, t, x, noise, sign), shuffled: the trainer orders them by id and step."""
    rows = [{"id": f"s{index:05d}", "t": step, "x": values[0], "noise": values[1], "sign": sign(sequence)}
            for index, sequence in enumerate(found) for step, values in enumerate(sequence)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)


def list_column(found: list[np.ndarray]) -> pd.DataFrame:
    """One row per sequence of width 1: ``steps`` (a list of numbers) and ``sign``."""
    return pd.DataFrame({"steps": [s[:, 0].tolist() for s in found], "sign": [sign(s) for s in found]})


def shifted_table(reference: pd.DataFrame, rows: int = 200) -> pd.DataFrame:
    """Rows whose category mix moved: ``colour`` mostly white (10 % in training), 10 of them
    ``purple`` (never seen), ``code`` half 3s; ``size`` drawn from training's, 30 % missing."""
    shifted = table_frame(rows, seed=6)
    index = np.arange(rows)
    shifted["colour"] = np.where(index < rows * 3 // 4, "white", shifted["colour"])
    shifted.loc[:9, "colour"] = "purple"
    shifted["code"] = np.where(index % 2 == 0, 3, shifted["code"])
    sizes = reference["size"].dropna().sample(rows, random_state=6).to_numpy()
    shifted["size"] = np.where(index % 10 < 3, np.nan, sizes)
    return shifted


def table_bodies(frame: pd.DataFrame, per_request: int = 10) -> list[Any]:
    """Requests of raw rows, as a client sends them: objects by column, null for a missing value
    (a request whose rows are lists in the column order now and then)."""
    rows = [{"colour": None if pd.isna(colour) else colour, "size": None if pd.isna(size) else float(size),
             "code": int(code)}
            for colour, size, code in frame[["colour", "size", "code"]].itertuples(index=False)]
    bodies: list[Any] = [rows[start:start + per_request] for start in range(0, len(rows), per_request)]
    bodies[1] = [[row["colour"], row["size"], row["code"]] for row in bodies[1]]
    return bodies


def sequence_bodies(found: list[np.ndarray], *, flat: bool, per_request: int = 10) -> list[Any]:
    """Ragged sequences as a client sends them: lists of numbers (steps of width 1) or of steps."""
    rows = [s[:, 0].tolist() if flat else s.tolist() for s in found]
    return [rows[start:start + per_request] for start in range(0, len(rows), per_request)]
