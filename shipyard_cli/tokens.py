"""``shipyard tokens``: what an admin needs to configure tokens without writing them in clear.

``hash`` reads a token from standard input (never from the command line, where ``ps`` and the shell's
history would keep it) and prints its ``sha256:`` hash, or with ``--role`` the whole
``SHIPYARD_TOKENS`` entry; ``new`` makes a random token, prints it once for its holder, and its entry.
"""

from __future__ import annotations

import getpass
import json
import secrets
import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from shipyard_cli.common import fail
from shipyard_common.auth import Grant, Role, hash_token, reveals_token

tokens_app = typer.Typer(
    help="API tokens: hash one for SHIPYARD_TOKENS, or make a new one.", no_args_is_help=True,
)
RoleOption = Annotated[
    Role | None, typer.Option(help="Print the whole SHIPYARD_TOKENS entry, with this role."),
]
NameOption = Annotated[str | None, typer.Option(help="Who holds the token: what audit rows record.")]
# Bytes of randomness in a new token (43 URL-safe characters).
NEW_TOKEN_BYTES = 32


def read_token() -> str:
    """One token from standard input (asked for without echo at a terminal), without surrounding
    whitespace; exits 1 when there is none, or more than one line."""
    raw = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.read()
    token = raw.strip()
    if not token:
        fail("no token on standard input: pipe it in, e.g. 'shipyard tokens hash < token.txt'")
    if "\n" in token or "\r" in token:
        fail("standard input holds more than one line: give one token")
    return token


def entry(token: str, role: Role, name: str | None) -> str:
    """``{"sha256:…": {"role": …, "name": …}}``: a ``SHIPYARD_TOKENS`` value holding ``token``'s hash."""
    try:
        grant = Grant(role=role, name=name)
    except ValidationError:
        fail("a name takes letters, digits and . @ + - _ (at most 64 characters)")
    if grant.name and reveals_token(grant.name, token):
        fail("the name shares 4 or more consecutive characters with the token; audit rows show it to "
             "every viewer: choose a name that shows no part of the token")
    return json.dumps({hash_token(token): grant.model_dump(mode="json", exclude_none=True)})


@tokens_app.command("hash")
def hash_command(role: RoleOption = None, name: NameOption = None) -> None:
    """Print the hash (sha256:…) of the token on standard input, for SHIPYARD_TOKENS; with --role,
    the whole entry."""
    token = read_token()
    if role is None:
        if name is not None:
            fail("--name needs --role: an entry grants a role")
        typer.echo(hash_token(token))
        return
    typer.echo(entry(token, role, name))


@tokens_app.command("new")
def new_command(
    role: Annotated[Role, typer.Option(help="The role the token grants.")],
    name: Annotated[str, typer.Option(help="Who holds it: what audit rows record.")],
) -> None:
    """Make a random token: print it once (give it to its holder; it is not kept anywhere), then its
    SHIPYARD_TOKENS entry, which holds only its hash."""
    token = secrets.token_urlsafe(NEW_TOKEN_BYTES)
    while reveals_token(name, token):  # by chance: a name must show no part of its token
        token = secrets.token_urlsafe(NEW_TOKEN_BYTES)
    config = entry(token, role, name)
    typer.echo(f"token (give it to {name}; shown once): {token}", err=True)
    typer.echo(config)
