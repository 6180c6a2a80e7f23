"""State changes of runs and experiments, each a conditional UPDATE (docs/reliability.md).

Every function takes a session and never commits: the caller owns the transaction. The
conditions in the WHERE clauses are the concurrency control: a duplicate delivery, a stale
worker or a racing reaper finds ``rowcount == 0`` and does nothing.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

import hsl_engine as he

from .models import TERMINAL, Experiment, Point, Run
from .session import utcnow

# what names stored before they had to be printable (issue 10) may hold
_LEGACY_NAME = re.compile(rf"[{he.NAME_FORBIDDEN}\ud800-\udfff]")


def stored_spec(data: Any) -> he.ExperimentSpec:
    """The spec of a stored experiment. Names stored before the validator refused control
    characters would fail to parse now: for them the characters are replaced by U+FFFD (the
    computation never depends on the name), so the experiment still runs and answers."""
    try:
        return he.parse_spec(data)
    except he.SpecError:
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not _LEGACY_NAME.search(name):
            raise
        return he.parse_spec({**data, "name": _LEGACY_NAME.sub("\ufffd", name)})


def claim_run(
    session: Session, run_id: int, *, owner: str, lease_seconds: float, max_attempts: int
) -> Run | None:
    """Take the lease of a queued run, or of a running one whose lease expired.

    Returns the claimed run, or None when there is nothing to do (claimed by another
    worker, finished, cancelled, or out of attempts).
    """
    now = utcnow()
    live_experiment = (
        select(Experiment.id)
        .where(Experiment.id == Run.experiment_id, Experiment.cancel_requested.is_(False))
        .where(Experiment.status.not_in(TERMINAL))
        .exists()
    )
    result = session.execute(
        update(Run)
        .where(
            Run.id == run_id,
            Run.attempts < max_attempts,
            or_(
                Run.status == "queued",
                and_(Run.status == "running", Run.lease_expires_at < now),
            ),
            live_experiment,
        )
        .values(
            status="running",
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Run.attempts + 1,
            started_at=func.coalesce(Run.started_at, now),
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    run = session.get(Run, run_id, populate_existing=True)
    session.execute(
        update(Experiment)
        .where(Experiment.id == run.experiment_id, Experiment.status == "queued")
        .values(status="running", started_at=now)
    )
    return run


def renew_lease(session: Session, run_id: int, *, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; False when it is no longer ours (reaped and claimed elsewhere)."""
    result = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.lease_owner == owner, Run.status == "running")
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    )
    return result.rowcount == 1


def should_stop(session: Session, experiment_id: str) -> bool:
    exp = session.execute(
        select(Experiment.cancel_requested, Experiment.status).where(Experiment.id == experiment_id)
    ).one_or_none()
    return exp is None or exp.cancel_requested or exp.status in TERMINAL


def finish_run(
    session: Session,
    run_id: int,
    *,
    owner: str,
    status: str,
    error: dict[str, Any] | None = None,
) -> bool:
    """Move our run to a terminal state, fenced on the lease owner."""
    result = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.lease_owner == owner, Run.status == "running")
        .values(
            status=status,
            error=error,
            lease_owner=None,
            lease_expires_at=None,
            finished_at=utcnow(),
        )
    )
    return result.rowcount == 1


def release_run(
    session: Session,
    run_id: int,
    *,
    owner: str,
    error: dict[str, Any] | None,
    refund_attempt: bool = False,
) -> bool:
    """Give a run back to the queue after a transient failure (it will be retried).

    ``refund_attempt``: an orderly shutdown is not the run's fault, so it costs no attempt.
    """
    result = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.lease_owner == owner, Run.status == "running")
        .values(
            status="queued",
            error=error,
            lease_owner=None,
            lease_expires_at=None,
            published_at=None,
            attempts=Run.attempts - 1 if refund_attempt else Run.attempts,
        )
    )
    return result.rowcount == 1


def sync_experiment(session: Session, experiment_id: str) -> str | None:
    """Derive the experiment's status from its runs and store it; returns the status.

    Any failed run fails the experiment (its queued runs are cancelled); a cancel request
    ends in ``cancelled`` once no run is running; all runs succeeded -> ``succeeded``.

    The experiment's row is locked first (PostgreSQL; SQLite serialises writers anyway), so
    that two workers finishing its last two runs at once cannot each count the other's run
    as still running and both leave it ``running``: the second waits for the first's commit,
    then counts both.
    """
    exp = session.get(Experiment, experiment_id, populate_existing=True, with_for_update=True)
    if exp is None:
        return None
    if exp.status in TERMINAL:
        return exp.status
    counts = dict(
        session.execute(
            select(Run.status, func.count())
            .where(Run.experiment_id == experiment_id)
            .group_by(Run.status)
        ).all()
    )
    total = sum(counts.values())
    now = utcnow()
    new: str | None = None
    error = exp.error
    if counts.get("failed"):
        new = "failed"
        failed = session.execute(
            select(Run)
            .where(Run.experiment_id == experiment_id, Run.status == "failed")
            .order_by(Run.id)
            .limit(1)
        ).scalar_one()
        error = {**(failed.error or {}), "run": {"method": failed.method, "seed": failed.seed}}
    elif exp.cancel_requested and not counts.get("running"):
        new = "cancelled"
    elif total and counts.get("succeeded", 0) == total:
        new = "succeeded"
    elif counts.get("running") or counts.get("succeeded"):
        new = "running"
    if new is None or new == exp.status:
        return exp.status
    values: dict[str, Any] = {"status": new, "error": error}
    if new in TERMINAL:
        values["finished_at"] = now
        if new != "succeeded":
            values["dedupe_key"] = None  # a failed or cancelled spec may be submitted again
        session.execute(
            update(Run)
            .where(Run.experiment_id == experiment_id, Run.status == "queued")
            .values(status="cancelled", finished_at=now)
        )
    if new == "running" and exp.started_at is None:
        values["started_at"] = now
    # fenced on the status we read, so two workers finishing together agree
    session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.status == exp.status)
        .values(**values)
    )
    return new


