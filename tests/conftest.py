"""Shared fixtures.

``seed``: the root seed of randomised tests. Tests must pass for any value; CI runs the
default, and ``HSL_TEST_SEED=all`` (or a number) exercises others, in the spirit of
scikit-learn's ``global_random_seed``.
"""

from __future__ import annotations

import os

import pytest

from tests.servers import postgres_url, private_postgres, redis_server  # noqa: F401


def _seeds() -> list[int]:
    raw = os.environ.get("HSL_TEST_SEED", "0")
    if raw == "all":
        return list(range(5))
    return [int(s) for s in raw.split(",")]


@pytest.fixture(params=_seeds())
def seed(request) -> int:
    return request.param
