"""Sequences as what drift can compare: per sequence, each step feature's mean over its real steps,
and its length (the number of real steps).

A logged request holds its sequences padded with null to one length (serving pads them with NaN);
a step with a null is padding, as the models read it. The reference is the same of each training
sequence, read from the version's dataset revision by the reader the trainer uses
(:mod:`shipyard_common.datasets.sequences`: a list column of lists or of their JSON text, or long
format grouped by id and ordered by step), with the sequence's target beside it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from services.monitor.windows.lineage import Lineage
from services.monitor.windows.references import Reference, describe
from shipyard_common.datasets.sequences import SequenceLayout, read_sequences
from shipyard_common.errors import Conflict, InvalidInput

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


def _reference_frame(reference: Reference, *, source: SequenceLayout, lineage: Lineage,
                     names: tuple[str, ...]) -> pd.DataFrame:
    """Each training sequence's summary (``names``: its step features' means, its length) and its
    target, read by the platform's one reader of sequences, as the trainer read them."""
    where = f"dataset {reference.dataset!r} at {reference.rev[:12]}"
    layout = source if source.column is not None else replace(source, features=lineage.features)
    try:
        read = read_sequences(reference.frame, layout, dtype=np.float64)
    except InvalidInput as exc:
        raise Conflict(f"{where}: {exc.message}") from exc
    width = lineage.inputs.width
    if read.values[0].shape[1] != width:
        raise Conflict(f"{where}: its sequences have steps of {read.values[0].shape[1]} value(s); the "
                       f"version takes steps of {width}")
    lengths = np.array([len(steps) for steps in read.values])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    means = np.add.reduceat(np.concatenate(read.values), starts, axis=0) / lengths[:, np.newaxis]
    found = pd.DataFrame(np.column_stack([means, lengths.astype(np.float64)]), columns=list(names))
    target = lineage.target
    if target and target in read.rows.columns and target not in names:
        found[target] = read.rows[target].to_numpy()
    return found
