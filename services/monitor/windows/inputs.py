"""How a version takes its inputs, read from its signature tag (``shipyard.signature``), and so how its
logged requests are read: rows of numbers, a table's columns, or variable-length sequences.

- **rows**: one input of shape [batch, features]; serving logs each request as a list of rows.
- **table** (the trainer's tables with strings and nulls): one input of shape [batch] per feature
  column; a ``string`` input is a categorical column, any other a numerical one. Serving logs a
  request as ``{column: [values]}`` (one column alone: its list of values), a null categorical value
  as ``""`` and a null number as null.
- **sequences** (the trainer's ``data.sequence``): one input [batch, time, width] of floats,
  ``nullable`` (NaN steps pad each sequence after its end); serving logs a request's sequences padded
  with null to one length. Where the training dataset holds the sequences (a list column, or long
  format by id and step) is the job's ``data.sequence``, which the trainer logs as its run's params
  (without them, a list column its features name).

A version without a signature tag (registered by hand, or before the tag) is read as rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.monitor.windows.references import CATEGORICAL, NUMERICAL

ROWS = "rows"
TABLE = "table"
SEQUENCES = "sequences"
# The trainer's run params for data.sequence (its job spec, flattened: services/trainer/engines/tracking.py).
_SEQUENCE_PARAM = "data.sequence."
# The trainer's name for step feature i of a list column of wider steps: "<column>[i]".
_LIST_FEATURE = re.compile(r"(.+)\[(\d+)\]")


@dataclass(frozen=True)
class SequenceSource:
    """Where the training dataset holds its sequences: a list ``column`` (one sequence per row), or
    long format (one row per step, grouped by ``id``, ordered by ``step``)."""

    column: str | None = None
    id: str | None = None
    step: str | None = None


@dataclass(frozen=True)
class Inputs:
    """What one logged request holds for a version (see the module's docstring).

    ``categorical``: a table's string columns; ``width``: a sequence's step width; ``source``: where
    the training dataset holds the sequences.
    """

    kind: str = ROWS
    categorical: frozenset[str] = frozenset()
    width: int = 0
    source: SequenceSource | None = None

    def kinds(self, features: tuple[str, ...]) -> dict[str, str] | None:
        """A table's column kinds as the model takes them; None (the reference's dtypes decide) otherwise."""
        if self.kind != TABLE:
            return None
        return {name: CATEGORICAL if name in self.categorical else NUMERICAL for name in features}


def read_inputs(signature: str | None, *, features: tuple[str, ...]) -> Inputs:
    """The layout the signature tag's JSON describes; rows when there is none or it says neither."""
    try:
        found = json.loads(signature) if signature else None
    except ValueError:
        found = None
    specs = found.get("inputs") if isinstance(found, dict) else None
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
        return Inputs()
    shapes = [s.get("shape") if isinstance(s.get("shape"), list) else [] for s in specs]
    if len(specs) == 1 and _takes_sequences(specs[0], shapes[0]):
        return Inputs(kind=SEQUENCES, width=int(shapes[0][2]))
    names = [str(s.get("name")) for s in specs]
    if all(len(shape) == 1 for shape in shapes) and sorted(names) == sorted(features):
        return Inputs(kind=TABLE, categorical=frozenset(
            name for name, spec in zip(names, specs, strict=True) if spec.get("dtype") == "string"))
    return Inputs()


def _takes_sequences(spec: Mapping[str, Any], shape: list[Any]) -> bool:
    """Serving's ``takes_sequences``: [batch, time, width] floats, nullable (padded with NaN)."""
    return (spec.get("nullable") is True and len(shape) == 3 and isinstance(shape[2], int) and shape[2] > 0
            and str(spec.get("dtype", "")).startswith("float"))


def sequence_source(params: Mapping[str, str], *, features: tuple[str, ...]) -> SequenceSource | None:
    """The training job's ``data.sequence`` from its run's params; without them, a list column its
    features name (``[steps]``, or ``[steps[0], steps[1], ...]``, the trainer's names for a list
    column's steps), as batch scoring reads it (pipelines/batch/model.py); else None."""
    def param(name: str) -> str | None:
        value = params.get(f"{_SEQUENCE_PARAM}{name}")
        return None if value in (None, "", "null", "None") else value

    column, id_, step = param("column"), param("id"), param("step")
    if column is not None:
        return SequenceSource(column=column)
    if id_ is not None and step is not None:
        return SequenceSource(id=id_, step=step)
    column = _list_column(features)
    return None if column is None else SequenceSource(column=column)


def _list_column(features: tuple[str, ...]) -> str | None:
    """The list column the trainer named ``features`` after: ``[steps]``, or ``steps[0]``, ``steps[1]`` …"""
    matches = [_LIST_FEATURE.fullmatch(name) for name in features]
    if len(features) == 1 and matches[0] is None:
        return features[0]
    named = {match.group(1) for match in matches if match is not None}
    indexes = [int(match.group(2)) for match in matches if match is not None]
    return named.pop() if len(named) == 1 and indexes == list(range(len(features))) else None
