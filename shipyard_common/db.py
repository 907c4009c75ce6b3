"""The platform database: the record of jobs, audit rows, events, datasets and predictions.

SQLite by default, PostgreSQL when ``SHIPYARD_DB_URL`` says so. Every service declares its
tables on :class:`Base`; tables more than one service reads live in :mod:`shipyard_common.records`.

A PostgreSQL that restarts or goes away must not hang a request nor need the service restarted: each
pooled connection is tested before use (``pool_pre_ping``), so the first request after a restart gets a
fresh one; connecting gives up after :data:`CONNECT_TIMEOUT_S`, a connection whose server vanished is
noticed by TCP keepalives, and waiting for a free pooled connection is bounded by :data:`POOL_TIMEOUT_S`.
A connection failure inside :meth:`Database.session` is :class:`DatabaseUnavailable`, a 503 saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shipyard_common.errors import Unavailable

# Base and utcnow live in orm.py, which records.py imports too: db imports records, never the reverse.
from shipyard_common.orm import Base, utcnow

__all__ = ["Base", "Database", "DatabaseUnavailable", "make_engine", "normalize_db_url", "utcnow"]

#: Seconds a new PostgreSQL connection may take (libpq's ``connect_timeout``) before the attempt fails.
CONNECT_TIMEOUT_S = 5
#: Seconds a request waits for a pooled connection when all are in use, before it fails.
POOL_TIMEOUT_S = 10
# libpq's TCP keepalives: a server that vanished without closing the socket is noticed in about
# idle + interval × count seconds, instead of when the kernel gives up (minutes to hours).
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


class DatabaseUnavailable(Unavailable):
    """The platform database cannot be reached (down, restarting, refusing): a 503, not a 500."""


def normalize_db_url(url: str) -> str:
    """psycopg2 is the driver we ship; bare ``postgresql://`` would pick whatever is installed."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def make_engine(url: str) -> Engine:
    url = normalize_db_url(url)
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets the API, the worker and the monitor read while one of them writes.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=POOL_TIMEOUT_S,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, **KEEPALIVES},
    )


def where(url: str) -> str:
    """The database ``url`` names, for a message: its kind, host, port and name, never a password."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"SQLite at {parsed.database}"
    return f"{parsed.get_backend_name()} at {parsed.host}:{parsed.port or 5432}/{parsed.database}"


class Database:
    """An engine, a session factory, and table creation for the tables a service uses."""

    def __init__(self, url: str) -> None:
        self.url = normalize_db_url(url)
        self.engine = make_engine(self.url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_tables(self) -> None:
        # Importing the shared records registers them on Base before create_all.
        import shipyard_common.records  # noqa: F401

        Base.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed at the end of the block, rolled back if it raises; a lost or refused
        PostgreSQL connection is :class:`DatabaseUnavailable` (the next session connects afresh)."""
        try:
            with self.sessions() as session:
                try:
                    yield session
                    session.commit()
                except BaseException:
                    session.rollback()
                    raise
        except (OperationalError, InterfaceError) as exc:
            self.raise_unavailable(exc)

    def raise_unavailable(self, exc: OperationalError | InterfaceError) -> NoReturn:
        """Raise what a connection-level error becomes: :class:`DatabaseUnavailable` for PostgreSQL (refused,
        restarting, timed out, connection lost), the error itself for SQLite (a file cannot be down, so
        an error there is a bug or a full disk, not an outage)."""
        if self.url.startswith("sqlite"):
            raise exc
        reason = (str(exc.orig or exc).strip().splitlines() or ["no reason given"])[0][:300]
        raise DatabaseUnavailable(f"the database ({where(self.url)}) is not answering: {reason}") from exc

    def ping(self) -> None:
        """One ``SELECT 1``: the readiness check; :class:`DatabaseUnavailable` when it cannot."""
        from sqlalchemy import text

        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except (OperationalError, InterfaceError) as exc:
            self.raise_unavailable(exc)

    def dispose(self) -> None:
        self.engine.dispose()
