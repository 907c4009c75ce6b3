"""The platform database: the record of jobs, audit rows, events, datasets and predictions.

SQLite by default, PostgreSQL when ``SHIPYARD_DB_URL`` says so. Every service declares its
tables on :class:`Base`; tables more than one service reads live in :mod:`shipyard_common.records`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

# Base and utcnow live in orm.py, which records.py imports too: db imports records, never the reverse.
from shipyard_common.orm import Base, utcnow

__all__ = ["Base", "Database", "make_engine", "normalize_db_url", "utcnow"]


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
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


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
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def ping(self) -> None:
        from sqlalchemy import text

        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
