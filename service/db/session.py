"""Engines and sessions for SQLite (WAL, busy timeout, foreign keys) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# FULL: every commit fsyncs the WAL before it returns, so what the API acknowledged (a 201)
# survives an OS crash or a power loss. NORMAL in WAL mode only survives an application
# crash: committed frames sit in the page cache until a checkpoint (issue 10, items 3-4).
SQLITE_SYNCHRONOUS = "FULL"
SQLITE_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str, *, sqlite_synchronous: str | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite files get their folder created, WAL switched on and
    ``synchronous`` set (FULL unless told otherwise: a commit is on the disk when it returns)."""
    if url.startswith("sqlite"):
        synchronous = (sqlite_synchronous or SQLITE_SYNCHRONOUS).upper()
        if synchronous not in SQLITE_SYNCHRONOUS_MODES:
            raise ValueError(f"SQLite synchronous must be one of {SQLITE_SYNCHRONOUS_MODES}")
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
            **kwargs,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
    return create_engine(url, connect_args={"connect_timeout": 5}, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
