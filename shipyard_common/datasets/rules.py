"""The checks a dataset version must pass before it is accepted, run with pandera.

Rules come from ``rules/<name>.yaml`` in the data repository (format: docs/data.md); the schema
check against the previous version (same columns, same dtypes) always runs. Pandera decides
what passes; each rule also says what it measured, so that a refusal names every failing rule
with its figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pandera.pandas as pa
import yaml
from pandera.errors import SchemaError, SchemaErrors
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shipyard_common.errors import InvalidInput, ValidationFailed


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RowRule(_Strict):
    min: int | None = Field(default=None, ge=0)
    max: int | None = Field(default=None, ge=0)


class DuplicateRule(_Strict):
    columns: list[str] | None = Field(default=None, min_length=1, description="whole rows when null")
    max: int = Field(default=0, ge=0)


class ColumnRule(_Strict):
    max_null_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    min: float | None = None
    max: float | None = None
    allowed: list[Any] | None = Field(default=None, min_length=1)


class LabelRule(_Strict):
    column: str
    classes: list[Any] | None = Field(default=None, min_length=1, description="each must be present")
    min_share: float | None = Field(default=None, ge=0.0, le=1.0)
    max_share: float | None = Field(default=None, ge=0.0, le=1.0)


class Rules(_Strict):
    """The YAML file's content."""

    rows: RowRule | None = None
    duplicates: DuplicateRule | None = None
    max_null_fraction: float | None = Field(default=None, ge=0.0, le=1.0, description="every column")
    columns: dict[str, ColumnRule] = Field(default_factory=dict)
    label: LabelRule | None = None

    @model_validator(mode="after")
    def _bounds_in_order(self) -> Rules:
        rows = self.rows
        if rows and rows.min is not None and rows.max is not None and rows.min > rows.max:
            raise ValueError("rows.min is above rows.max")
        for name, column in self.columns.items():
            if column.min is not None and column.max is not None and column.min > column.max:
                raise ValueError(f"columns.{name}: min is above max")
        return self


def parse_rules(text: str, *, source: str = "rules") -> Rules:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"{source} must be a mapping of rules (see docs/data.md)")
    try:
        return Rules.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'rules'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidInput(f"{source} is not a valid rules file: {problems}") from None


@dataclass(frozen=True)
class Failure:
    rule: str
    column: str | None
    message: str
    figures: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "column": self.column, "message": self.message, "figures": self.figures}


@dataclass(frozen=True)
class _Rule:
    rule: str
    column: str | None
    check: pa.Check
    explain: Callable[[pd.DataFrame], tuple[str, dict[str, Any]]]


