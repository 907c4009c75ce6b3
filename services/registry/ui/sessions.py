"""Web UI sessions: a random key in the browser's cookie, the rest sealed in the platform database.

The cookie holds a Fernet key. The ``ui_sessions`` row is found by the key's SHA-256 and keeps
the principal, a CSRF token, the expiry and the user's API token encrypted with that key, so a
copy of the database alone yields no usable token. Every request re-authenticates the unsealed
token: a token removed from the configuration ends its sessions at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import delete

from services.registry.core.tables import UiSessionRecord
from shipyard_common.auth import Principal, TokenAuthenticator
from shipyard_common.db import Database, utcnow
from shipyard_common.errors import Unauthorized

COOKIE = "shipyard_session"
LOGIN_CSRF_COOKIE = "shipyard_login_csrf"
COOKIE_PATH = "/ui"
# A Fernet key is 44 characters of URL-safe base64; anything much longer is not ours.
_MAX_COOKIE = 128


@dataclass(frozen=True)
class UiSession:
    """A signed-in browser: who it is now, the API token it acts with, and its form token."""

    id: str
    principal: Principal
    token: str
    csrf: str
    expires_at: datetime

    @property
    def authorization(self) -> str:
        """The user's own credentials, as forwarded to serving, the monitor and the trainer."""
        return f"Bearer {self.token}"


def session_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str, given: str | None) -> bool:
    """Whether a form's token is the session's, compared in constant time; empty never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def open_session(database: Database, principal: Principal, token: str, hours: float) -> tuple[str, UiSession]:
    """Store a new session for ``principal``; return the cookie value (the key) and the session.

    The cookie carries the key without its base64 padding, which a cookie value would have to quote.

    Expired rows are swept here, so the table holds only live sessions and the odd one that
    expired since the last sign-in.
    """
    key = Fernet.generate_key()
    now = utcnow()
    row = UiSessionRecord(
        id=session_id(key), principal=principal.name, role=principal.role.value,
        token_sealed=Fernet(key).encrypt(token.encode()).decode(), csrf=new_csrf_token(),
        created_at=now, expires_at=now + timedelta(hours=hours),
    )
    with database.session() as session:
        session.execute(delete(UiSessionRecord).where(UiSessionRecord.expires_at <= now))
        session.add(row)
    return key.decode().rstrip("="), UiSession(id=row.id, principal=principal, token=token, csrf=row.csrf,
                                   expires_at=row.expires_at)


def _key(cookie: str | None) -> bytes | None:
    if not cookie or len(cookie) > _MAX_COOKIE or not cookie.isascii():
        return None
    return (cookie + "=" * (-len(cookie) % 4)).encode()


def resume_session(
    database: Database, authenticator: TokenAuthenticator, cookie: str | None
) -> UiSession | None:
    """The live session behind ``cookie``, or None: unknown, expired, or its token no longer valid."""
    key = _key(cookie)
    if key is None:
        return None
    with database.session() as session:
        row = session.get(UiSessionRecord, session_id(key))
    if row is None:
        return None
    if row.expires_at <= utcnow():
        end_session(database, cookie)
        return None
    try:
        token = Fernet(key).decrypt(row.token_sealed.encode()).decode()
    except (InvalidToken, ValueError):
        return None
    try:
        principal = authenticator.authenticate(f"Bearer {token}")
    except Unauthorized:
        end_session(database, cookie)  # the token was withdrawn: so is every session it opened
        return None
    return UiSession(id=row.id, principal=principal, token=token, csrf=row.csrf, expires_at=row.expires_at)


def end_session(database: Database, cookie: str | None) -> None:
    """Delete the session behind ``cookie`` (signing out); nothing happens for an unknown one."""
    key = _key(cookie)
    if key is None:
        return
    with database.session() as session:
        session.execute(delete(UiSessionRecord).where(UiSessionRecord.id == session_id(key)))
