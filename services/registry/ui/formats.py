"""How the pages write numbers, moments and Markdown: small pure functions, used as Jinja filters."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from markdown_it import MarkdownIt
from markupsafe import Markup

# CommonMark with tables (the trainer's model card has one); raw HTML is never passed through.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")

# Metric names where a smaller figure is the better one; every other metric is better larger.
_LOWER_IS_BETTER = ("loss", "error", "mae", "mse", "rmse", "mape", "latency", "perplexity", "diff")


def number(value: float | int | None) -> str:
    """A figure as a table shows it: 4 decimals below 100, thousands separated above, whole counts bare."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 10):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4f}"


def signed(value: float | None) -> str:
    """A difference, always with its sign (``+0.0123``, ``−0.0040``, ``0``)."""
    if value is None or math.isnan(value):
        return "—"
    if value == 0:
        return "0"
    text = number(abs(value))
    return f"+{text}" if value > 0 else f"\u2212{text}"


def percent(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.0f}%" if (value * 100).is_integer() else f"{value * 100:.1f}%"


def lower_is_better(metric: str) -> bool:
    name = metric.lower()
    return any(part in name for part in _LOWER_IS_BETTER)


def direction(metric: str, delta: float | None) -> str:
    """``better``, ``worse`` or ``same``: how a change of ``delta`` in ``metric`` reads."""
    if delta is None or delta == 0 or math.isnan(delta):
        return "same"
    improved = delta < 0 if lower_is_better(metric) else delta > 0
    return "better" if improved else "worse"


def moment(value: datetime | None) -> str:
    """An absolute time, always in UTC: ``2026-12-06 06:04 UTC``."""
    if value is None:
        return "—"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """How long ago, in the largest whole unit: ``just now``, ``5 min ago``, ``3 days ago``."""
    if value is None:
        return "—"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    if seconds < 45:
        return "just now"
    for size, unit in ((86400 * 365, "year"), (86400 * 30, "month"), (86400, "day"), (3600, "hour"),
                       (60, "min")):
        if seconds >= size:
            count = round(seconds / size)
            return f"{count} {unit}{'s' if count != 1 and unit != 'min' else ''} ago"
    return "1 min ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def markdown(text: str | None) -> Markup:
    """A model card as HTML; raw HTML in it is shown as text, unsafe link schemes are dropped."""
    return Markup(_MARKDOWN.render(text or ""))  # markdown-it escapes text; raw HTML is off


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


def shape(dims: Any) -> str:
    """A tensor shape as ``[batch, 30]``: a free (None) dimension reads as ``batch`` first, then ``?``."""
    if not isinstance(dims, list):
        return "—"
    names = [("batch" if i == 0 else "?") if d is None else str(d) for i, d in enumerate(dims)]
    return "[" + ", ".join(names) + "]"


def seg(value: object) -> str:
    """One URL path segment: a model name with spaces or slashes stays one segment."""
    return quote(str(value), safe="")


FILTERS = {
    "number": number, "signed": signed, "percent": percent, "moment": moment, "ago": ago,
    "duration": duration, "markdown": markdown, "pretty_json": pretty_json, "shape": shape,
    "seg": seg,
}
