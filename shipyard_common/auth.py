"""API tokens and roles.

A token maps to one role. Roles are not a ladder: a trainer may submit jobs but not promote,
an approver may promote but not train; admin may do everything, and every role may read.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from fastapi import Header, Request

from shipyard_common.errors import Forbidden, Unauthorized


class Role(StrEnum):
    VIEWER = "viewer"
    TRAINER = "trainer"
    APPROVER = "approver"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role

    def can(self, role: Role) -> bool:
        return self.role == Role.ADMIN or role == Role.VIEWER or self.role == role


class TokenAuthenticator:
    """Resolves ``Authorization: Bearer <token>`` (or ``X-API-Token``) to a principal."""

    def __init__(self, tokens: Mapping[str, Role]) -> None:
        self._tokens = dict(tokens)
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
        for known, role in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return Principal(name=f"token:{known[:4]}…", role=role)
        raise Unauthorized("unknown API token")

    def authorize(self, authorization: str | None, api_token: str | None, role: Role) -> Principal:
        principal = self.authenticate(authorization, api_token)
        if not principal.can(role):
            raise Forbidden(f"this action needs the '{role}' role; your token has '{principal.role}'")
        return principal


def role_checker(role: Role) -> Callable[..., Principal]:
    """A FastAPI dependency that admits a caller whose token grants ``role``."""

    def check(
        request: Request,
        authorization: str | None = Header(default=None),
        x_api_token: str | None = Header(default=None),
    ) -> Principal:
        authenticator: TokenAuthenticator = request.app.state.authenticator
        return authenticator.authorize(authorization, x_api_token, role)

    check.__name__ = f"require_{role.value}"
    return check