def request_cancel(session: Session, experiment_id: str) -> None:
    """Queued runs never start; running runs stop at the next point boundary."""
    now = utcnow()
    session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.status.not_in(TERMINAL))
        .values(cancel_requested=True)
    )
    session.execute(
        update(Run)
        .where(Run.experiment_id == experiment_id, Run.status == "queued")
        .values(status="cancelled", finished_at=now)
    )
    sync_experiment(session, experiment_id)


def stored_ns(session: Session, run_id: int) -> set[int]:
    return set(session.execute(select(Point.n).where(Point.run_id == run_id)).scalars())


def expire_leases(session: Session, *, max_attempts: int, now: datetime | None = None) -> list[int]:
    """Return runs whose worker vanished (lease expired) to the queue, or fail them when
    they have used all their attempts. Returns the ids put back in the queue."""
    now = now or utcnow()
    expired = session.execute(
        select(Run.id, Run.attempts, Run.experiment_id).where(
            Run.status == "running", Run.lease_expires_at < now
        )
    ).all()
    requeued = []
    for run_id, attempts, experiment_id in expired:
        if attempts >= max_attempts:
            values: dict[str, Any] = {
                "status": "failed",
                "finished_at": now,
                "error": {
                    "reason": "worker_lost",
                    "message": f"the worker executing this run was lost {attempts} times "
                    f"(max_attempts = {max_attempts})",
                },
            }
        else:
            values = {"status": "queued", "published_at": None}
        result = session.execute(
            update(Run)
            .where(Run.id == run_id, Run.status == "running", Run.lease_expires_at < now)
            .values(lease_owner=None, lease_expires_at=None, **values)
        )
        if result.rowcount == 1:
            if values["status"] == "queued":
                requeued.append(run_id)
            else:
                sync_experiment(session, experiment_id)
    return requeued


def unpublished_runs(
    session: Session, *, older_than: datetime, grace_seconds: float = 5.0
) -> list[tuple[int, str]]:
    """Queued runs nobody claimed: published before ``older_than``, or never published.

    A never-claimed run of an experiment younger than ``grace_seconds`` is left to the API,
    which publishes it right after its commit; the reaper picks it up only if that failed.
    """
    fresh = utcnow() - timedelta(seconds=grace_seconds)
    return [
        (r.id, r.queue)
        for r in session.execute(
            select(Run.id, Run.queue)
            .join(Experiment, Experiment.id == Run.experiment_id)
            .where(
                Run.status == "queued",
                Experiment.cancel_requested.is_(False),
                or_(
                    and_(
                        Run.published_at.is_(None),
                        or_(Run.attempts > 0, Experiment.created_at < fresh),
                    ),
                    Run.published_at < older_than,
                ),
            )
            .order_by(Run.id)
        ).all()
    ]


def published_queued_counts(session: Session, *, older_than: datetime) -> dict[str, int]:
    """Per queue, the queued runs of live experiments published before ``older_than``: each
    should still have a message in the broker."""
    rows = session.execute(
        select(Run.queue, func.count())
        .join(Experiment, Experiment.id == Run.experiment_id)
        .where(
            Run.status == "queued",
            Experiment.cancel_requested.is_(False),
            Run.published_at.is_not(None),
            Run.published_at < older_than,
        )
        .group_by(Run.queue)
    ).all()
    return {queue: int(n) for queue, n in rows}


def mark_published(session: Session, run_ids: list[int]) -> None:
    if run_ids:
        session.execute(
            update(Run)
            .where(Run.id.in_(run_ids), Run.status == "queued")
            .values(published_at=utcnow())
        )


def next_claimable(session: Session) -> list[int]:
    """Ids of runs a poller could claim now (queued, or running with an expired lease)."""
    now = utcnow()
    q = (
        select(Run.id)
        .join(Experiment, Experiment.id == Run.experiment_id)
        .where(
            Experiment.cancel_requested.is_(False),
            or_(Run.status == "queued", and_(Run.status == "running", Run.lease_expires_at < now)),
        )
        .order_by(Run.id)
        .limit(50)
    )
    return list(session.execute(q).scalars())
