"""An app on a real, migrated database: a SQLite file by default, PostgreSQL where a test
asks for it with ``@both_databases``.

Each test gets its own database at the head revision: a copy of one upgraded with the real
Alembic revisions once per session. The broker is
outside the unit: a recording publisher stands in for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from service.db import keys

from .api import RecordingPublisher
from .live import live  # noqa: F401  (a real server in a thread)

with warnings.catch_warnings():
    # starlette asks for httpx2 and warns on import when only httpx (a project dependency)
    # is installed; the test client works the same with either
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

# the full suite runs on SQLite; tests marked with this also run on PostgreSQL
both_databases = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def database_url(request) -> str:
    """A migrated database: ``sqlite`` (default) or ``postgresql`` via indirect parametrisation
    (a copy of one upgraded with the real revisions once per session, tests/servers.py)."""
    kind = getattr(request, "param", "sqlite")
    return request.getfixturevalue(f"migrated_{kind}_url")


MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client(database_url) -> Iterator[MakeClient]:
    """``make_client(**settings)``: a started app (lifespan run) on the test's database.

    Keys are required unless the settings say otherwise; the body limit is small so the
    413 tests stay small. The app is ``client.app``; its publisher ``client.app.state.publisher``.
    """
    with ExitStack() as stack:

        def make(*, publisher: RecordingPublisher | None = None, **overrides: Any) -> TestClient:
            fields: dict[str, Any] = {
                "database_url": database_url,
                "require_keys": True,
                "auto_migrate": False,
                "max_body_bytes": 2048,
            }
            fields.update(overrides)
            settings = Settings(**fields)
            pub = publisher or RecordingPublisher()
            app = create_app(settings, lambda _sessions, _settings: pub)
            # a loopback base URL: the keyless service checks the Host header
            return stack.enter_context(TestClient(app, base_url="http://127.0.0.1"))

        yield make


def new_key(app: FastAPI, tenant: str) -> str:
    with app.state.sessions.begin() as session:
        return keys.create_key(session, tenant)


@pytest.fixture
def client(make_client) -> TestClient:
    """The started app; requests carry tenant alice's key unless they say otherwise."""
    c = make_client()
    c.headers["Authorization"] = f"Bearer {new_key(c.app, 'alice')}"
    return c


@pytest.fixture
def app(client) -> FastAPI:
    return client.app


@pytest.fixture
def publisher(app) -> RecordingPublisher:
    return app.state.publisher


@pytest.fixture
def bob(app) -> dict[str, str]:
    """Headers of another tenant, bob."""
    return {"Authorization": f"Bearer {new_key(app, 'bob')}"}
