"""``shipyard feedback FILE``: send the true labels of answered requests to the monitor.

``FILE`` is a CSV with the columns ``request_id``, ``row`` (optional, default 0: the row within a
batched request) and ``label``, or JSON: a list of such objects, or one object a line. A CSV's
labels are text: one that reads as a number is sent as the number (the monitor matches ``"1"``,
``1`` and ``1.0`` to the same class either way). Labels are sent in calls of at most
``MAX_LABELS``; a label sent again for the same row replaces the earlier one.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from shipyard_cli.client import ClientError, ShipyardClient
from shipyard_cli.common import TokenOption, client_for, console, fail
from shipyard_common.settings import DEV_ADMIN_TOKEN

# The monitor's limit per POST /feedback.
MAX_LABELS = 10_000
COUNTS = ("received", "created", "replaced", "unchanged", "matched", "pending")


class BadFile(ValueError):
    """The file is not labels; the message says where and why."""


def feedback(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                         help="CSV (request_id,row,label) or JSON labels.")],
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Send true labels (or values) of answered requests to the monitor, which scores them live."""
    try:
        labels = read_labels(file)
    except BadFile as exc:
        fail(f"{file}: {exc}")
    if not labels:
        fail(f"{file} holds no labels")
    try:
        with client_for(token) as client:
            totals = send_labels(client=client, labels=labels)
    except ClientError as exc:
        fail(exc.message)
    table = Table(*COUNTS)
    table.add_row(*(f"{totals[key]:,}" for key in COUNTS))
    console.print(table)
    if totals["pending"]:
        console.print(f"{totals['pending']:,} label(s) wait for their request in the prediction log; "
                      "the monitor joins them once serving has shipped it.")


def send_labels(*, client: ShipyardClient, labels: list[dict[str, Any]]) -> dict[str, int]:
    """POST ``labels`` in calls of at most ``MAX_LABELS``; the summed counts of the answers."""
    totals = dict.fromkeys(COUNTS, 0)
    for start in range(0, len(labels), MAX_LABELS):
        answer = client.send_feedback(labels[start:start + MAX_LABELS])
        for key in COUNTS:
            totals[key] += int(answer.get(key, 0))
    return totals


def read_labels(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".json", ".jsonl", ".ndjson") or text.lstrip().startswith(("[", "{")):
        return json_labels(text)
    return csv_labels(text)


def json_labels(text: str) -> list[dict[str, Any]]:
    try:
        found = json.loads(text)
    except ValueError:
        try:  # one object a line
            found = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise BadFile(f"not JSON: {exc}") from exc
    if not isinstance(found, list) or not all(isinstance(item, dict) for item in found):
        raise BadFile("JSON labels are a list of {request_id, row, label} objects")
    return found


def csv_labels(text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = {"request_id", "label"} - set(reader.fieldnames or [])
    if missing:
        raise BadFile(f"the CSV lacks the column(s) {sorted(missing)}; it needs request_id, label (and row)")
    labels = []
    for line, record in enumerate(reader, start=2):
        row = (record.get("row") or "0").strip()
        if not row.isdigit():
            raise BadFile(f"line {line}: row {row!r} is not a row index (0, 1, …)")
        labels.append({"request_id": (record["request_id"] or "").strip(), "row": int(row),
                       "label": plain(record["label"] or "")})
    return labels


def plain(text: str) -> int | float | str:
    """A CSV cell as the label it means: an integer, a number, else the text itself."""
    value = text.strip()
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        return value
    return number if math.isfinite(number) else value
