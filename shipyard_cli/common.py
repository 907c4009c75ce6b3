"""What every ``shipyard`` command shares: the console, the token option, settings, a client, failing."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.markup import escape

from shipyard_cli.client import ClientError, ShipyardClient
from shipyard_common.settings import PlatformSettings, disable_telemetry

console = Console()
T = TypeVar("T")
TokenOption = Annotated[str, typer.Option(envvar="SHIPYARD_API_TOKEN", help="API token.")]


def platform_settings() -> PlatformSettings:
    """The platform settings from the environment; a bad one exits 1 naming each setting and what is
    wrong with it (never a traceback: ``SHIPYARD_ENV=prod`` with the development tokens, say)."""
    disable_telemetry()
    try:
        return PlatformSettings()
    except ValidationError as exc:
        fail(settings_problem(exc))
    except SettingsError as exc:  # a value that is not even JSON (SHIPYARD_TOKENS=abc)
        found = re.search(r'field "(\w+)"', str(exc))
        name = f"SHIPYARD_{found.group(1).upper()}" if found else "a SHIPYARD_ variable"
        fail(f"bad configuration in the environment: {name} cannot be read (it must be JSON): {exc}")


def settings_problem(exc: ValidationError) -> str:
    """A pydantic ``ValidationError`` on the platform settings as sentences: which environment
    variable, and what is wrong with it (the offending value is not repeated: it may be a token)."""
    lines = []
    for error in exc.errors():
        where = "_".join(str(part) for part in error["loc"]).upper()
        name = f"SHIPYARD_{where}" if where else "the settings"
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{name}: {message}")
    return "bad configuration in the environment:\n  " + "\n  ".join(lines)


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


def read_spec(path: Path) -> Any:
    """A spec file's content (YAML, so JSON too), or the command's exit naming what is wrong with it."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        fail(f"{path} is not valid YAML: {exc}")


#: The states after which a job or a sweep changes no more.
ENDED = ("succeeded", "failed", "cancelled")


def follow_until_ended(
    fetch: Callable[[], dict[str, Any]], show: Callable[[dict[str, Any]], None], *, poll_s: float
) -> dict[str, Any]:
    """Fetch a job or a sweep every ``poll_s`` seconds and ``show`` each fetch, until its state is one
    of :data:`ENDED`; return the last fetch. The one live-follow loop of the CLI."""
    while True:
        current = fetch()
        show(current)
        if current["state"] in ENDED:
            return current
        time.sleep(poll_s)
