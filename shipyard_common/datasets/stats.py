"""Summary statistics of a dataset version, and the differences between two versions."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

TOP_VALUES = 10


def _number(value: Any) -> float | int | None:
    if value is None:
        return None
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, bool | int):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def summarize(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per column: dtype, nulls, distinct values; numbers: min, max, mean, std, quartiles; others:
    the most frequent values."""
    summary: dict[str, dict[str, Any]] = {}
    for column in frame.columns:
        series = frame[column]
        entry: dict[str, Any] = {
            "dtype": str(series.dtype),
            "nulls": int(series.isna().sum()),
            "distinct": int(series.nunique(dropna=True)),
        }
        if _is_numeric(series):
            values = series.dropna()
            quartiles = values.quantile([0.25, 0.5, 0.75]) if len(values) else pd.Series(dtype=float)
            entry.update(
                min=_number(values.min()) if len(values) else None,
                max=_number(values.max()) if len(values) else None,
                mean=_number(values.mean()) if len(values) else None,
                std=_number(values.std()) if len(values) > 1 else None,
                p25=_number(quartiles.get(0.25)), p50=_number(quartiles.get(0.5)),
                p75=_number(quartiles.get(0.75)),
            )
        else:
            counts = series.dropna().astype(str).value_counts().head(TOP_VALUES)
            entry["top"] = {str(k): int(v) for k, v in counts.items()}
        summary[str(column)] = entry
    return summary


def _ks(a: pd.Series, b: pd.Series) -> tuple[float | None, float | None]:
    from scipy.stats import ks_2samp

    a, b = a.dropna().astype(float), b.dropna().astype(float)
    if not len(a) or not len(b):
        return None, None
    result = ks_2samp(a.to_numpy(), b.to_numpy())
    return _number(result.statistic), _number(result.pvalue)


def _shares(series: pd.Series) -> pd.Series:
    return series.dropna().astype(str).value_counts(normalize=True)


def diff(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, Any]:
    """What changed from ``a`` to ``b``: columns added, removed or of another dtype; rows; and per
    shared column the distribution shift (numbers: Kolmogorov-Smirnov statistic and p-value, mean
    and null changes; others: total variation distance of the value shares, values new and gone)."""
    a_cols, b_cols = [str(c) for c in a.columns], [str(c) for c in b.columns]
    changed = {
        c: {"was": str(a[c].dtype), "now": str(b[c].dtype)}
        for c in a_cols if c in b_cols and str(a[c].dtype) != str(b[c].dtype)
    }
    columns: dict[str, dict[str, Any]] = {}
    for column in (c for c in a_cols if c in b_cols):
        x, y = a[column], b[column]
        entry: dict[str, Any] = {
            "nulls": {"a": int(x.isna().sum()), "b": int(y.isna().sum())},
        }
        if _is_numeric(x) and _is_numeric(y):
            statistic, p_value = _ks(x, y)
            mean_a, mean_b = _number(x.mean()), _number(y.mean())
            entry.update(
                method="ks", shift=statistic, p_value=p_value, mean={"a": mean_a, "b": mean_b,
                "delta": None if mean_a is None or mean_b is None else mean_b - mean_a},
            )
        else:
            sa, sb = _shares(x), _shares(y)
            keys = sa.index.union(sb.index)
            tvd = float(np.abs(sa.reindex(keys, fill_value=0) - sb.reindex(keys, fill_value=0)).sum() / 2)
            entry.update(
                method="tvd", shift=_number(tvd),
                new_values=sorted(str(k) for k in sb.index.difference(sa.index))[:TOP_VALUES],
                gone_values=sorted(str(k) for k in sa.index.difference(sb.index))[:TOP_VALUES],
            )
        columns[column] = entry
    return {
        "schema": {
            "added": [c for c in b_cols if c not in a_cols],
            "removed": [c for c in a_cols if c not in b_cols],
            "changed": changed,
        },
        "rows": {"a": len(a), "b": len(b), "delta": len(b) - len(a)},
        "columns": columns,
    }
