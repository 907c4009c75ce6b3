"""What every ``shipyard`` command shares: the console, the token option, settings, a client, failing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from shipyard_cli.client import ClientError, ShipyardClient
from shipyard_common.settings import PlatformSettings, disable_telemetry

console = Console()
T = TypeVar("T")
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


Refused = Callable[[ClientError], NoReturn]


def call(token: str, action: Callable[[ShipyardClient], T], *, refused: Refused | None = None) -> T:
    """``action`` with a client acting with ``token``; a service's refusal is printed (by ``refused``, if
    given) and the command exits 1. One place for what every command does with an error."""
    with client_for(token) as client:
        try:
            return action(client)
        except ClientError as exc:
            (refused or _refused)(exc)


def _refused(exc: ClientError) -> NoReturn:
    fail(exc.message)
