"""Factories for tests: migrated databases and stored experiments."""

from __future__ import annotations

from typing import Any

import hsl_engine as he
from service.db import keys, make_engine, make_session_factory, migrate
from service.experiments import repository

TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "model": {"d": 12, "q": 2, "epsilon": 0.5, "features": "gaussian"},
    "sweep": {"alphas": [1.5, 2.0, 2.5], "seeds": 2, "seed": 3, "n_test": 500},
    "methods": [{"name": "layerwise_spectral"}],
}


def migrated_sessions(url: str):
    """Sessions on a database upgraded with the real Alembic revisions."""
    migrate.upgrade(url)
    engine = make_engine(url)
    return make_session_factory(engine)


def store_experiment(sessions, spec: dict[str, Any] | he.ExperimentSpec, tenant: str = "t"):
    """Store an experiment and its runs as the API does; returns (experiment_id, run ids)."""
    spec = he.parse_spec(spec)
    with sessions.begin() as session:
        tenant_id = keys.get_or_create_tenant(session, tenant).id
        exp, _ = repository.create(session, tenant_id, spec, idempotency_key=None)
        return exp.id, [r.id for r in sorted(exp.runs, key=lambda r: r.id)]
