"""Promotion gates: rules over a candidate version's metrics, checked before an approval moves an alias.

A rule is one line a person writes and reads back:

    val_accuracy >= 0.9                  the candidate's own figure
    val_accuracy >= production - 0.01    against the production version, when both were trained
                                         on the same dataset revision (otherwise not applicable)

Pure functions: parsing and judging; the service stores rules and fetches the versions.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from typing import Any

from services.registry.core.schemas import GateVerdict, RuleVerdict, VersionPublic
from shipyard_common.errors import InvalidInput

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
_RULE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][\w.\-/]{0,127})\s*(?P<op>>=|<=|==|>|<)\s*"
    r"(?:(?P<production>production)\s*(?:(?P<sign>[+-])\s*(?P<delta>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?))?"
    r"|(?P<value>[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?))\s*$"
)


def parse_rule(text: str) -> dict[str, Any]:
    """``'val_accuracy >= production - 0.01'`` → ``{"metric", "op", "value", "relative"}``."""
    match = _RULE.match(text)
    if match is None:
        raise InvalidInput(
            f"gate rule {text!r} is not understood: write '<metric> <op> <number>' or "
            "'<metric> <op> production [+|-] <number>', with op one of >=, <=, >, <, =="
        )
    if match["production"]:
        delta = float(match["delta"] or 0)
        value = -delta if match["sign"] == "-" else delta
        return {"metric": match["metric"], "op": match["op"], "value": value, "relative": True}
    return {"metric": match["metric"], "op": match["op"], "value": float(match["value"]), "relative": False}


def rule_text(rule: dict[str, Any]) -> str:
    """The rule as a person writes it (the inverse of :func:`parse_rule`)."""
    value = float(rule["value"])
    if not rule["relative"]:
        return f"{rule['metric']} {rule['op']} {value:g}"
    if value == 0:
        return f"{rule['metric']} {rule['op']} production"
    return f"{rule['metric']} {rule['op']} production {'-' if value < 0 else '+'} {abs(value):g}"


def _same_data(a: VersionPublic, b: VersionPublic) -> bool:
    return bool(a.lineage.dataset_rev) and (a.lineage.dataset, a.lineage.dataset_rev) == (
        b.lineage.dataset,
        b.lineage.dataset_rev,
    )


def _judge(rule: dict[str, Any], candidate: VersionPublic, production: VersionPublic | None) -> RuleVerdict:
    text, metric = rule_text(rule), rule["metric"]
    figure = (candidate.metrics or {}).get(metric)
    if rule["relative"]:
        skip = None
        if production is None:
            skip = "no production version to compare with"
        elif production.version == candidate.version:
            skip = f"v{candidate.version} is the production version"
        elif not _same_data(candidate, production):
            skip = (
                f"v{candidate.version} and production v{production.version} were trained on different "
                "dataset revisions"
            )
        elif (production.metrics or {}).get(metric) is None:
            skip = f"production v{production.version} has no {metric}"
        if skip is not None:
            return RuleVerdict(rule=text, passed=True, applicable=False, detail=f"not applicable: {skip}")
    if figure is None or math.isnan(figure):
        return RuleVerdict(rule=text, passed=False, detail=f"v{candidate.version} has no {metric} logged")
    if rule["relative"]:
        assert production is not None and production.metrics is not None
        base = production.metrics[metric]
        bound = base + float(rule["value"])
        passed = _OPS[rule["op"]](figure, bound)
        detail = (
            f"{metric} {figure:.4g} (v{candidate.version}) vs {bound:.4g} "
            f"(production v{production.version}: {base:.4g})"
        )
    else:
        bound = float(rule["value"])
        passed = _OPS[rule["op"]](figure, bound)
        detail = f"{metric} {figure:.4g} (v{candidate.version}) vs {bound:g}"
    return RuleVerdict(rule=text, passed=passed, detail=detail)


def judge(
    rules: list[dict[str, Any]], candidate: VersionPublic, production: VersionPublic | None
) -> GateVerdict:
    """Every rule's verdict for ``candidate``; the gate passes when no applicable rule fails."""
    verdicts = [_judge(rule, candidate, production) for rule in rules]
    failing = [v for v in verdicts if not v.passed]
    if not rules:
        summary = "no gate rules"
    elif failing:
        summary = "; ".join(f"{v.rule} fails: {v.detail}" for v in failing)
    else:
        summary = f"passes {sum(v.applicable for v in verdicts)} of {len(verdicts)} rules"
    return GateVerdict(passed=not failing, rules=verdicts, summary=summary)
