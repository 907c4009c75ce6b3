"""API tokens, the people they name, and roles.

A token maps to one :class:`Grant`: a role and the name audit rows and approvals record. What every
viewer sees of a caller is that name, so it shows no part of any token: a configured name that shares
characters with its token is refused (:func:`reveals_token`), and a token configured with a bare role
is named ``role:<role>#<8 hex of its SHA-256>``, never by its characters.

Tokens are held hashed: the settings give each as its SHA-256 (``sha256:<64 hex>``, what
``shipyard tokens hash`` prints), as a reference to a secret read at start (``{"file": ...}`` or
``{"env": ...}``), or in clear (kept working, hashed as it is read). A :class:`TokenTable` holds only
the hashes, so no process keeps a clear token after it starts; a presented token is hashed and looked
up. Teams with an identity provider may also accept its signed JWTs (:mod:`shipyard_common.oidc`).

Roles are not a ladder: a trainer may submit jobs but not promote, an approver may promote but not
train; admin may do everything, and every role may read.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Header, Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema

from shipyard_common.errors import Forbidden, Unauthorized


class Role(StrEnum):
    VIEWER = "viewer"
    TRAINER = "trainer"
    APPROVER = "approver"
    ADMIN = "admin"


NAME_PATTERN = r"^[\w.@+-]+$"


class Grant(BaseModel):
    """What a token grants: a role, and the name of whoever holds it."""

    role: Role
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=NAME_PATTERN)


class TokenSecret(BaseModel):
    """A token kept out of the settings: read at start from a file (a mounted secret) or from an
    environment variable, with the role and name it grants (the entry's key is the name by default)."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=NAME_PATTERN)
    file: Path | None = None
    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _one_source(self) -> TokenSecret:
        """One place to read the token from, so that which one is used is never a guess."""
        if (self.file is None) == (self.env is None):
            raise ValueError('a token read from a secret names exactly one of "file" or "env"')
        return self

    def read(self) -> str:
        """The token: the file's or the variable's content without surrounding whitespace (a secret
        file's final newline). Errors name the source, never what it holds."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ValueError(f"the environment variable {self.env} is not set")
            where = f"the environment variable {self.env}"
        else:
            assert self.file is not None
            try:
                with self.file.open("rb") as handle:
                    raw = handle.read(MAX_TOKEN_BYTES + 1)
            except OSError as exc:
                raise ValueError(f"cannot read {self.file}: {exc.strerror or type(exc).__name__}") from None
            if len(raw) > MAX_TOKEN_BYTES:
                raise ValueError(f"{self.file} holds more than {MAX_TOKEN_BYTES} bytes: not a token")
            value, where = raw.decode("utf-8", errors="replace"), str(self.file)
        token = value.strip()
        if not token:
            raise ValueError(f"{where} is empty")
        return token


# Consecutive characters a principal's name may share with its token: fewer say nothing about it.
REVEALING_RUN = 4
# The longest token read from a secret file: a token is a line, not a document.
MAX_TOKEN_BYTES = 4096
HASH_PREFIX = "sha256:"
_HASH = re.compile(r"sha256:[0-9a-fA-F]{64}")


def hash_token(token: str) -> str:
    """``sha256:<64 hex>`` of ``token`` as its holder presents it (what ``shipyard tokens hash``
    prints and the settings take)."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def is_token_hash(key: str) -> bool:
    """Whether a configured key is a token's hash (``sha256:<64 hex>``) rather than a clear token."""
    return _HASH.fullmatch(key) is not None


def token_key(key: str) -> str:
    """The hash a configured key stands for: a ``sha256:`` key as it is (lower case), a clear token
    hashed. Only for configured keys: a presented token is always hashed (:func:`hash_token`), or
    knowing a hash would be as good as holding its token."""
    return key.lower() if is_token_hash(key) else hash_token(key)


def key_digest(key: str) -> bytes:
    """The 32-byte SHA-256 a configured key (clear token or ``sha256:`` hash) stands for."""
    return bytes.fromhex(token_key(key)[len(HASH_PREFIX):])


def principal_name(token: str, grant: Role | Grant) -> str:
    """The grant's name, else ``role:<role>#<8 hex of the token's SHA-256>``: stable, no part of the
    token, and never a configured name (those take no ``:`` or ``#``). ``token`` is a clear token or
    its ``sha256:`` hash; both give the same name."""
    if isinstance(grant, Grant) and grant.name:
        return grant.name
    role = grant.role if isinstance(grant, Grant) else grant
    return f"role:{Role(role).value}#{token_key(token)[len(HASH_PREFIX):][:8]}"


def reveals_token(name: str, token: str) -> bool:
    """Whether ``name`` shows part of ``token``: ``REVEALING_RUN`` consecutive characters of both, in
    any case (a name ``dev-admin`` for the token ``dev-admin-token`` shows its first nine)."""
    name, token = name.casefold(), token.casefold()
    return any(name[i : i + REVEALING_RUN] in token for i in range(len(name) - REVEALING_RUN + 1))


def _entry_kind(value: Any) -> str:
    """Which form a configured token entry takes: a bare role, a grant, or a secret to read."""
    if isinstance(value, str):
        return "role"
    if isinstance(value, TokenSecret) or (isinstance(value, Mapping) and ("file" in value or "env" in value)):
        return "secret"
    return "grant"


# One value of SHIPYARD_TOKENS: "approver", {"role": "approver", "name": "bob"}, or
# {"role": "approver", "file": "/run/secrets/bob"} / {"role": "approver", "env": "BOB_TOKEN"}.
TokenEntry = Annotated[
    Annotated[Role, Tag("role")] | Annotated[Grant, Tag("grant")] | Annotated[TokenSecret, Tag("secret")],
    Discriminator(_entry_kind),
]


def _refuse_revealing(name: str, token: str, role: Role) -> None:
    """Refuse a holder's name that shows part of their token: every viewer reads names."""
    # Every viewer reads a principal's name in the audit; neither the name nor the token is repeated
    # here, where the error is logged.
    if reveals_token(name, token):
        raise ValueError(
            f"the name of a {role.value} token in SHIPYARD_TOKENS shares {REVEALING_RUN} or "
            "more consecutive characters with the token: audit rows show it to every viewer, so "
            "choose a name that shows no part of the token"
        )


def _configured(key: str, entry: Role | Grant | TokenSecret) -> tuple[str, Role | Grant]:
    """One configured entry as (its token's hash, what it grants); a secret is read here."""
    if isinstance(entry, TokenSecret):
        source = f"the environment variable {entry.env}" if entry.env else str(entry.file)
        try:
            grant = Grant(role=entry.role, name=entry.name or key)
        except ValidationError:
            raise ValueError(
                f"the {entry.role.value} token read from {source}: its key in SHIPYARD_TOKENS is its "
                'holder\'s name unless "name" is set, and names take letters, digits and . @ + - _ '
                "(at most 64)"
            ) from None
        try:
            token = entry.read()
        except ValueError as exc:
            raise ValueError(
                f"the {entry.role.value} token of {grant.name} in SHIPYARD_TOKENS: {exc}"
            ) from None
        _refuse_revealing(str(grant.name), token, entry.role)
        return hash_token(token), grant
    if isinstance(entry, Grant) and entry.name and not is_token_hash(key):
        _refuse_revealing(entry.name, key, entry.role)
    return token_key(key), entry


class TokenTable(Mapping[str, Role | Grant]):
    """The configured tokens by hash (``sha256:<64 hex>`` → a role or a grant), looked up by a clear
    token or a hash alike (``table["s3cret"]``, ``table["sha256:…"]``) and equal to a mapping of either.

    It holds no clear token: :meth:`from_config` hashes those it is given and reads the secrets it is
    pointed to, so the settings (and every child process, through ``as_env``) keep only hashes.
    """

    def __init__(
        self, grants: Mapping[str, Role | Grant] | None = None, *, clear: tuple[str, ...] = ()
    ) -> None:
        self._grants = {token_key(key): grant for key, grant in (grants or {}).items()}
        # The names of the entries that were configured in clear (warned about in production).
        self.clear = clear

    @classmethod
    def from_config(cls, entries: Mapping[str, Role | Grant | TokenSecret]) -> TokenTable:
        """The table of a ``SHIPYARD_TOKENS`` value: keys are tokens in clear, their ``sha256:`` hashes,
        or (for a secret read from a file or a variable) the holder's name."""
        grants: dict[str, Role | Grant] = {}
        clear: list[str] = []
        for key, entry in entries.items():
            digest, grant = _configured(key, entry)
            if digest in grants:
                raise ValueError(
                    f"SHIPYARD_TOKENS gives one token twice ({principal_name(digest, grants[digest])} and "
                    f"{principal_name(digest, grant)}): give each holder a token of their own"
                )
            grants[digest] = grant
            if not isinstance(entry, TokenSecret) and not is_token_hash(key):
                clear.append(principal_name(digest, grant))
        return cls(grants, clear=tuple(clear))

    def as_config(self) -> dict[str, Any]:
        """The table as ``SHIPYARD_TOKENS`` takes it, by hash: what a child process is handed."""
        return {key: grant.model_dump(mode="json") if isinstance(grant, Grant) else Role(grant).value
                for key, grant in self._grants.items()}

    def __getitem__(self, token: str) -> Role | Grant:
        return self._grants[token_key(token)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._grants)

    def __len__(self) -> int:
        return len(self._grants)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self._grants == {token_key(str(key)): grant for key, grant in other.items()}

    __hash__ = None  # type: ignore[assignment]  # a mapping, compared by content

    def __repr__(self) -> str:
        return f"TokenTable({', '.join(principal_name(k, g) for k, g in self._grants.items())})"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        """Settings validate a JSON object of entries (:data:`TokenEntry`) into a table; a table is
        taken as it is, and dumps as :meth:`as_config`."""
        entries = handler.generate_schema(dict[str, TokenEntry])

        def validate(value: Any, read: core_schema.ValidatorFunctionWrapHandler) -> TokenTable:
            return value if isinstance(value, TokenTable) else cls.from_config(read(value))

        return core_schema.no_info_wrap_validator_function(
            validate, entries,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda table: table.as_config()),
        )


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role

    def can(self, role: Role) -> bool:
        return self.role == Role.ADMIN or role == Role.VIEWER or self.role == role


