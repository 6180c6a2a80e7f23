"""The Celery adapter: ``make_celery(settings)`` and one thin task over `execute_run`.

Settings follow docs/reliability.md: late acknowledgement, redelivery when a child dies,
one message prefetched per process, JSON only, and a visibility timeout above the hard
time limit so Redis never hands a live run's message to a second worker.

A worker registers itself (worker/registration.py) once it is ready and unregisters when it
stops. One started with the ``gpu`` queue on a machine where PyTorch sees no CUDA device
refuses to start: it would claim every cuda run and fail it.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections.abc import Sequence

from celery import Celery
from celery.signals import celeryd_init, worker_process_init, worker_ready, worker_shutdown
from celery.utils.text import str_to_list
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from service.config import Settings
from service.db import make_engine, make_session_factory
from service.db.workers import GPU_QUEUE

from .execute import execute_run
from .registration import Registration, gpu_queue_problem, probe_devices

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

    _register_workers(app, settings)

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def execute_run_task(run_id: int) -> str:
        outcome = execute_run(int(run_id), sessions=sessions.get(), settings=settings)
        log.info("run %s: %s", run_id, outcome)
        return outcome

    app.hsl_settings = settings  # type: ignore[attr-defined]
    return app


def _register_workers(app: Celery, settings: Settings) -> None:
    """Hooks of a worker of ``app``: the gpu-queue check at start, its row in ``workers``
    while it runs. The signals are process-wide; each handler acts for ``app`` only."""
    found: dict[str, object] = {}

    @celeryd_init.connect(weak=False)
    def _check_queues(sender=None, instance=None, options=None, **_: object) -> None:
        if instance is None or instance.app is not app:
            return
        queues = str_to_list((options or {}).get("queues")) or [app.conf.task_default_queue]
        found["queues"] = queues
        if GPU_QUEUE in queues:
            devices = probe_devices()
            problem = gpu_queue_problem(devices)
            if problem is not None:
                message = (
                    f"hsl worker: refusing to serve the {GPU_QUEUE!r} queue: {problem}. Every "
                    "run with device 'cuda' it claimed would fail. Start it on a machine with "
                    "an NVIDIA GPU and the 'gpu' extra, or leave 'gpu' out of --queues."
                )
                raise SystemExit(message)  # printed on stderr; the exit status is 1
            found["devices"] = devices

    @worker_ready.connect(weak=False)
    def _register(sender=None, **_: object) -> None:
        if sender is None or sender.app is not app or "queues" not in found:
            return
        # its own connections, none kept open: the pool processes fork from this one
        sessions = make_session_factory(make_engine(settings.database_url, poolclass=NullPool))
        registration = Registration(
            sessions,
            settings,
            kind="celery",
            queues=list(found["queues"]),  # type: ignore[call-overload]
            devices=found.get("devices"),  # type: ignore[arg-type]
        )
        registration.start()
        found["registration"] = registration

    @worker_shutdown.connect(weak=False)
    def _unregister(sender=None, **_: object) -> None:
        if getattr(sender, "app", None) is not app:
            return
        registration = found.pop("registration", None)
        if registration is not None:
            registration.stop()  # type: ignore[attr-defined]


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

    def _redis(self, conn):
        conn.ensure_connection(max_retries=1, timeout=2)
        return getattr(conn.default_channel, "client", None)

    def eviction_policy(self) -> str | None:
        """Redis' ``maxmemory-policy`` (None: unknown now, or not Redis)."""
        try:
            with self.app.connection_for_read() as conn:
                client = self._redis(conn)
                return None if client is None else str(client.info("memory")["maxmemory_policy"])
        except Exception:
            return None

    def readiness_problem(self) -> str | None:
        """For /readyz: the broker is down, or it may evict queued messages."""
        if not self.ping():
            return "unavailable"
        return eviction_problem(self.eviction_policy())

    def start(self) -> None:
        """At start-up: warn when the broker can evict queued messages (/readyz refuses)."""
        problem = eviction_problem(self.eviction_policy())
        if problem is not None:
            log.warning("broker: %s", problem)

    def queue_messages(self, queues: Sequence[str]) -> dict[str, int] | None:
        """Messages in the broker that may still start a run of each queue: waiting in the
        queue's lists (every priority) plus every message delivered but not acknowledged
        (Redis' ``unacked`` hash: prefetched or executing, of any queue). None: unknown."""
        try:
            with self.app.connection_for_read() as conn:
                client = self._redis(conn)
                if client is None:
                    return None
                channel = conn.default_channel
                unacked = int(client.hlen(channel.unacked_key))
                out = {}
                for queue in queues:
                    keys = {channel._q_for_pri(queue, pri) for pri in channel.priority_steps}
                    out[queue] = unacked + sum(int(client.llen(k)) for k in keys)
                return out
        except Exception:
            return None

    def close(self) -> None:
        pass


EVICTING_POLICIES = ("allkeys-lru", "allkeys-lfu", "allkeys-random")


def eviction_problem(policy: str | None) -> str | None:
    """Queued messages (lists without a TTL) can be evicted under the allkeys-* policies;
    noeviction and volatile-* never drop them."""
    if policy is not None and policy.startswith("allkeys"):
        return (
            f"maxmemory-policy is {policy}: Redis may evict queued messages; set "
            "maxmemory-policy noeviction"
        )
    return None


def broker_write_problem(app: Celery) -> str | None:
    """Why the broker refuses writes now (Redis at ``maxmemory`` with noeviction answers
    OOM, a replica READONLY), or None. A worker started then dies with "Unrecoverable
    error: OutOfMemoryError" while declaring its queues; `wait_for_broker` waits instead.
    A broker that is down is not our concern here: Celery retries the connection itself."""
    from redis.exceptions import OutOfMemoryError, ReadOnlyError

    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            client = getattr(conn.default_channel, "client", None)
            if client is None:
                return None
            # a write flagged denyoom, as the queue declarations at start are
            client.set("hsl:write-probe", "1", ex=60)
        return None
    except OutOfMemoryError:
        return "Redis is at maxmemory and refuses writes (OOM)"
    except ReadOnlyError:
        return "Redis is a read-only replica"
    except Exception:
        return None


def wait_for_broker(app: Celery, stop: threading.Event | None = None) -> float:
    """Block until the broker accepts writes; returns the seconds waited."""
    import time

    started = time.monotonic()
    delay, last_log = 0.5, -1e9
    while True:
        problem = broker_write_problem(app)
        if problem is None:
            return time.monotonic() - started
        if time.monotonic() - last_log >= 10:
            log.warning("hsl worker: %s; waiting for it before starting", problem)
            last_log = time.monotonic()
        if stop is not None and stop.wait(delay):
            return time.monotonic() - started
        if stop is None:
            time.sleep(delay)
        delay = min(delay * 2, 5.0)