def _plain(value: Any) -> Any:
    """A value as JSON has it; integral floats as ints, so that 1.0 and 1 name one class."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _dtype_kind(series: pd.Series) -> str:
    return str(series.dtype)


def schema_of(frame: pd.DataFrame) -> dict[str, str]:
    return {str(column): _dtype_kind(frame[column]) for column in frame.columns}


def _null_rule(column: str, limit: float) -> _Rule:
    def explain(frame: pd.DataFrame) -> tuple[str, dict[str, Any]]:
        nulls = int(frame[column].isna().sum())
        share = nulls / max(len(frame), 1)
        figures = {"nulls": nulls, "rows": len(frame), "null_fraction": share, "limit": limit}
        return (f"{column!r} is {_pct(share)} null ({nulls} of {len(frame)} rows), over the limit of "
                f"{_pct(limit)}", figures)

    check = pa.Check(lambda s: bool(s.isna().mean() <= limit) if len(s) else True,
                     ignore_na=False, name=f"nulls:{column}")
    return _Rule("nulls", column, check, explain)


def _range_rule(column: str, low: float | None, high: float | None) -> _Rule:
    def outside(series: pd.Series) -> pd.Series:
        values = pd.to_numeric(series, errors="coerce")
        bad = values.isna() & series.notna()
        if low is not None:
            bad |= values < low
        if high is not None:
            bad |= values > high
        return bad

    def explain(frame: pd.DataFrame) -> tuple[str, dict[str, Any]]:
        bad = outside(frame[column])
        values = pd.to_numeric(frame[column], errors="coerce")
        observed = {"min": _plain(values.min()), "max": _plain(values.max())}
        return (f"{int(bad.sum())} value(s) of {column!r} outside [{low}, {high}] "
                f"(seen {observed['min']} … {observed['max']})",
                {"outside": int(bad.sum()), "min": low, "max": high, "observed": observed})

    check = pa.Check(lambda s: ~outside(s), name=f"range:{column}")
    return _Rule("range", column, check, explain)


def _category_rule(column: str, allowed: list[Any]) -> _Rule:
    allowed_set = {_plain(v) for v in allowed}

    def explain(frame: pd.DataFrame) -> tuple[str, dict[str, Any]]:
        counts = frame[column].dropna().map(_plain).value_counts()
        unknown = {str(k): int(v) for k, v in counts.items() if k not in allowed_set}
        return (f"{column!r} has value(s) outside the allowed categories: {sorted(unknown)}",
                {"unexpected": unknown, "allowed": sorted(allowed_set, key=str)})

    check = pa.Check(lambda s: s.map(_plain).isin(allowed_set), name=f"categories:{column}")
    return _Rule("categories", column, check, explain)


def _shares(frame: pd.DataFrame, column: str) -> dict[Any, float]:
    counts = frame[column].dropna().map(_plain).value_counts()
    total = max(int(counts.sum()), 1)
    return {key: int(count) / total for key, count in counts.items()}


def _label_rules(label: LabelRule) -> list[_Rule]:
    rules: list[_Rule] = []
    column = label.column
    if label.classes is not None:
        expected = [_plain(c) for c in label.classes]

        def missing(frame: pd.DataFrame) -> list[Any]:
            if column not in frame:
                return expected
            present = set(frame[column].dropna().map(_plain))
            return [c for c in expected if c not in present]

        def explain_missing(frame: pd.DataFrame) -> tuple[str, dict[str, Any]]:
            gone = missing(frame)
            return (f"class(es) {gone} of label {column!r} missing (expected {expected})",
                    {"missing": gone, "expected": expected, "shares": _json_shares(frame, column)})

        rules.append(_Rule("label_classes", column,
                           pa.Check(lambda df: not missing(df), name="label_classes"), explain_missing))
    if label.min_share is not None or label.max_share is not None:
        low, high = label.min_share, label.max_share

        def out_of_bounds(frame: pd.DataFrame) -> dict[str, float]:
            if column not in frame:
                return {}
            return {str(k): v for k, v in _shares(frame, column).items()
                    if (low is not None and v < low) or (high is not None and v > high)}

        def explain_share(frame: pd.DataFrame) -> tuple[str, dict[str, Any]]:
            bad = out_of_bounds(frame)
            listed = ", ".join(f"{k}: {_pct(v)}" for k, v in bad.items())
            return (f"class share(s) of label {column!r} outside [{low}, {high}]: {listed}",
                    {"out_of_bounds": bad, "min_share": low, "max_share": high})

        rules.append(_Rule("label_share", column,
                           pa.Check(lambda df: not out_of_bounds(df), name="label_share"), explain_share))
    return rules


def _json_shares(frame: pd.DataFrame, column: str) -> dict[str, float]:
    return {str(k): round(v, 6) for k, v in _shares(frame, column).items()} if column in frame else {}


def _duplicate_rule(rule: DuplicateRule) -> _Rule:
    def count(frame: pd.DataFrame) -> int:
        subset = [c for c in rule.columns if c in frame] if rule.columns else None
        return int(frame.duplicated(subset=subset).sum())

    def explain(frame: pd.DataFrame) -> tuple[str, dict[str, Any]]:
        found = count(frame)
        over = f"on {rule.columns}" if rule.columns else "of whole rows"
        return (f"{found} duplicate(s) {over}, at most {rule.max} allowed",
                {"duplicates": found, "max": rule.max, "columns": rule.columns})

    return _Rule("duplicates", None, pa.Check(lambda df: count(df) <= rule.max, name="duplicates"), explain)


def _row_rule(rule: RowRule) -> _Rule:
    def explain(frame: pd.DataFrame) -> tuple[str, dict[str, Any]]:
        return (f"{len(frame)} rows, expected between {rule.min} and {rule.max}",
                {"rows": len(frame), "min": rule.min, "max": rule.max})

    def within(frame: pd.DataFrame) -> bool:
        return (rule.min is None or len(frame) >= rule.min) and (rule.max is None or len(frame) <= rule.max)

    return _Rule("rows", None, pa.Check(within, name="rows"), explain)


def _schema_failures(frame: pd.DataFrame, previous: dict[str, str]) -> list[Failure]:
    """Pandera's strict schema from the previous version's columns and dtypes, run lazily."""
    schema = pa.DataFrameSchema(
        {column: pa.Column(dtype, nullable=True, required=True) for column, dtype in previous.items()},
        strict=True,
    )
    try:
        schema.validate(frame, lazy=True)
    except SchemaErrors:
        pass
    else:
        return []
    current = schema_of(frame)
    added = [c for c in current if c not in previous]
    removed = [c for c in previous if c not in current]
    changed = {c: {"was": previous[c], "now": current[c]} for c in previous if c in current
               and current[c] != previous[c]}
    parts = []
    if removed:
        parts.append(f"column(s) {removed} missing")
    if added:
        parts.append(f"column(s) {added} new")
    if changed:
        moved = ", ".join(f"{c} {v['was']} → {v['now']}" for c, v in changed.items())
        parts.append(f"dtype changed: {moved}")
    return [Failure("schema", None, "schema differs from the previous version: " + "; ".join(parts),
                    {"added": added, "removed": removed, "changed": changed})]


def check(frame: pd.DataFrame, rules: Rules | None, previous: dict[str, str] | None) -> list[Failure]:
    """Every failing rule with its figures; an empty list accepts the version."""
    failures = _schema_failures(frame, previous) if previous is not None else []
    rules = rules or Rules()
    listed: list[_Rule] = []
    columns: dict[str, list[pa.Check]] = {}
    for column in frame.columns:
        name = str(column)
        spec = rules.columns.get(name, ColumnRule())
        limit = spec.max_null_fraction if spec.max_null_fraction is not None else rules.max_null_fraction
        own: list[_Rule] = []
        if limit is not None:
            own.append(_null_rule(name, limit))
        if spec.min is not None or spec.max is not None:
            own.append(_range_rule(name, spec.min, spec.max))
        if spec.allowed is not None:
            own.append(_category_rule(name, spec.allowed))
        listed.extend(own)
        columns[name] = [r.check for r in own]
    missing_ruled = [c for c in rules.columns if c not in frame.columns]
    if rules.label is not None and rules.label.column not in frame.columns:
        missing_ruled.append(rules.label.column)
    for column in dict.fromkeys(missing_ruled):
        failures.append(Failure("columns", column, f"the rules name column {column!r}, which the data lacks",
                                {"columns": [str(c) for c in frame.columns]}))
    frame_rules: list[_Rule] = []
    if rules.rows is not None:
        frame_rules.append(_row_rule(rules.rows))
    if rules.duplicates is not None:
        frame_rules.append(_duplicate_rule(rules.duplicates))
    if rules.label is not None and rules.label.column in frame.columns:
        frame_rules.extend(_label_rules(rules.label))
    listed.extend(frame_rules)
    schema = pa.DataFrameSchema(
        {name: pa.Column(nullable=True, checks=checks) for name, checks in columns.items() if checks},
        checks=[r.check for r in frame_rules],
    )
    failed: set[str] = set()
    try:
        schema.validate(frame, lazy=True)
    except SchemaErrors as exc:
        failed = {str(name) for name in exc.failure_cases["check"].dropna().unique()}
    except SchemaError as exc:  # pragma: no cover - lazy validation collects, but be safe
        failed = {str(getattr(exc.check, "name", ""))}
    for rule in listed:
        if rule.check.name in failed:
            message, figures = rule.explain(frame)
            failures.append(Failure(rule.rule, rule.column, message, figures))
    return failures


def refuse(name: str, failures: list[Failure]) -> ValidationFailed:
    summary = "; ".join(f"{f.rule}: {f.message}" for f in failures)
    return ValidationFailed(
        f"dataset {name!r} refused, {len(failures)} rule(s) failed: {summary}",
        details={"dataset": name, "failures": [f.as_dict() for f in failures]},
    )
