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
  format by id and step) is the version's layout (:func:`shipyard_common.datasets.sequences.
  sequence_layout`: its shipyard.sequence tag, or its run's data.sequence params).

A version without a signature tag (registered by hand, or before the tag) is read as rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.monitor.windows.references import CATEGORICAL, NUMERICAL
from shipyard_common.datasets.sequences import SequenceLayout

ROWS = "rows"
TABLE = "table"
SEQUENCES = "sequences"


@dataclass(frozen=True)
class Inputs:
    """What one logged request holds for a version (see the module's docstring).

    ``categorical``: a table's string columns; ``width``: a sequence's step width; ``source``: where
    the training dataset holds the sequences.
    """

    kind: str = ROWS
    categorical: frozenset[str] = frozenset()
    width: int = 0
    source: SequenceLayout | None = None

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
