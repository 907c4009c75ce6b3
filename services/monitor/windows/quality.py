"""Data quality of a window against the reference's statistics, and the status it gives the window.

Shares, as stored in ``WindowRecord.quality`` and exported as gauges:

- ``schema_mismatch_share``: logged rows whose width is not the version's feature count (or
  inputs that are not rows at all; for a table, not its columns; for sequences, sequences whose
  steps are not of the version's step width), over every logged row of the window;
- ``missing_share``: missing values (null, NaN) over every value of the rows that fit;
- ``out_of_range_share``: numerical values outside the reference's [min, max], over the present
  numerical values; ``unseen_category_share``: categorical values the reference never had, over
  the present categorical values. Per feature, the non-zero shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from services.monitor.windows.frames import Typed, WindowRows
from services.monitor.windows.references import NUMERICAL, ColumnStats

OK = "ok"
EMPTY = "empty"
TOO_FEW_ROWS = "too_few_rows"
ALL_MISSING = "all_missing"
SCHEMA_CHANGE = "schema_change"
ERROR = "error"
STATUSES = (OK, EMPTY, TOO_FEW_ROWS, ALL_MISSING, SCHEMA_CHANGE, ERROR)
# Unseen values kept per feature, for a person to look at.
_EXAMPLES = 10


@dataclass(frozen=True)
class Verdict:
    status: str
    message: str | None


def _share(part: float, whole: float) -> float:
    return float(part / whole) if whole else 0.0


def schema_quality(found: WindowRows) -> dict[str, Any]:
    return {
        "rows": found.total,
        "checked_rows": found.fitting,
        "expected_width": found.expected,
        "widths": {str(width): count for width, count in sorted(found.widths.items())},
        "not_rows": found.not_rows,
        "schema_mismatch_rows": found.mismatched,
        "schema_mismatch_share": _share(found.mismatched, found.total),
    }


def value_quality(typed: Typed, columns: dict[str, ColumnStats]) -> dict[str, Any]:
    """Missing, out-of-range, unseen and mistyped values of the rows that fit the schema."""
    frame = typed.frame
    missing = frame.isna().sum()
    out_of_range: dict[str, float] = {}
    unseen: dict[str, dict[str, Any]] = {}
    numeric_present = numeric_outside = categorical_present = categorical_unseen = 0
    for name in frame.columns:
        stats = columns[name]
        present = frame[name].dropna()
        if stats.kind == NUMERICAL:
            outside = _outside(present.to_numpy(dtype=np.float64), stats)
            numeric_present += len(present)
            numeric_outside += outside
            if outside:
                out_of_range[name] = _share(outside, len(present))
        else:
            new = present[~present.isin(stats.categories)]
            categorical_present += len(present)
            categorical_unseen += len(new)
            if len(new):
                examples = sorted(map(str, new.unique()))[:_EXAMPLES]
                unseen[name] = {"share": _share(len(new), len(present)), "values": examples}
    rows = len(frame)
    return {
        "missing_share": _share(int(missing.sum()), rows * len(frame.columns)),
        "missing": {str(k): _share(int(v), rows) for k, v in missing.items() if v},
        "out_of_range_share": _share(numeric_outside, numeric_present),
        "out_of_range": out_of_range,
        "unseen_category_share": _share(categorical_unseen, categorical_present),
        "unseen_categories": unseen,
        "type_mismatch": {k: _share(v, rows) for k, v in typed.type_mismatch.items()},
    }


def _outside(values: np.ndarray, stats: ColumnStats) -> int:
    if stats.minimum is None or stats.maximum is None:
        return 0
    return int(np.count_nonzero((values < stats.minimum) | (values > stats.maximum)))


def judge(found: WindowRows, frame: pd.DataFrame | None, *, min_rows: int) -> Verdict:
    """Whether drift can be computed on the window (``ok``), or why not."""
    fit, total = found.fitting, found.total
    if total == 0:
        return Verdict(EMPTY, "no predictions were logged in this window")
    if fit == 0:
        return Verdict(SCHEMA_CHANGE, f"none of the {total} rows has {found.expected_shape} the "
                                      f"version was trained on (widths found: {_widths(found)})")
    if fit < min_rows:
        if found.mismatched:
            return Verdict(SCHEMA_CHANGE, f"{found.mismatched} of {total} rows do not have "
                                          f"{found.expected_shape} ({_widths(found)}); {fit} left, "
                                          f"drift needs at least {min_rows}")
        return Verdict(TOO_FEW_ROWS, f"{fit} rows; drift needs at least {min_rows}")
    if frame is not None and not frame.notna().to_numpy().any():
        return Verdict(ALL_MISSING, f"every value of the {fit} rows is missing")
    return Verdict(OK, None)


def _widths(found: WindowRows) -> str:
    parts = [f"{count} of width {width}" for width, count in sorted(found.widths.items())]
    if found.not_rows:
        parts.append(f"{found.not_rows} not rows of the version's inputs")
    return ", ".join(parts)
