"""``shipyard predict``: ask serving for predictions.

A top-level command; ``shipyard_cli.main`` registers it on the root app (``shipyard drift`` lives in
``shipyard_cli.drift``).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from shipyard_cli.client import ClientError
from shipyard_cli.common import TokenOption, client_for, console, fail
from shipyard_common.settings import DEV_ADMIN_TOKEN


def predict(
    model: str,
    inputs: Annotated[str, typer.Option(help='Rows as JSON, e.g. "[[1.0, 2.0]]"; "-" reads stdin.')],
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Ask the serving service for a prediction."""
    raw = sys.stdin.read() if inputs == "-" else inputs
    try:
        rows = json.loads(raw)
    except ValueError as exc:
        fail(f"--inputs is not JSON: {exc}")
    try:
        console.print_json(json.dumps(client_for(token).predict(model, rows)))
    except ClientError as exc:
        fail(exc.message)

