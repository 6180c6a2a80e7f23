"""Liveness and readiness (database reachable and migrated, broker reachable)."""

from __future__ import annotations

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
    checks["broker" if not state.settings.embedded else "worker"] = (
        "ok" if state.publisher is not None and state.publisher.ping() else "unavailable"
    )
    if any(v != "ok" for v in checks.values()):
        raise Unavailable(
            "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"), checks=checks
        )
    return {"status": "ready", **checks}
