"""Shared fixtures.

``seed``: the root seed of randomised tests. Tests must pass for any value; CI runs the
default, and ``HSL_TEST_SEED=all`` (or a number) exercises others, in the spirit of
scikit-learn's ``global_random_seed``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.servers import (  # noqa: F401
    _migrated_postgresql_template,
    _migrated_sqlite_template,
    migrated_postgresql_url,
    migrated_sqlite_url,
    postgres_url,
    private_postgres,
    redis_server,
)


def _seeds() -> list[int]:
    raw = os.environ.get("HSL_TEST_SEED", "0")
    if raw == "all":
        return list(range(5))
    return [int(s) for s in raw.split(",")]


@pytest.fixture(params=_seeds())
def seed(request) -> int:
    return request.param


# Whole directories and files marked ``slow`` (left out by ``-m "not slow"``, the newcomer's
# fast subset; single costly tests carry ``@pytest.mark.slow`` where they are defined): the
# reliability scenarios start real servers, brokers and databases and drive them for 2-45 s
# each, the integration tests start whole stacks (workers, reapers, Redis), the browser tests
# start Chromium and a served hsl per test, and the client's end-to-end files serve, kill and
# restart real services (minutes).
SLOW_DIRECTORIES = ("reliability", "integration", "browser")
SLOW_FILES = (
    "cli/test_client_resilience.py",
    "cli/test_client_library.py",
    "cli/test_study_cli.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    root = Path(__file__).parent
    for item in items:
        parts = Path(str(item.path)).relative_to(root).parts
        if parts and (parts[0] in SLOW_DIRECTORIES or "/".join(parts) in SLOW_FILES):
            item.add_marker(pytest.mark.slow)
