"""Variable-length sequences (``data.sequence``) as padded arrays the sequence models read.

Each sequence becomes ``(steps, width)`` float32 values; every part is padded with NaN to one length,
(sequences, length, width): ``model.sequence_length`` when given (longer sequences keep their first
``length`` steps, as the exported graph does), else the longest training sequence. NaN marks padding
only: the models derive their mask from it (engines/architectures.py), and a real value must be finite.

Two layouts (:class:`~services.trainer.jobs.sequence_spec.SequenceSpec`), read by the platform's one
reader of sequences (:mod:`shipyard_common.datasets.sequences`, which batch scoring and the monitor
share): a list column (one sequence per row) or long format (one row per step, grouped by id, ordered
by step; the target and a split column must be constant within an id). The split draws whole sequences.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from services.trainer.engines.tabular import _labels, _plain, split_rows
from services.trainer.engines.types import TabularData
from services.trainer.jobs.schemas import JobCreate
from shipyard_common.datasets.sequences import SequenceLayout, Sequences, read_sequences
from shipyard_common.errors import InvalidInput


def prepare_sequences(
    frame: pd.DataFrame, spec: JobCreate, test_frame: pd.DataFrame | None = None
) -> TabularData:
    """The dataset's sequences, labelled, split by sequence and padded (see the module's docstring)."""
    data = spec.data
    read = _read(frame, spec)
    sequences, per_sequence, features = read.values, read.rows, read.features
    y, classes = _labels(per_sequence[data.target], spec)
    rows = split_rows(per_sequence, spec, y if classes else None)
    length = getattr(spec.model, "sequence_length", None) or max(len(sequences[i]) for i in rows["train"])
    x = pad(sequences, length)
    test = rows.get("test")
    x_test, y_test = (None, None) if test is None else (x[test], y[test])
    if test_frame is not None and data.split is not None and data.split.test_rev is not None:
        tested = _read(test_frame, spec)
        if tested.features != features:
            raise InvalidInput(f"the test revision's steps have columns {tested.features[:20]}, "
                               f"not {features[:20]}")
        x_test = pad(tested.values, length)
        y_test, _ = _labels(tested.rows[data.target], spec, classes=classes)
        rows["test"] = np.arange(len(tested.values))
    return TabularData(
        features=features, target=data.target, task=data.task,
        x_train=x[rows["train"]], y_train=y[rows["train"]], x_val=x[rows["validation"]],
        y_val=y[rows["validation"]], classes=[_plain(c) for c in classes], x_test=x_test, y_test=y_test,
        rows={part: positions.tolist() for part, positions in rows.items()},
    )


def _read(frame: pd.DataFrame, spec: JobCreate) -> Sequences:
    """Each sequence's (steps, width) float32 values; one row per sequence with its target (and split
    column); and the step's feature names. The dataset's own refusals first, naming it."""
    data = spec.data
    sequence = data.sequence
    assert sequence is not None
    split_column = data.split.column if data.split is not None else None
    per_sequence = [data.target, *([split_column] if split_column else [])]
    needed = [*per_sequence, *sequence.columns(), *(sequence.features or [])]
    columns = [str(c) for c in frame.columns]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InvalidInput(f"dataset {data.dataset!r} has no column(s) {missing}; "
                           f"its columns are {columns[:50]}")
    if frame[data.target].isna().any():
        raise InvalidInput(f"target {data.target!r} has missing values; drop those rows first")
    if not len(frame):
        raise InvalidInput(f"dataset {data.dataset!r} has no rows")
    layout = SequenceLayout(column=sequence.column, id=sequence.id, step=sequence.step,
                            features=tuple(sequence.features) if sequence.features else None)
    return read_sequences(frame, layout, per_sequence=per_sequence)


def pad(sequences: list[np.ndarray], length: int) -> np.ndarray:
    """(sequences, length, width) float32: each sequence's first ``length`` steps, NaN after its end."""
    width = sequences[0].shape[1]
    padded = np.full((len(sequences), length, width), np.nan, dtype=np.float32)
    for index, steps in enumerate(sequences):
        kept = steps[:length]
        padded[index, : len(kept)] = kept
    return padded
