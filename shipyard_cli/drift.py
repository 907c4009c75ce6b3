"""``shipyard drift MODEL``: the drift table of a model's newest computed window, and its recent windows.

Nothing is computed for the command: the monitor's loop closes windows and stores their verdicts;
this prints the newest ``ok`` one (per feature: Evidently's score, method and verdict; the
predictions' drift; data quality) and, with ``--windows N``, the newest N windows whatever their
status.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from shipyard_cli.client import ClientError
from shipyard_cli.common import TokenOption, client_for, console, fail
from shipyard_cli.views import num, when
from shipyard_common.settings import DEV_ADMIN_TOKEN


def drift(
    model: str,
    version: Annotated[str | None, typer.Option(help="One version only.")] = None,
    windows: Annotated[int, typer.Option(min=0, max=500, help="Also list the newest N windows.")] = 0,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Show the drift of a model's newest computed window (per feature, predictions, data quality)."""
    with client_for(token) as client:
        try:
            report = client.drift(model, version=version)
            page = client.windows(model, version=version, limit=windows) if windows else None
        except ClientError as exc:
            fail(exc.message)
    console.print(drift_table(report))
    console.print(quality_line(report))
    if page is not None:
        console.print(windows_table(page["items"]))


def drift_table(report: dict[str, Any]) -> Table:
    """Per feature: kind, Evidently's score, method and verdict; the title says which window."""
    span = f"{when(report.get('started_at'))} → {when(report.get('ended_at'))}"
    title = (f"{report['model']} v{report['version']}, window #{report['window_id']} "
             f"({span}, {report['current_rows']} rows): "
             f"dataset drift = {report['dataset_drift']} (share {report['drift_share']:.2f})")
    table = Table("feature", "kind", "score", "method", "drifted", title=title)
    for feature in report["features"]:
        table.add_row(feature["name"], feature.get("kind", ""), num(feature["score"]), str(feature["method"]),
                      "[red]yes[/red]" if feature["drifted"] else "no")
    prediction = report.get("prediction")
    if prediction:
        table.add_row("[bold]predictions[/bold]", "", num(prediction["score"]), str(prediction["method"]),
                      "[red]yes[/red]" if prediction["drifted"] else "no")
    return table


def quality_line(report: dict[str, Any]) -> str:
    quality = report.get("quality") or {}
    parts = [f"{label} {100 * float(quality.get(key) or 0):.1f}%" for key, label in (
        ("missing_share", "missing"), ("out_of_range_share", "out of range"),
        ("unseen_category_share", "unseen categories"), ("schema_mismatch_share", "other width"),
    )]
    line = "data quality: " + ", ".join(parts)
    if report.get("report_url"):
        line += f"; Evidently's report: {report['report_url']}"
    return line


def windows_table(items: list[dict[str, Any]]) -> Table:
    table = Table("window", "version", "kind", "ended", "rows", "status", "drift share", "dataset drift",
                  "message", title="newest windows")
    for item in items:
        table.add_row(str(item["id"]), str(item["version"]), item["kind"], when(item["ended_at"]),
                      str(item["rows"]), item["status"], num(item.get("drift_share")),
                      num(item.get("dataset_drift")), item.get("message") or "")
    return table
