"""The objective over trials as an SVG picture: one dot per trial that has a value (complete ones filled,
pruned ones hollow, at their last per-epoch value) and the best so far as a step line. Drawn as plain
SVG text: no plotting library in the API process."""

from __future__ import annotations

from collections.abc import Callable
from html import escape

from services.trainer.sweeps.schemas import SweepPublic, TrialState

WIDTH, HEIGHT, MARGIN = 640, 360, 56
Scale = Callable[[float], float]


def objective_svg(sweep: SweepPublic) -> str:
    points = [(t.number, t.value, t.state) for t in sweep.trials if t.value is not None]
    title = (f"{sweep.objective.metric} over trials ({sweep.objective.goal.value}), sweep {sweep.id[:8]}, "
             f"{sweep.state.value}")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
             f"<title>{escape(title)}</title>",
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<text x="{WIDTH / 2}" y="20" text-anchor="middle">{escape(title)}</text>']
    if not points:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">'
                     "no trial has a value yet</text>")
        return "\n".join([*parts, "</svg>"])
    numbers = [p[0] for p in points]
    values = [float(p[1]) for p in points if p[1] is not None]
    x_low, x_high = min(numbers), max(max(numbers), min(numbers) + 1)
    y_low, y_high = min(values), max(values)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5

    def x(n: float) -> float:
        return MARGIN + (n - x_low) / (x_high - x_low) * (WIDTH - 2 * MARGIN)

    def y(v: float) -> float:
        return HEIGHT - MARGIN - (v - y_low) / (y_high - y_low) * (HEIGHT - 2 * MARGIN)

    parts += _axes(x_low, x_high, y_low, y_high)
    parts.append(_best_line(sweep, x, y))
    for number, value, state in points:
        fill = "#1f77b4" if state == TrialState.COMPLETE else "none"
        parts.append(f'<circle class="trial {state.value}" cx="{x(number):.1f}" '
                     f'cy="{y(float(value or 0)):.1f}" '
                     f'r="4" fill="{fill}" stroke="#1f77b4"><title>trial {number}: {value:.6g} '
                     f'({state.value})</title></circle>')
    return "\n".join([*parts, "</svg>"])


def _axes(x_low: int, x_high: int, y_low: float, y_high: float) -> list[str]:
    bottom, right = HEIGHT - MARGIN, WIDTH - MARGIN
    return [f'<line x1="{MARGIN}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
            f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{bottom}" stroke="black"/>',
            f'<text x="{WIDTH / 2}" y="{HEIGHT - 16}" text-anchor="middle">trial</text>',
            f'<text x="{MARGIN - 4}" y="{bottom}" text-anchor="end">{y_low:.4g}</text>',
            f'<text x="{MARGIN - 4}" y="{MARGIN + 4}" text-anchor="end">{y_high:.4g}</text>',
            f'<text x="{MARGIN}" y="{bottom + 16}" text-anchor="middle">{x_low}</text>',
            f'<text x="{right}" y="{bottom + 16}" text-anchor="middle">{x_high}</text>']


def _best_line(sweep: SweepPublic, x: Scale, y: Scale) -> str:
    """The best complete value so far, as a step line across the trials."""
    maximize = sweep.objective.goal.value == "maximize"
    best: float | None = None
    path: list[str] = []
    for trial in sweep.trials:
        if trial.state != TrialState.COMPLETE or trial.value is None:
            continue
        if best is None or (trial.value > best if maximize else trial.value < best):
            if best is not None:
                path.append(f"L{x(trial.number):.1f},{y(best):.1f}")
            best = trial.value
            path.append(f"{'M' if len(path) == 0 else 'L'}{x(trial.number):.1f},{y(best):.1f}")
    return f'<path class="best-so-far" d="{" ".join(path)}" fill="none" stroke="#d62728"/>'
