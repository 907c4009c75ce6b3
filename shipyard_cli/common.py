"""What every ``shipyard`` command shares: the console, the token option, settings, a client, failing."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from shipyard_cli.client import ShipyardClient
from shipyard_common.settings import PlatformSettings, disable_telemetry

console = Console()
TokenOption = Annotated[str, typer.Option(envvar="SHIPYARD_API_TOKEN", help="API token.")]


def platform_settings() -> PlatformSettings:
    disable_telemetry()
    return PlatformSettings()


def client_for(token: str) -> ShipyardClient:
    return ShipyardClient(platform_settings(), token=token)


def fail(message: str) -> NoReturn:
    # Services echo what they were sent ("model name '[/x]' is not allowed"): print it as text,
    # never as rich markup, which would restyle it or raise on an unmatched closing tag.
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code=1)
