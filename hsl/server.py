"""The service roles of the command line: serve (embedded), api, worker, reaper, db, keys.

This is the composition root: it wires the service to the embedded worker or to Celery,
so that neither ``service`` nor ``worker`` needs to know about the other's choice.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from service.config import Settings


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def embedded_app(settings: Settings):
    """The API with the in-process worker (no broker)."""
    from service.app import create_app
    from worker.embedded import EmbeddedWorker

    return create_app(settings, lambda sessions, s: EmbeddedWorker(sessions, s))


def distributed_app(settings: Settings):
    """The API publishing runs to Celery workers through the broker."""
    from service.app import create_app
    from worker.celery_app import CeleryPublisher, make_celery

    return create_app(settings, lambda sessions, s: CeleryPublisher(make_celery(s)))


def _uvicorn(app, settings: Settings) -> int:
    import uvicorn

    from hsl.connections import uvicorn_options

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=15,
        **uvicorn_options(settings),
    )
    return 0


def _listen(settings: Settings, host: str | None, port: int | None, **update) -> Settings:
    """The settings with the command line's --host/--port (when given) on top."""
    if host is not None:
        update["host"] = host
    if port is not None:
        update["port"] = port
    return settings.model_copy(update=update)


def serve(host: str | None, port: int | None) -> int:
    _logging()
    settings = _listen(Settings(), host, port, broker_url=None)
    if settings.keys_required:
        logging.getLogger("hsl").info("API keys are required (host %s)", settings.host)
    print(
        f"hsl: embedded service on http://{settings.host}:{settings.port} "
        f"(database {settings.database_url}, in-process worker); docs at /docs",
        file=sys.stderr,
    )
    return _uvicorn(embedded_app(settings), settings)


def api(host: str | None, port: int | None) -> int:
    _logging()
    settings = Settings()
    if settings.broker_url is None:
        raise SystemExit("hsl api: set HSL_BROKER_URL (or use 'hsl serve' for the embedded mode)")
    settings = _listen(settings, host, port)
    return _uvicorn(distributed_app(settings), settings)


def worker(queues: str, concurrency: int) -> int:
    from worker.celery_app import CeleryPublisher, make_celery, wait_for_broker

    settings = Settings()
    if settings.broker_url is None:
        raise SystemExit("hsl worker: set HSL_BROKER_URL (the embedded mode needs no worker)")
    if settings.threads is None:
        # the processes share the cores: do not let each run use all of them
        settings = settings.model_copy(
            update={"threads": max(1, (os.cpu_count() or 1) // concurrency)}
        )
    app = make_celery(settings)
    # Redis at maxmemory (noeviction) refuses the queue declarations at start, which Celery
    # treats as unrecoverable: wait until it takes writes again instead of exiting
    _logging()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    waited = wait_for_broker(app, stop)
    if stop.is_set():
        return 0
    if waited > 0.1:
        logging.getLogger("hsl.worker").info("broker accepts writes after %.1f s", waited)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    CeleryPublisher(app).start()  # warns when the broker can evict queued messages
    argv = [
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "INFO",
        "--hostname",
        f"hsl-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
    return 0


def reaper() -> int:
    from service.db import make_engine, make_session_factory
    from worker.celery_app import CeleryPublisher, make_celery
    from worker.reaper import Reaper

    _logging()
    settings = Settings()
    if settings.broker_url is None:
        raise SystemExit("hsl reaper: set HSL_BROKER_URL (the embedded service reaps itself)")
    sessions = make_session_factory(make_engine(settings.database_url))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("hsl.reaper").info(
        "reaper: every %gs, lease %gs", settings.reaper_interval, settings.lease_seconds
    )
    publisher = CeleryPublisher(make_celery(settings))
    publisher.start()  # warns when the broker can evict queued messages
    Reaper(sessions, publisher, settings).run_forever(stop)
    return 0


def db_upgrade() -> int:
    from service.db import migrate

    settings = Settings()
    migrate.upgrade(settings.database_url)
    print(f"hsl: database at the head revision ({settings.database_url.split('@')[-1]})")
    return 0


def keys_create(tenant: str) -> int:
    from service.db import keys, make_engine, make_session_factory, migrate

    settings = Settings()
    engine = make_engine(settings.database_url)
    if not migrate.is_current(engine):
        raise SystemExit("hsl keys: the database is not migrated; run 'hsl db upgrade' first")
    try:
        with make_session_factory(engine).begin() as session:
            key = keys.create_key(session, tenant)
    except ValueError as exc:
        raise SystemExit(f"hsl keys: {exc}") from None
    print(f"hsl: new API key for tenant {tenant!r} (shown once, store it now):", file=sys.stderr)
    print(key)
    return 0


def keys_revoke(prefix: str) -> int:
    from service.db import keys, make_engine, make_session_factory

    settings = Settings()
    try:
        with make_session_factory(make_engine(settings.database_url)).begin() as session:
            count = keys.revoke_key(session, prefix)
    except ValueError as exc:
        raise SystemExit(f"hsl keys: {exc}") from None
    print(f"hsl: revoked {count} key(s)")
    return 0 if count else 1
