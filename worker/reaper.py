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
from service.db import state, utcnow, workers

log = logging.getLogger("hsl.reaper")


class Publisher(Protocol):
    def publish(self, runs: list[tuple[int, str]]) -> list[int]: ...

    def epoch(self) -> str | None:
        """The broker's identity, which changes when it restarts (None: unknown now)."""
        ...

    def queue_messages(self, queues: list[str]) -> dict[str, int] | None:
        """Messages the broker holds that may still start a run, per queue (None: unknown)."""
        ...


class Reaper:
    """Sweeps: expired leases back to the queue, then queued runs nobody claimed published.

    A queued run already published is sent again only when the broker restarted since the
    last sweep (its messages may be gone) or after ``republish_after`` as a backstop, so a
    long backlog is not re-sent over and over. The first sweep of a new reaper cannot know
    what happened before it started, and republishes everything queued (duplicates are
    harmless: a claim is one conditional UPDATE).

    Messages can also vanish from a live broker (Redis evicting keys under an allkeys-*
    maxmemory-policy, a FLUSHALL): every sweep compares, per queue, the queued runs
    published more than ``LOST_GRACE`` seconds ago with the messages the broker still holds
    for it (its lists plus every unacknowledged message). Fewer messages than runs means
    some are gone, and that queue's runs are published again at once.
    """

    LOST_GRACE = 2.0

    def __init__(self, sessions: sessionmaker[Session], publisher: Publisher, settings: Settings):
        self.sessions, self.publisher, self.settings = sessions, publisher, settings
        self.epoch: str | None = None

    def _broker_restarted(self) -> bool:
        epoch = self.publisher.epoch()
        if epoch is None:  # unknown now (down, or no identity): decide when it answers
            return False
        restarted = epoch != self.epoch
        if self.epoch is None:
            log.info("reaper: watching the broker (identity %s)", epoch)
        elif restarted:
            log.warning("reaper: the broker restarted; publishing every queued run again")
        self.epoch = epoch
        return restarted

    def sweep(self) -> dict:
        """One pass; returns what it did (requeued, published, broker_restarted)."""
        settings = self.settings
        with self.sessions.begin() as session:
            requeued = state.expire_leases(session, max_attempts=settings.max_attempts)
            workers.prune(session)  # rows of workers gone for a day
        restarted = self._broker_restarted()
        horizon = 0.0 if restarted else settings.republish_after
        with self.sessions.begin() as session:
            stale = state.unpublished_runs(
                session, older_than=utcnow() - timedelta(seconds=horizon)
            )
        lost = self._lost_queues()
        if lost:
            with self.sessions.begin() as session:
                again = state.unpublished_runs(
                    session, older_than=utcnow() - timedelta(seconds=self.LOST_GRACE)
                )
            seen = {run_id for run_id, _ in stale}
            stale += [r for r in again if r[1] in lost and r[0] not in seen]
        published = self.publisher.publish(stale) if stale else []
        if published:
            with self.sessions.begin() as session:
                state.mark_published(session, published)
        if requeued or published:
            log.info("reaper: %d leases expired, %d runs published", len(requeued), len(published))
        return {
            "requeued": requeued,
            "published": published,
            "broker_restarted": restarted,
            "lost_queues": sorted(lost),
        }

    def _lost_queues(self) -> set[str]:
        """Queues whose broker holds fewer messages than they have queued, published runs."""
        counter = getattr(self.publisher, "queue_messages", None)
        if counter is None:
            return set()
        with self.sessions() as session:
            queued = state.published_queued_counts(
                session, older_than=utcnow() - timedelta(seconds=self.LOST_GRACE)
            )
        if not queued:
            return set()
        held = counter(sorted(queued))
        if held is None:  # broker unknown now: decide when it answers
            return set()
        lost = {q for q, n in queued.items() if held.get(q, 0) < n}
        for q in sorted(lost):
            log.warning(
                "reaper: %d queued runs on %r but the broker holds %d messages for it (evicted "
                "or flushed?); publishing them again",
                queued[q],
                q,
                held.get(q, 0),
            )
        return lost

    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.sweep()
            except DBAPIError as exc:
                log.warning("reaper: database unavailable (%s); retrying", exc)
            except Exception:  # keep the reaper alive whatever one sweep met
                log.exception("reaper sweep failed")
            stop.wait(self.settings.reaper_interval)
