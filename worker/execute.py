"""Execute one run: claim it, sweep its n values, store each point at once, finish it.

The single function shared by the Celery task and the embedded in-process worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

import hsl_engine as he
from hsl.document import point_to_dict
from service.config import Settings
from service.db import Experiment, Point, state, theory, utcnow

log = logging.getLogger("hsl.worker")

# what execute_run reports (the Celery task returns it; tests assert on it)
DONE = "succeeded"
NOTHING_TO_DO = "nothing_to_do"
CANCELLED = "cancelled"
LEASE_LOST = "lease_lost"
FAILED = "failed"
RETRY = "retry"
SHUTDOWN = "shutdown"
TIMEOUT = "timeout"


def make_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Heartbeat(threading.Thread):
    """Renews the lease every lease/3 seconds; notes when the lease is lost."""

    def __init__(self, sessions: sessionmaker[Session], run_id: int, owner: str, s: Settings):
        super().__init__(name=f"hsl-heartbeat-{run_id}", daemon=True)
        self.sessions, self.run_id, self.owner, self.settings = sessions, run_id, owner, s
        self.stop_event = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.settings.heartbeat_seconds):
            try:
                with self.sessions.begin() as session:
                    ok = state.renew_lease(
                        session,
                        self.run_id,
                        owner=self.owner,
                        lease_seconds=self.settings.lease_seconds,
                    )
                if not ok:
                    self.lost.set()
                    return
            except DBAPIError as exc:  # the database is away: try again next beat
                log.warning("heartbeat of run %s failed: %s", self.run_id, exc)


def _error(reason: str, message: str) -> dict[str, Any]:
    return {"reason": reason, "message": message}


def _classify(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """(what to do, error): deterministic failures are final; infrastructure ones retry."""
    if isinstance(exc, MemoryError):
        return FAILED, _error("resource_exhausted", "the run ran out of memory")
    if isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded):
        return FAILED, _error("timeout", "the run exceeded its time limit")
    if isinstance(exc, he.EngineError):
        return FAILED, _error("engine_error", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, DBAPIError):
        return RETRY, _error("database_error", str(exc.orig or exc)[:500])
    return FAILED, _error("internal_error", f"{type(exc).__name__}: {exc}"[:500])


def execute_run(
    run_id: int,
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    owner: str | None = None,
    backend: he.Backend | None = None,
    shutdown: threading.Event | None = None,
) -> str:
    """Execute run ``run_id`` if it can be claimed; idempotent under duplicate delivery.

    Points already stored (an earlier attempt) are skipped; each new point is committed
    in its own transaction; the final state change is fenced on the lease owner.
    ``shutdown`` set: stop at the next point and give the run back (attempt refunded).
    """
    owner = owner or make_owner()
    with sessions.begin() as session:
        run = state.claim_run(
            session,
            run_id,
            owner=owner,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
        )
        if run is None:
            return NOTHING_TO_DO
        exp = session.get(Experiment, run.experiment_id)
        spec_data, experiment_id = exp.spec, exp.id
        method, seed, attempt = run.method, run.seed, run.attempts
        skip = state.stored_ns(session, run_id)
    log.info(
        "run %s (%s, %s seed %s) claimed by %s, attempt %s, %s points stored",
        run_id,
        experiment_id,
        method,
        seed,
        owner,
        attempt,
        len(skip),
    )

    heartbeat = _Heartbeat(sessions, run_id, owner, settings)
    heartbeat.start()
    started = time.monotonic()
    stop_reason: list[str] = []

    def should_stop() -> bool:
        if shutdown is not None and shutdown.is_set():
            stop_reason.append(SHUTDOWN)
            return True
        if heartbeat.lost.is_set():
            stop_reason.append(LEASE_LOST)
            return True
        if time.monotonic() - started > settings.run_time_limit:
            stop_reason.append(TIMEOUT)
            return True
        try:
            with sessions() as s:
                if state.should_stop(s, experiment_id):
                    stop_reason.append(CANCELLED)
                    return True
        except DBAPIError:
            pass  # cannot tell now; the next boundary asks again
        return False

    outcome, error = DONE, None
    try:
        spec = state.stored_spec(spec_data)
        # the spec's device, solver.backend and solver.tf32, as this machine resolves them
        # (a DeviceError when it lacks them fails the run: engine_error)
        backend = backend or he.spec_backend(
            spec, threads=settings.threads, sample_budget_bytes=settings.sample_budget_bytes
        )
        _ensure_theory(sessions, experiment_id, spec, run_id)
        for p in he.iter_run(
            spec, method, seed, skip=skip, backend=backend, should_stop=should_stop
        ):
            _store_point(sessions, run_id, experiment_id, p, attempt)
        if stop_reason:
            outcome = stop_reason[0]
    except Exception as exc:  # classified below: nothing escapes unrecorded
        outcome, error = _classify(exc)
        log.warning("run %s: %s (%s)", run_id, error["reason"], error["message"])
    finally:
        heartbeat.stop_event.set()
        heartbeat.join()

    if outcome == TIMEOUT:
        outcome, error = (
            FAILED,
            _error("timeout", f"the run exceeded its time limit ({settings.run_time_limit:g} s)"),
        )
    if outcome == LEASE_LOST:
        return LEASE_LOST  # another worker owns it now
    if outcome == SHUTDOWN:
        log.info("run %s: shutdown: stopped at a point boundary (attempt refunded)", run_id)
    try:
        with sessions.begin() as session:
            if outcome in (RETRY, SHUTDOWN):
                state.release_run(
                    session, run_id, owner=owner, error=error, refund_attempt=outcome == SHUTDOWN
                )
            else:
                status = {DONE: "succeeded", CANCELLED: "cancelled", FAILED: "failed"}[outcome]
                if not state.finish_run(session, run_id, owner=owner, status=status, error=error):
                    return LEASE_LOST
            state.sync_experiment(session, experiment_id)
    except DBAPIError as exc:
        # the lease will expire and the reaper will hand the run out again
        log.warning("run %s: could not record its end (%s); the reaper will retry", run_id, exc)
        return RETRY
    return outcome


def _ensure_theory(
    sessions: sessionmaker[Session], experiment_id: str, spec: he.ExperimentSpec, run_id: int
) -> None:
    """The experiment's exact finite-size theory, computed and stored before the run's first
    point unless it is stored already, so that no results request computes it (and partial
    results carry it). It is not the run's work: a failure here is logged and the run goes
    on (the first results request then computes it)."""
    try:
        theory.ensure(sessions.begin, experiment_id, spec)
    except (SoftTimeLimitExceeded, TimeLimitExceeded):
        raise  # the run's time is up: classified as a timeout like any point's
    except Exception as exc:
        log.warning("run %s: the finite-size theory was not stored: %s", run_id, exc)


def _store_point(
    sessions: sessionmaker[Session], run_id: int, experiment_id: str, p: he.Point, attempt: int
) -> None:
    """One point, one transaction; a point that is already there is left as it is.

    What computed it (engine version, device, backend) goes into its columns as well.
    """
    delays = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
    for i in range(len(delays) + 1):
        try:
            with sessions.begin() as session:
                session.add(
                    Point(
                        run_id=run_id,
                        experiment_id=experiment_id,
                        method=p.method,
                        seed=p.seed,
                        n=p.n,
                        seconds=p.seconds,
                        data=point_to_dict(p),
                        engine_version=_text(p.extra.get("engine_version")),
                        device=_text(p.extra.get("device")),
                        backend=_text(p.extra.get("backend")),
                        attempt=attempt,
                        created_at=utcnow(),
                    )
                )
            return
        except IntegrityError:
            # stored by another execution of the same run: (run, n) is unique. The point
            # was computed twice; the reliability tests count this line.
            log.info("run %s: point n=%s was already stored (computed again)", run_id, p.n)
            return
        except DBAPIError:
            # a database hiccup: the point is recomputed if we give up, so wait a little
            if i == len(delays):
                raise
            time.sleep(delays[i])


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
