"""Liveness and readiness (database reachable and migrated, its disk writable, broker
reachable and unable to evict queued messages)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import text

from .db import migrate
from .errors import PROBLEM_RESPONSE, Unavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: PROBLEM_RESPONSE})
def readyz(request: Request) -> dict[str, Any]:
    """Ready to accept work: the database answers and is at the head revision, and the
    broker (or the in-process worker) is up."""
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        # once at the head revision, it stays there while this process runs
        if not getattr(state, "migrated", False):
            state.migrated = migrate.is_current(state.engine)
        checks["database"] = "ok" if state.migrated else "not migrated"
    except Exception as exc:  # any failure means not ready
        checks["database"] = f"unavailable: {type(exc).__name__}"
    if checks["database"] == "ok":
        problem = disk_problem(state.settings.database_url, state.settings.min_free_disk_bytes)
        if problem is not None:
            checks["disk"] = problem
    checks["broker" if not state.settings.embedded else "worker"] = _publisher_check(
        state.publisher
    )
    if any(v != "ok" for v in checks.values()):
        raise Unavailable(
            "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"), checks=checks
        )
    return {"status": "ready", **checks}


def _publisher_check(publisher: Any) -> str:
    if publisher is None:
        return "unavailable"
    problem = getattr(publisher, "readiness_problem", None)
    if problem is not None:  # the broker: reachable, and not configured to evict messages
        return problem() or "ok"
    return "ok" if publisher.ping() else "unavailable"


def sqlite_path(database_url: str) -> Path | None:
    """The file of a SQLite URL (None for PostgreSQL or an in-memory database)."""
    if not database_url.startswith("sqlite") or "///" not in database_url:
        return None
    path = database_url.split("///", 1)[1].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def disk_problem(database_url: str, min_free_bytes: int) -> str | None:
    """Why the SQLite database's filesystem cannot take a commit now, or None.

    SELECT 1 still answers on a full or read-only disk; a submission would then get 503.
    So: the filesystem is not mounted read-only, has ``min_free_bytes`` free for an
    unprivileged writer, and accepts a small file written and fsynced next to the database
    (an ext4 that hit an I/O error refuses that even before it is flagged read-only).
    """
    path = sqlite_path(database_url)
    if path is None:
        return None
    folder = path.parent
    try:
        st = os.statvfs(folder)
    except OSError as exc:
        return f"unavailable: {exc.strerror or exc}"
    if st.f_flag & os.ST_RDONLY:
        return "read-only filesystem"
    free = st.f_bavail * st.f_frsize
    if free < min_free_bytes:
        return f"disk full ({free // 1024} KiB free, below {min_free_bytes // 1024} KiB)"
    probe = folder / f".readyz-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"not writable ({exc.strerror or type(exc).__name__})"
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None
