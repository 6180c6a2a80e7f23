"""Per-tenant limits on submissions: a token bucket (rate and burst) and a quota of
queued plus running experiments. Beyond either: 429 problem+json with Retry-After.

The buckets live in the API process: with several API processes, each enforces the rate
on its own (the quota, counted in the database, is global).
"""

from __future__ import annotations

import math
import threading
import time

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from .db import Experiment, Tenant
from .errors import ProblemError


class RateLimited(ProblemError):
    status, type, title = 429, "rate-limited", "Too many requests"


class TokenBuckets:
    def __init__(self, rate: float, burst: int, *, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: dict[int, tuple[float, float]] = {}  # tenant -> (tokens, last time)
        self.lock = threading.Lock()

    def take(self, tenant_id: int) -> float:
        """Take a token; returns 0 on success, else the seconds until one is available."""
        now = self.clock()
        with self.lock:
            tokens, last = self.buckets.get(tenant_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self.buckets[tenant_id] = (tokens - 1.0, now)
                return 0.0
            self.buckets[tenant_id] = (tokens, now)
            return (1.0 - tokens) / self.rate


def check_rate(buckets: TokenBuckets, tenant_id: int) -> None:
    wait = buckets.take(tenant_id)
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise RateLimited(
            f"more than {buckets.rate:g} submissions per second (burst {buckets.burst}); "
            f"retry in {retry} s",
            headers={"Retry-After": str(retry)},
            errors=[{"field": "submissions", "message": f"at most {buckets.rate:g} per second"}],
        )


def lock_tenant(session: Session, tenant_id: int) -> None:
    """Serialise the tenant's submissions until the caller's commit or rollback, so that two
    concurrent ones cannot both pass the count and both be stored: a row lock on PostgreSQL;
    on SQLite, which has no row locks, a write that takes the database's write lock (a
    concurrent submitter waits for it, then counts what the first one stored)."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))
    else:
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


def check_quota(session: Session, tenant_id: int, limit: int) -> None:
    """Refuse a new experiment past ``limit`` queued or running ones. Call it in the
    transaction that stores the experiment: it holds the tenant's lock until the commit."""
    lock_tenant(session, tenant_id)
    active = session.execute(
        select(func.count())
        .select_from(Experiment)
        .where(Experiment.tenant_id == tenant_id, Experiment.status.in_(("queued", "running")))
    ).scalar_one()
    if active >= limit:
        raise RateLimited(
            f"{active} experiments are queued or running; the limit per tenant is {limit} "
            "(HSL_MAX_ACTIVE_EXPERIMENTS): wait for some to finish or cancel them",
            headers={"Retry-After": "30"},
            errors=[{"field": "experiments", "message": f"at most {limit} queued or running"}],
        )
