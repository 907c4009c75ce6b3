"""Synthetic variable-length sequences, generated in the tests (issue 16, "Real-world tables").

The task: is the sum of a sequence of 3 to 20 random numbers positive? Chance is 50 %; a model that
reads every real step (and nothing of the padding) gets it nearly always right. Two layouts:
a list column (one sequence per row, width 1; written to Parquet as a list column) and long format
(one row per step: ``id``, ``t``, the step's ``x`` and a noise column ``noise``, the label per id).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LENGTHS = (3, 20)


def random_sequences(count: int, *, seed: int, width: int = 1,
                     lengths: tuple[int, int] = LENGTHS) -> list[np.ndarray]:
    """``count`` sequences of (3..20, width) numbers (or ``lengths``, both ends included); the label
    reads column 0 only."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(int(rng.integers(lengths[0], lengths[1] + 1)), width)).round(5)
            for _ in range(count)]


def label(sequence: np.ndarray) -> str:
    return "positive" if float(sequence[:, 0].sum()) > 0 else "negative"


def list_column_frame(count: int, *, seed: int) -> pd.DataFrame:
    """One row per sequence: ``steps`` (a list of numbers) and ``sign``."""
    sequences = random_sequences(count, seed=seed)
    return pd.DataFrame({"steps": [s[:, 0].tolist() for s in sequences],
                         "sign": [label(s) for s in sequences]})


def long_format_frame(count: int, *, seed: int, lengths: tuple[int, int] = LENGTHS) -> pd.DataFrame:
    """One row per step, shuffled (the trainer orders them): id, t, x, noise and the id's sign."""
    sequences = random_sequences(count, seed=seed, width=2, lengths=lengths)
    rows = [{"id": f"s{index:05d}", "t": step, "x": values[0], "noise": values[1], "sign": label(sequence)}
            for index, sequence in enumerate(sequences) for step, values in enumerate(sequence)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
