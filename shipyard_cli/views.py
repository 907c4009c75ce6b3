"""Rich renderings shared by the commands and the demo: table cells, gate verdicts, drift reports."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shipyard_cli.common import console


def num(value: Any) -> str:
    """A figure for a table cell: 4 significant digits, '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.4g}"


def delta(value: float | None) -> str:
    if value is None:
        return "-"
    colour = "green" if value > 0 else "red" if value < 0 else "dim"
    return f"[{colour}]{value:+.4g}[/{colour}]"


def when(value: str | None) -> str:
    """An ISO time from a service as 'YYYY-MM-DD HH:MM:SS' in UTC (naive times are UTC already)."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def gate_table(verdict: dict[str, Any]) -> Table:
    """A gate verdict, rule by rule."""
    table = Table("rule", "verdict", "detail", title="gate verdict", title_justify="left")
    for rule in verdict.get("rules") or []:
        if not rule.get("applicable", True):
            mark = "[dim]n/a[/dim]"
        else:
            mark = "[green]pass[/green]" if rule["passed"] else "[red]fail[/red]"
        table.add_row(escape(rule["rule"]), mark, escape(rule.get("detail") or ""))
    return table


def print_gate(verdict: dict[str, Any] | None, alias: str, out: Console = console) -> None:
    """A request's gate verdict: the rules' table and a line saying whether an approval would pass."""
    if verdict is None:
        out.print(f"gate: none covers {alias}")
        return
    out.print(gate_table(verdict))
    if verdict.get("passed"):
        out.print(f"gate: {escape(verdict.get('summary') or '')}")
    else:
        rules = verdict.get("rules") or []
        failing = sum(not rule["passed"] for rule in rules)
        out.print(f"gate: [red]blocks[/red]: an approval would be refused ({failing} of {len(rules)} "
                  "rules fail)")
