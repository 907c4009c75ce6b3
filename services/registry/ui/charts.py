"""A metric across a model's versions, drawn on the server as an inline SVG (no script, no library).

Every text that goes into the picture is escaped; colours come from the stylesheet's classes, so
the page's Content-Security-Policy needs no inline style.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from markupsafe import Markup, escape

from services.registry.ui.formats import number

WIDTH, HEIGHT = 960, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 16, 36


@dataclass(frozen=True)
class Point:
    version: str
    value: float
    highlight: bool = False  # the production version


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values from at most ``low`` to at least ``high`` (steps of 1, 2 or 5 × 10^k)."""
    if high <= low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step + 1e-9) * step
    ticks = [round(first, 12)]
    while ticks[-1] < high - step * 1e-9:
        ticks.append(round(first + step * len(ticks), 12))
    return ticks


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high == low:
        pad = abs(low) * 0.05 or 0.05
        return low - pad, high + pad
    pad = (high - low) * 0.1
    return low - pad, high + pad


def metric_chart(points: list[Point], metric: str) -> Markup | None:
    """A line through ``points`` (oldest version first) with labelled axes; None without points."""
    if not points:
        return None
    ticks = nice_ticks(*_span([p.value for p in points]))
    low, high = ticks[0], ticks[-1] if len(ticks) > 1 else ticks[0] + 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(i: int) -> float:
        return LEFT + (plot_w / 2 if len(points) == 1 else plot_w * i / (len(points) - 1))

    def y(value: float) -> float:
        return TOP + plot_h * (1 - (value - low) / (high - low))

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(metric)} by version">']
    for tick in ticks:
        at = f"{y(tick):.1f}"
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{at}" y2="{at}"/>')
        parts.append(f'<text class="tick" x="{LEFT - 8}" y="{y(tick) + 4:.1f}" text-anchor="end">'
                     f"{escape(number(tick))}</text>")
    every = max(1, math.ceil(len(points) / 16))
    for i, point in enumerate(points):
        if i % every == 0 or i == len(points) - 1:
            parts.append(f'<text class="tick" x="{x(i):.1f}" y="{HEIGHT - 12}" text-anchor="middle">'
                         f"v{escape(point.version)}</text>")
    line = " ".join(f"{x(i):.1f},{y(p.value):.1f}" for i, p in enumerate(points))
    parts.append(f'<polyline class="series" points="{line}"/>')
    for i, point in enumerate(points):
        css = "dot production" if point.highlight else "dot"
        label = f"v{point.version}: {number(point.value)}" + (" (production)" if point.highlight else "")
        parts.append(f'<circle class="{css}" cx="{x(i):.1f}" cy="{y(point.value):.1f}" '
                     f'r="{6 if point.highlight else 4}"><title>{escape(label)}</title></circle>')
    parts.append("</svg>")
    return Markup("".join(parts))  # every text above is escaped
