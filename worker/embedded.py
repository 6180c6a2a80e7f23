"""The embedded worker: threads in the API process that execute runs straight from the
database (no broker). Same `execute_run` as the Celery task; it polls, so work queued
before a restart is picked up when the service comes back.

It executes the runs of every queue, and registers itself in ``workers`` as serving ``cpu``
and ``gpu``: it counts as a GPU worker once its device probe has found CUDA (the API refuses
a cuda spec at submit where there is none)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import Run, state
from service.db.workers import GPU_QUEUE

from .execute import NOTHING_TO_DO, execute_run, make_owner
from .registration import Registration

log = logging.getLogger("hsl.worker")

POLL_SECONDS = 1.0


class EmbeddedWorker:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings):
        self.sessions, self.settings = sessions, settings
        self.wake_event = threading.Event()
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.registration: Registration | None = None
        # what each thread executes now: thread name -> (run id, lease owner)
        self.current: dict[str, tuple[int, str]] = {}

    # the publisher interface of the API: nothing to send, just wake the threads up
    def publish(self, runs: Sequence[tuple[int, str]]) -> list[int]:
        self.wake()
        return []

    def wake(self) -> None:
        self.wake_event.set()

    def ping(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def start(self) -> None:
        if self.settings.embedded_workers > 0:
            self.registration = Registration(
                self.sessions, self.settings, kind="embedded", queues=["cpu", GPU_QUEUE]
            )
            self.registration.start()
        for i in range(self.settings.embedded_workers):
            t = threading.Thread(target=self._loop, name=f"hsl-embedded-worker-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def close(self, timeout: float | None = None) -> None:
        """An orderly stop (uvicorn's lifespan shutdown, on SIGTERM or Ctrl-C).

        Runs stop at their next point boundary and give themselves back (attempt refunded).
        A point can take minutes, so after ``timeout`` (HSL_SHUTDOWN_GRACE_SECONDS) the runs
        still computing are given back here, in the database, before the process exits:
        queued again, attempt refunded, their stored points kept (the next claim skips
        them). Only the point in progress is lost. Without this the run stayed ``running``
        until its lease expired, and every restart cost it an attempt.
        """
        timeout = self.settings.shutdown_grace_seconds if timeout is None else timeout
        self.stop_event.set()
        self.wake_event.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for name, (run_id, owner) in list(self.current.items()):
            self._give_back(run_id, owner, name)
        if self.registration is not None:
            self.registration.stop()

    def _give_back(self, run_id: int, owner: str, thread: str) -> None:
        try:
            with self.sessions.begin() as session:
                released = state.release_run(
                    session, run_id, owner=owner, error=None, refund_attempt=True
                )
                if released:
                    experiment_id = session.execute(
                        select(Run.experiment_id).where(Run.id == run_id)
                    ).scalar_one()
                    state.sync_experiment(session, experiment_id)
            if released:
                log.info(
                    "shutdown: run %s given back mid-point by %s (attempt refunded)", run_id, thread
                )
        except DBAPIError as exc:  # its lease will expire; the attempt is then spent
            log.warning("shutdown: could not give run %s back (%s)", run_id, exc)

    def _loop(self) -> None:
        owner = make_owner()
        last_reap = 0.0
        while not self.stop_event.is_set():
            did_work = False
            try:
                now = time.monotonic()
                if now - last_reap > self.settings.reaper_interval:
                    with self.sessions.begin() as session:
                        state.expire_leases(session, max_attempts=self.settings.max_attempts)
                    last_reap = now
                with self.sessions() as session:
                    candidates = state.next_claimable(session)
                for run_id in candidates:
                    if self.stop_event.is_set():
                        break
                    name = threading.current_thread().name
                    self.current[name] = (run_id, owner)
                    try:
                        outcome = execute_run(
                            run_id,
                            sessions=self.sessions,
                            settings=self.settings,
                            owner=owner,
                            shutdown=self.stop_event,
                        )
                    finally:
                        self.current.pop(name, None)
                    did_work = did_work or outcome != NOTHING_TO_DO
            except DBAPIError as exc:
                log.warning("embedded worker: database unavailable (%s)", exc)
            except Exception:
                log.exception("embedded worker loop failed")
            if not did_work:
                self.wake_event.wait(POLL_SECONDS)
                self.wake_event.clear()