class BearerValidator(Protocol):
    """Validates bearer tokens that are not configured tokens: an identity provider's signed JWTs
    (:class:`shipyard_common.oidc.JwtValidator`)."""

    def accepts(self, token: str) -> bool:
        """Whether ``token`` has this validator's shape (a JWT's three parts), so it should judge it."""

    def principal(self, token: str) -> Principal:
        """The holder of ``token``; raises Unauthorized saying why it is refused."""


_BEARER = b"Bearer "
_BEARER_LENGTH = len(_BEARER)
_sha256, _compare_digest = hashlib.sha256, hmac.compare_digest


class TokenAuthenticator:
    """Resolves ``Authorization: Bearer <token>`` (or ``X-API-Token``) to a principal: a configured
    token by its SHA-256, else a JWT when ``jwt`` validates them."""

    def __init__(self, tokens: Mapping[str, Role | Grant], *, jwt: BearerValidator | None = None) -> None:
        # Keys are clear tokens or their sha256: hashes (a TokenTable's); both are held as digests.
        self._principals: dict[bytes, tuple[bytes, Principal]] = {}
        for key, grant in tokens.items():
            digest = key_digest(key)
            role = grant.role if isinstance(grant, Grant) else Role(grant)
            self._principals[digest] = (digest, Principal(name=principal_name(key, grant), role=role))
        self._jwt = jwt

    def prefetch(self) -> None:
        """Read the identity provider's keys now, if JWTs are accepted: for a service that checks
        tokens on its event loop (serving's fast lane), so the first JWT does not wait for the read."""
        prefetch = getattr(self._jwt, "prefetch", None)
        if prefetch is not None:
            prefetch()

    def _known(self, token: bytes) -> Principal | None:
        """The principal of a configured token, by its digest. The dict lookup is on the SHA-256 of
        what was sent, which a caller cannot steer byte by byte, so its timing reveals nothing of a
        token; the final comparison is constant-time all the same."""
        digest = hashlib.sha256(token).digest()
        found = self._principals.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]

    def accepts_bearer(self, header: bytes) -> bool:
        """Whether ``header`` is exactly ``Bearer <a configured token>`` (any role).

        For routes any valid token may call (predictions), per request: one hash and one lookup.
        False is not a refusal: other spellings and JWTs are valid too, so the caller then runs
        :meth:`authorize`, which also says what is wrong.
        """
        if not header.startswith(_BEARER):
            return False
        digest = _sha256(header[_BEARER_LENGTH:]).digest()  # as _known, inline: once per prediction
        found = self._principals.get(digest)
        return found is not None and _compare_digest(found[0], digest)

    def authenticate(self, authorization: str | None, api_token: str | None = None) -> Principal:
        """The holder of the token sent (``Authorization: Bearer`` or ``X-API-Token``): a configured
        token, else a JWT when one is accepted; Unauthorized saying what is missing or wrong."""
        token = api_token
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value:
                raise Unauthorized("the Authorization header must be 'Bearer <token>'")
            token = value.strip()
        if not token:
            raise Unauthorized("this route needs an API token: send 'Authorization: Bearer <token>'")
        found = self._known(token.encode())
        if found is not None:
            return found
        if self._jwt is not None and self._jwt.accepts(token):
            return self._jwt.principal(token)
        raise Unauthorized("unknown API token")

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
