"""Sequences as what drift can compare: per sequence, each step feature's mean over its real steps,
and its length (the number of real steps).

A logged request holds its sequences padded with null to one length (serving pads them with NaN);
a step with a null is padding, as the models read it. The reference is the same of each training
sequence, read from the version's dataset revision as the trainer read it (a list column of lists
or of their JSON text, or long format grouped by id and ordered by step), with the sequence's
target beside it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from services.monitor.windows.inputs import SequenceSource
from services.monitor.windows.lineage import Lineage
from services.monitor.windows.references import Reference, describe
from shipyard_common.errors import Conflict

LENGTH = "length"


def summary_names(features: tuple[str, ...]) -> tuple[str, ...]:
    """The columns drift is computed on: ``mean(<feature>)`` per step feature, then ``length``."""
    return (*(f"mean({name})" for name in features), LENGTH)


def summarise(inputs: list[Any], *, width: int) -> list[tuple[list[float] | None, int]]:
    """Each logged sequence's summary (means, then length), or None and the width of its steps when
    they are not steps of ``width`` numbers (0: not a list of steps)."""
    try:
        padded = np.array(inputs, dtype=np.float64)  # one request: its sequences padded to one length
    except (TypeError, ValueError):
        padded = None
    if padded is not None and padded.ndim == 3 and padded.shape[2] == width:
        return [(summary, width) for summary in _summaries(padded).tolist()]
    return [_one(sequence, width=width) for sequence in inputs]


def _one(sequence: Any, *, width: int) -> tuple[list[float] | None, int]:
    try:
        steps = np.array(sequence, dtype=np.float64)
    except (TypeError, ValueError):
        return None, 0
    if steps.ndim == 1 and width == 1:  # numbers: steps of width 1
        steps = steps.reshape(-1, 1)
    if steps.ndim != 2:
        return None, 0
    if steps.shape[1] != width:
        return None, int(steps.shape[1])
    return _summaries(steps[np.newaxis])[0].tolist(), width


def _summaries(padded: np.ndarray) -> np.ndarray:
    """(sequences, time, width) with NaN padding → (sequences, width + 1): means over real steps, length."""
    real = ~np.isnan(padded).any(axis=2)
    lengths = real.sum(axis=1)
    sums = np.where(real[:, :, np.newaxis], padded, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / lengths[:, np.newaxis]  # NaN for a sequence of padding only
    return np.concatenate([means, lengths[:, np.newaxis].astype(np.float64)], axis=1)


def summarised(reference: Reference, *, lineage: Lineage) -> tuple[Reference, Lineage]:
    """The reference of the version's training sequences' summaries (read once per revision and
    layout), and the lineage whose features are the summaries."""
    source = lineage.inputs.source
    assert source is not None  # read_lineage sets it for every sequence version
    names = summary_names(lineage.features)
    key = ("sequences", source, lineage.features, lineage.target)
    built = reference.prepared(key, lambda: describe(reference.dataset, reference.rev, _reference_frame(
        reference, source=source, lineage=lineage, names=names)))
    return built, replace(lineage, features=names)


def _reference_frame(reference: Reference, *, source: SequenceSource, lineage: Lineage,
                     names: tuple[str, ...]) -> pd.DataFrame:
    frame, where = reference.frame, f"dataset {reference.dataset!r} at {reference.rev[:12]}"
    if source.column is not None:
        if source.column not in frame.columns:
            raise Conflict(f"{where} has no sequence column {source.column!r}")
        width = lineage.inputs.width
        rows = [_one(_cell(value), width=width)[0] for value in frame[source.column].tolist()]
        if any(row is None for row in rows):
            raise Conflict(f"{where}: column {source.column!r} does not hold sequences of steps of {width}")
        found = pd.DataFrame(rows, columns=list(names), index=frame.index)
        per_sequence = frame
    else:
        id_, step = str(source.id), str(source.step)
        absent = [c for c in (id_, step, *lineage.features) if c not in frame.columns]
        if absent:
            raise Conflict(f"{where} lacks the sequence column(s) {absent[:5]}")
        groups = frame.groupby(id_, sort=True)  # a mean and a count: the order of the steps is moot
        found = groups[list(lineage.features)].mean()
        found.columns = list(names[:-1])
        found[names[-1]] = groups.size().astype(np.float64)
        per_sequence = groups.first()
    target = lineage.target
    if target and target in per_sequence.columns and target not in names:
        found[target] = per_sequence[target].to_numpy()
    return found.reset_index(drop=True)


def _cell(value: Any) -> Any:
    """A list cell as the trainer reads it: a list, a numpy array (Parquet) or its JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [np.asarray(step).tolist() for step in value]
    return value
