from __future__ import annotations

import pytest

from service.config import Settings
from tests.factories import migrated_sessions


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/worker.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def sessions(db_url):
    factory = migrated_sessions(db_url)
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture
def settings(db_url) -> Settings:
    return Settings(database_url=db_url, lease_seconds=30, max_attempts=3, threads=1)
