"""What the service tests share: a tiny spec, the problem+json check, runs and their execution.

The publisher stands in for the broker (outside the unit under test); the database is real.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from service.db import Run

TINY_SPEC: dict[str, Any] = {
    "name": "t",
    "model": {"d": 12, "q": 2, "epsilon": 0.5, "features": "gaussian"},
    "sweep": {"alphas": [1.5, 2.0], "seeds": 2, "seed": 3, "n_test": 500},
    "methods": [{"name": "layerwise_spectral"}],
}


def tiny_spec(**top: Any) -> dict[str, Any]:
    """A copy of the tiny spec (runs in well under a second) with top-level fields replaced."""
    spec = copy.deepcopy(TINY_SPEC)
    spec.update(copy.deepcopy(top))
    return spec


class RecordingPublisher:
    """The broker's stand-in: records what it is asked to publish and reports it published."""

    def __init__(self, *, healthy: bool = True):
        self.published: list[int] = []
        self.queues: dict[int, str] = {}  # run id -> the queue it was published to
        self.wakes = 0
        self.healthy = healthy

    def publish(self, runs: list[tuple[int, str]]) -> list[int]:
        ids = [run_id for run_id, _queue in runs]
        self.published.extend(ids)
        self.queues.update(runs)
        return ids

    def wake(self) -> None:
        self.wakes += 1

    def ping(self) -> bool:
        return self.healthy


def assert_problem(resp: httpx.Response, status: int, type_: str | None = None) -> dict[str, Any]:
    """An RFC 9457 problem with ``status``; returns the body."""
    assert resp.status_code == status, resp.text[:2000]
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body = resp.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["type"].startswith("https://")
    if type_ is not None:
        assert body["type"].endswith("/" + type_), body["type"]
    return body


def runs_of(app: FastAPI, experiment_id: str) -> list[Run]:
    with app.state.sessions() as session:
        return list(
            session.execute(
                select(Run).where(Run.experiment_id == experiment_id).order_by(Run.id)
            ).scalars()
        )


def execute(app: FastAPI, run_id: int) -> str:
    """Execute one run for real with the worker's own function."""
    from worker.execute import execute_run

    return execute_run(run_id, sessions=app.state.sessions, settings=app.state.settings)


def execute_all(app: FastAPI, experiment_id: str) -> list[str]:
    return [execute(app, r.id) for r in runs_of(app, experiment_id)]
