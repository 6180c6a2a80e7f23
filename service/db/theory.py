"""The exact finite-size theory of an experiment, computed once and stored with it.

The theory (``hsl.document.exact_theory``) depends on the spec alone and costs seconds (1.6 s
for a tiny spec, 6.5 s for d1 = 17 under load), so it is never computed per request: the
worker computes it as the first step of a run that finds it missing (before the run's first
point, so partial results have it) and stores it in ``experiments.theory``; the results
documents read it from there. An experiment stored before the column existed, or one whose
runs have not started yet, gets it computed on its first results request (in the request's
worker thread, never on the event loop) and stored, once.

Storing is a conditional UPDATE (``theory IS NULL``): two workers that computed it at once
store one value, and it is never overwritten. Within one process a lock per experiment makes
concurrent callers wait for the first computation instead of repeating it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

import hsl_engine as he
from hsl.document import exact_theory

from .models import Experiment

log = logging.getLogger("hsl.theory")

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def stored(session: Session, experiment_id: str) -> dict[str, Any] | None:
    """The stored theory, or None when it was never computed."""
    return session.execute(
        select(Experiment.theory).where(Experiment.id == experiment_id)
    ).scalar_one_or_none()


def store(session: Session, experiment_id: str, value: dict[str, Any]) -> bool:
    """Store ``value`` unless a theory is stored already; True when this call stored it."""
    result = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.theory.is_(None))
        .values(theory=value)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def ensure(
    transaction: Callable[[], AbstractContextManager[Session]],
    experiment_id: str,
    spec: he.ExperimentSpec,
) -> dict[str, Any]:
    """The experiment's theory: the stored one, else computed now, stored and returned.

    ``transaction`` opens a session in a transaction that commits on exit (a sessionmaker's
    ``begin``); the computation runs outside any transaction. When the database refuses the
    write (a full or read-only disk) the value computed is returned all the same.
    """
    with transaction() as session:
        value = stored(session, experiment_id)
    if value is not None:
        return value
    with _lock(experiment_id):
        with transaction() as session:  # computed by another thread while this one waited?
            value = stored(session, experiment_id)
        if value is not None:
            return value
        value = exact_theory(spec)
        try:
            with transaction() as session:
                if not store(session, experiment_id, value):
                    # another process stored it first: serve that one, as everyone else will
                    value = stored(session, experiment_id) or value
        except DBAPIError as exc:  # a full or read-only disk: serve it, store it next time
            log.warning("experiment %s: theory computed, not stored: %s", experiment_id, exc)
    return value


def _lock(experiment_id: str) -> Any:
    with _locks_guard:
        lock = _locks.get(experiment_id)
        if lock is None:
            if len(_locks) > 1024:  # forget the idle ones: experiments come and go
                for key in [k for k, v in _locks.items() if not v.locked()]:
                    del _locks[key]
            lock = _locks[experiment_id] = threading.Lock()
        return lock
