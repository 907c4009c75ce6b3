"""API tokens, the people they name, and roles.

A token maps to one :class:`Grant`: a role and the name audit rows and approvals record. What every
viewer sees of a caller is that name, so it shows no part of any token: a configured name that shares
characters with its token is refused (:func:`reveals_token`, checked by the platform settings), and a
token configured with a bare role is named ``role:<role>#<8 hex of its SHA-256>``, never by its
characters.
Roles are not a ladder: a trainer may submit jobs but not promote, an approver may promote but not
train; admin may do everything, and every role may read.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from fastapi import Header, Request
from pydantic import BaseModel, Field

from shipyard_common.errors import Forbidden, Unauthorized


class Role(StrEnum):
    VIEWER = "viewer"
    TRAINER = "trainer"
    APPROVER = "approver"
    ADMIN = "admin"


class Grant(BaseModel):
    """What a token grants: a role, and the name of whoever holds it."""

    role: Role
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[\w.@+-]+$")


# Consecutive characters a principal's name may share with its token: fewer say nothing about it.
REVEALING_RUN = 4


def principal_name(token: str, grant: Role | Grant) -> str:
    """The grant's name, else ``role:<role>#<8 hex of the token's SHA-256>``: stable, no part of the
    token, and never a configured name (those take no ``:`` or ``#``)."""
    if isinstance(grant, Grant) and grant.name:
        return grant.name
    role = grant.role if isinstance(grant, Grant) else grant
    return f"role:{role.value}#{hashlib.sha256(token.encode()).hexdigest()[:8]}"


def reveals_token(name: str, token: str) -> bool:
    """Whether ``name`` shows part of ``token``: ``REVEALING_RUN`` consecutive characters of both, in
    any case (a name ``dev-admin`` for the token ``dev-admin-token`` shows its first nine)."""
    name, token = name.casefold(), token.casefold()
    return any(name[i : i + REVEALING_RUN] in token for i in range(len(name) - REVEALING_RUN + 1))


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role

    def can(self, role: Role) -> bool:
        return self.role == Role.ADMIN or role == Role.VIEWER or self.role == role


class TokenAuthenticator:
    """Resolves ``Authorization: Bearer <token>`` (or ``X-API-Token``) to a principal."""

    def __init__(self, tokens: Mapping[str, Role | Grant]) -> None:
        self._tokens = {
            token: Principal(name=principal_name(token, grant),
                             role=grant.role if isinstance(grant, Grant) else grant)
            for token, grant in tokens.items()
        }
        # Whole "Bearer <token>" header values, for accepts_bearer: compared as sent, no parsing.
        self._bearer_headers = tuple(f"Bearer {token}".encode() for token in self._tokens)

    def accepts_bearer(self, header: bytes) -> bool:
        """Whether ``header`` is exactly ``Bearer <a known token>`` (any role), compared in constant time.

        For routes any valid token may call (predictions), per request: no decoding or parsing.
        False is not a refusal: other spellings are valid too, so the caller then runs
        :meth:`authorize`, which also says what is wrong.
        """
        found = False
        for expected in self._bearer_headers:
            found |= hmac.compare_digest(expected, header)
        return found

    def authenticate(self, authorization: str | None, api_token: str | None = None) -> Principal:
        token = api_token
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value:
                raise Unauthorized("the Authorization header must be 'Bearer <token>'")
            token = value.strip()
        if not token:
            raise Unauthorized("this route needs an API token: send 'Authorization: Bearer <token>'")
        # A direct dict lookup would leak timing; compare every token in constant time.
        found = None
        for known, principal in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = principal
        if found is None:
            raise Unauthorized("unknown API token")
        return found

    def authorize(self, authorization: str | None, api_token: str | None, *roles: Role) -> Principal:
        """The caller, if their token grants one of ``roles``."""
        principal = self.authenticate(authorization, api_token)
        require(principal, *roles)
        return principal


def require(principal: Principal, *roles: Role) -> None:
    """Refuse (403) a principal granted none of ``roles``."""
    if not any(principal.can(role) for role in roles):
        needed = " or ".join(f"'{role}'" for role in roles)
        raise Forbidden(f"this action needs the {needed} role; your token has '{principal.role}'")


def role_checker(*roles: Role) -> Callable[..., Principal]:
    """A FastAPI dependency that admits a caller whose token grants one of ``roles``."""

    def check(
        request: Request,
        authorization: str | None = Header(default=None),
        x_api_token: str | None = Header(default=None),
    ) -> Principal:
        authenticator: TokenAuthenticator = request.app.state.authenticator
        return authenticator.authorize(authorization, x_api_token, *roles)

    check.__name__ = "require_" + "_or_".join(role.value for role in roles)
    return check
