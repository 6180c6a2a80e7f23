"""``create_app(settings, make_publisher)``: the FastAPI application.

The caller chooses how runs reach workers (``make_publisher``): the embedded in-process
worker or Celery. The service itself imports neither.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from sqlalchemy.orm import Session, sessionmaker

import hsl_engine as he

from . import docs, errors, health, limits, presets, shedding
from .config import Settings
from .db import keys, make_engine, make_session_factory, migrate
from .deps import Publisher
from .experiments import routes as experiments
from .experiments.schemas import Problem
from .guards import RequestGuard
from .web import router as web_router

# the OpenAPI description (Swagger UI and ReDoc show it above the operations); the guides
# are files of the source tree, named by path since the service does not serve them
DESCRIPTION = """\
Submit an experiment spec, follow its progress, and fetch its results document, CSV and
figures. Errors are `application/problem+json` (RFC 9457).

The guides are in the `docs/` folder of the hsl source tree:

- `docs/model.md`: the model, the layer-wise spectral method and what is measured;
- `docs/theory.md`: the exact finite-size theory drawn over the measurements;
- `docs/reference.md`: every spec field with its type, default and limits, the results
  document, these routes and the command line;
- `docs/reliability.md`: what the service promises under faults, and how it is tested.

Every `/v1` route takes `Authorization: Bearer <key>`, except on the embedded service bound to
loopback, which runs keyless for its local user.
"""

MakePublisher = Callable[[sessionmaker[Session], Settings], Publisher]


def create_app(settings: Settings, make_publisher: MakePublisher) -> FastAPI:
    # every thread that may run database work holds at most one connection: the request
    # threads, the embedded worker's threads, and a few for the reaper and publishing
    engine = make_engine(
        settings.database_url,
        sqlite_synchronous=settings.sqlite_synchronous,
        pool_size=settings.api_threads + settings.embedded_workers + 4,
        max_overflow=4,
        pool_timeout=10,
        # no round trip before each checkout: after a database restart the first request on
        # a stale connection gets 503 and the pool is invalidated; the next one reconnects
        **({} if settings.database_url.startswith("sqlite") else {"pool_pre_ping": False}),
        pool_recycle=600,
    )
    if settings.auto_migrate if settings.auto_migrate is not None else settings.embedded:
        migrate.upgrade(settings.database_url)
    sessions = make_session_factory(engine)
    # reads of status documents and lists: no BEGIN/ROLLBACK round trips around them
    read_sessions = make_session_factory(engine.execution_options(isolation_level="AUTOCOMMIT"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the threads that run sync routes and database work: matched to the pool above
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        publisher = make_publisher(sessions, settings)
        app.state.publisher = publisher
        start = getattr(publisher, "start", None)
        if start is not None:
            start()
        try:
            yield
        finally:
            close = getattr(publisher, "close", None)
            if close is not None:
                close()
            engine.dispose()

    app = FastAPI(
        title="hsl",
        version=he.ENGINE_VERSION,
        summary="Simulation as a service for a solvable model of neural scaling laws",
        description=DESCRIPTION,
        lifespan=lifespan,
        # served from the installed package, not a CDN (service/docs.py)
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.read_sessions = read_sessions
    app.state.publisher = None
    app.state.submit_buckets = limits.TokenBuckets(settings.submit_rate, settings.submit_burst)
    app.state.local_tenant_id = None
    if not settings.keys_required:
        with sessions.begin() as session:
            app.state.local_tenant_id = keys.get_or_create_tenant(session, keys.LOCAL_TENANT).id

    errors.install(app)
    app.add_middleware(
        shedding.LoadShedder,
        active=settings.active_requests,
        queued=settings.max_queued_requests,
        wait=settings.queue_wait_seconds,
    )
    # outermost: refuses smuggling, foreign Host headers and cross-site writes before routing
    app.add_middleware(RequestGuard, settings=settings)
    app.include_router(health.router)
    app.include_router(experiments.router)
    app.include_router(presets.router)
    app.include_router(web_router)
    docs.install(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """OpenAPI with the engine's spec schema as the request body of POST /v1/experiments,
    the problem+json schema of every error response, and a bearer-key security scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    spec_schema = he.ExperimentSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(spec_schema.pop("$defs", {}))
    components["ExperimentSpec"] = spec_schema
    problem_schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(problem_schema.pop("$defs", {}))
    components["Problem"] = problem_schema
    schema["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "hsl_... API key"}
    }
    for path, ops in schema["paths"].items():
        if path.startswith("/v1/"):
            for op in ops.values():
                op["security"] = [{"bearer": []}]
    app.openapi_schema = schema
    return schema
