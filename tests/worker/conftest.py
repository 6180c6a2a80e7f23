from __future__ import annotations

import pytest

from service.config import Settings
from service.db import make_engine, make_session_factory


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    """A database at the head revision (a copy of one upgraded once per session)."""
    return request.getfixturevalue(f"migrated_{request.param}_url")


@pytest.fixture
def sessions(db_url):
    factory = make_session_factory(make_engine(db_url))
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture
def settings(db_url) -> Settings:
    return Settings(database_url=db_url, lease_seconds=30, max_attempts=3, threads=1)
