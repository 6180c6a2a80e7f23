"""The reaper: expired leases back to the queue, unclaimed queued runs published again.

Recovery after a worker dies takes at most lease TTL + reaper interval; kombu's own
redelivery (about 100 s, or the visibility timeout) is only a backstop.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Protocol

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import state, utcnow

log = logging.getLogger("hsl.reaper")


class Publisher(Protocol):
    def publish(self, runs: list[tuple[int, str]]) -> list[int]: ...


def sweep(sessions: sessionmaker[Session], publisher: Publisher, settings: Settings) -> dict:
    """One pass; returns what it did (requeued, published)."""
    with sessions.begin() as session:
        requeued = state.expire_leases(session, max_attempts=settings.max_attempts)
    with sessions.begin() as session:
        stale = state.unpublished_runs(
            session, older_than=utcnow() - timedelta(seconds=settings.republish_after)
        )
    published = publisher.publish(stale) if stale else []
    if published:
        with sessions.begin() as session:
            state.mark_published(session, published)
    if requeued or published:
        log.info("reaper: %d leases expired, %d runs published", len(requeued), len(published))
    return {"requeued": requeued, "published": published}


def run_forever(
    sessions: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    stop: threading.Event | None = None,
) -> None:
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            sweep(sessions, publisher, settings)
        except DBAPIError as exc:
            log.warning("reaper: database unavailable (%s); retrying", exc)
        except Exception:  # keep the reaper alive whatever one sweep met
            log.exception("reaper sweep failed")
        stop.wait(settings.reaper_interval)
