"""The Celery adapter: ``make_celery(settings)`` and one thin task over `execute_run`.

Settings follow shared/RELIABILITY.md: late acknowledgement, redelivery when a child dies,
one message prefetched per process, JSON only, and a visibility timeout above the hard
time limit so Redis never hands a live run's message to a second worker.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections.abc import Sequence

from celery import Celery
from celery.signals import worker_process_init
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import make_engine, make_session_factory

from .execute import execute_run

log = logging.getLogger("hsl.worker")

TASK_NAME = "hsl.execute_run"


class _ProcessSessions:
    """One engine per process: prefork children must not share their parent's sockets."""

    def __init__(self, url: str):
        self.url = url
        self.pid: int | None = None
        self.factory: sessionmaker[Session] | None = None
        self.lock = threading.Lock()

    def get(self) -> sessionmaker[Session]:
        with self.lock:
            if self.factory is None or self.pid != os.getpid():
                self.factory = make_session_factory(make_engine(self.url))
                self.pid = os.getpid()
            return self.factory


def make_celery(settings: Settings) -> Celery:
    if settings.broker_url is None:
        raise ValueError("HSL_BROKER_URL is not set: the distributed roles need a broker")
    app = Celery("hsl", broker=settings.broker_url.get_secret_value(), set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="cpu",
        task_soft_time_limit=settings.run_time_limit,
        task_time_limit=settings.run_time_limit + 60,
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.1,
            "interval_step": 0.4,
            "interval_max": 1.0,
        },
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    sessions = _ProcessSessions(settings.database_url)

    if settings.memory_limit_bytes is not None:
        limit = settings.memory_limit_bytes

        @worker_process_init.connect(weak=False)
        def _limit_memory(**_: object) -> None:
            # each pool process gets the limit: a run that needs more raises MemoryError,
            # is failed with resource_exhausted, and the process goes on serving others
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def execute_run_task(run_id: int) -> str:
        outcome = execute_run(int(run_id), sessions=sessions.get(), settings=settings)
        log.info("run %s: %s", run_id, outcome)
        return outcome

    app.hsl_settings = settings  # type: ignore[attr-defined]
    return app


def _transport_options(settings: Settings) -> dict[str, float]:
    vt = settings.visibility_timeout
    return {
        "visibility_timeout": vt,
        # kombu sweeps unacknowledged messages back only every interval x throttle
        # seconds (100 s by default); with a short visibility timeout, sweep to match it
        "unacked_restore_interval": max(1.0, min(10.0, vt / 4)),
        "unacked_restore_throttle": 1 if vt < 600 else 10,
        # a vanished broker must not hang a publish (the API answers, the reaper retries)
        "socket_timeout": 5.0,
        "socket_connect_timeout": 3.0,
    }


class CeleryPublisher:
    """Publishes run ids to their queues; a failure leaves them for the reaper."""

    def __init__(self, app: Celery):
        self.app = app

    def publish(self, runs: Sequence[tuple[int, str]]) -> list[int]:
        published: list[int] = []
        for run_id, queue in runs:
            try:
                self.app.send_task(TASK_NAME, args=[run_id], queue=queue)
            except Exception as exc:  # broker down: the row stays unpublished
                log.warning("publishing run %s failed (%s); the reaper will retry", run_id, exc)
                break
            published.append(run_id)
        return published

    def wake(self) -> None:
        pass

    def epoch(self) -> str | None:
        """Redis' ``run_id``: new at every server start, so the reaper can tell a restart
        (whose queue may be empty) from a long backlog. None when unknown."""
        try:
            with self.app.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                client = getattr(conn.default_channel, "client", None)
                return None if client is None else str(client.info("server")["run_id"])
        except Exception:  # broker down or not Redis: no identity now
            return None

    def ping(self) -> bool:
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:
            return False

    def close(self) -> None:
        pass
