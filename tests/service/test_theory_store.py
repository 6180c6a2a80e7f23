"""The exact finite-size theory is computed once, where the experiment's work is done (the
worker, before a run's first point), stored in ``experiments.theory`` and read from there by
every results document (experiment, study, comparison); an experiment stored without it
gets it computed once, on its first results request, and stored.

Whether the theory runs is read from the engine's own memo tables (`_curve` and `_n_half`
of hsl_engine._finite_size, functools.lru_cache): every call of the finite-size curve or
of the n_half search counts there, hit or miss.
"""

from __future__ import annotations

from sqlalchemy import select, update

import hsl_engine as he
from hsl import document
from hsl_engine import _finite_size
from service.db import Experiment

from .api import execute, execute_all, runs_of, tiny_spec
from .conftest import both_databases

SPEC = tiny_spec(name="stored-theory")


def theory_calls() -> int:
    """Calls of the finite-size curve and of the n_half search so far (hits and misses)."""
    return sum(
        info.hits + info.misses
        for info in (_finite_size._curve.cache_info(), _finite_size._n_half.cache_info())
    )


def fresh(spec: dict) -> dict:
    """The theory computed anew: the engine's memo tables emptied first."""
    _finite_size._curve.cache_clear()
    _finite_size._n_half.cache_clear()
    return document.exact_theory(he.parse_spec(spec))


def stored_theory(app, experiment_id: str) -> dict | None:
    with app.state.sessions() as s:
        return s.execute(
            select(Experiment.theory).where(Experiment.id == experiment_id)
        ).scalar_one()


def submit(client, spec=SPEC) -> str:
    resp = client.post("/v1/experiments", json=spec)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def assert_document_carries(doc: dict, theory: dict) -> None:
    assert doc["theory"]["finite_size"] == theory["finite_size"]
    assert doc["theory"]["finite_size_note"] == theory["finite_size_note"]
    assert [t["n_half_finite_size"] for t in doc["thresholds"]] == theory["n_half_finite_size"]


@both_databases
def test_the_worker_stores_the_theory_and_results_read_it_without_computing(client):
    exp = submit(client)
    assert stored_theory(client.app, exp) is None  # nothing computed at submit

    first, *rest = runs_of(client.app, exp)
    assert execute(client.app, first.id) == "succeeded"

    # stored by the first run, before the experiment finished: partial results carry it
    stored = stored_theory(client.app, exp)
    assert stored is not None and stored["engine_version"] == he.ENGINE_VERSION
    assert stored["finite_size"] and stored["finite_size_note"] is None
    assert len(stored["n_half_finite_size"]) == he.parse_spec(SPEC).model.hidden_dim

    calls = theory_calls()
    partial = client.get(f"/v1/experiments/{exp}/results").json()
    assert theory_calls() == calls
    assert partial["complete"] is False
    assert_document_carries(partial, stored)

    # the later runs find it stored and do not compute it again
    assert [execute(client.app, r.id) for r in rest] == ["succeeded"] * len(rest)
    assert theory_calls() == calls
    doc = client.get(f"/v1/experiments/{exp}/results").json()
    assert theory_calls() == calls
    assert doc["complete"] is True
    assert stored_theory(client.app, exp) == stored  # stored once, never overwritten
    assert_document_carries(doc, stored)

    # the stored value is what a fresh computation gives, bit for bit
    assert stored == fresh(SPEC)


def test_the_document_shows_the_stored_value_not_a_recomputed_one(client):
    exp = submit(client)
    execute_all(client.app, exp)
    stored = stored_theory(client.app, exp)
    # a stored value no computation would give: what the document shows must be it
    marked = {**stored, "n_half_finite_size": [1234.5] * len(stored["n_half_finite_size"])}
    marked["finite_size"] = [{**row, "mse": 0.125} for row in stored["finite_size"]]
    with client.app.state.sessions.begin() as s:
        s.execute(update(Experiment).where(Experiment.id == exp).values(theory=marked))

    doc = client.get(f"/v1/experiments/{exp}/results").json()

    assert_document_carries(doc, marked)
    assert {row["mse"] for row in doc["theory"]["finite_size"]} == {0.125}


@both_databases
def test_an_experiment_stored_without_the_theory_is_back_filled_once(client):
    exp = submit(client)
    execute_all(client.app, exp)
    # as a row stored before the column existed (the migration leaves it null)
    with client.app.state.sessions.begin() as s:
        s.execute(update(Experiment).where(Experiment.id == exp).values(theory=None))
    assert stored_theory(client.app, exp) is None

    calls = theory_calls()
    doc = client.get(f"/v1/experiments/{exp}/results").json()

    assert theory_calls() > calls  # computed on this request
    stored = stored_theory(client.app, exp)
    assert stored == fresh(SPEC)
    assert_document_carries(doc, stored)
    # and only on this one: a comparison of it reads the stored value
    calls = theory_calls()
    compared = client.get("/v1/compare", params={"ids": exp}).json()
    assert theory_calls() == calls
    [member] = compared["experiments"]
    assert [t["n_half_finite_size"] for t in member["thresholds"]] == stored["n_half_finite_size"]


def test_study_and_compare_documents_use_the_stored_values(client):
    body = {"name": "gammas", "base": SPEC, "axes": {"model.gamma": [1.0, 0.6]}}
    resp = client.post("/v1/studies", json=body)
    assert resp.status_code == 201, resp.text
    study = resp.json()
    ids = [m["experiment_id"] for m in study["members"]]
    for exp in ids:
        execute_all(client.app, exp)
    stored = [stored_theory(client.app, exp) for exp in ids]
    assert all(s is not None for s in stored)
    assert stored[0]["n_half_finite_size"] != stored[1]["n_half_finite_size"]  # two gammas

    calls = theory_calls()
    results = client.get(f"/v1/studies/{study['id']}/results").json()
    compared = client.get("/v1/compare", params={"ids": ",".join(ids)}).json()
    assert theory_calls() == calls

    for member, theory in zip(results["members"], stored, strict=True):
        assert [t["n_half_finite_size"] for t in member["thresholds"]] == theory[
            "n_half_finite_size"
        ]
    for exp, theory in zip(compared["experiments"], stored, strict=True):
        assert [t["n_half_finite_size"] for t in exp["thresholds"]] == theory["n_half_finite_size"]


def test_a_spec_without_an_exact_theory_stores_the_reason(client):
    spec = tiny_spec(name="hermite", model={**SPEC["model"], "features": "hermite"})
    exp = submit(client, spec)
    execute_all(client.app, exp)

    stored = stored_theory(client.app, exp)

    assert stored["finite_size"] is None and stored["n_half_finite_size"] is None
    assert "features = 'gaussian' only" in stored["finite_size_note"]
    doc = client.get(f"/v1/experiments/{exp}/results").json()
    assert doc["theory"]["finite_size"] is None
    assert doc["theory"]["finite_size_note"] == stored["finite_size_note"]
    assert {t["n_half_finite_size"] for t in doc["thresholds"]} == {None}


def test_a_database_that_refuses_the_write_still_gets_the_theory(client, database_url):
    """A read-only database (SQLite's query_only: every write fails): the theory is computed
    and returned, and nothing is stored."""
    from sqlalchemy import event

    from service.db import make_engine, make_session_factory, theory

    exp = submit(client)
    engine = make_engine(database_url)

    @event.listens_for(engine, "connect")
    def _read_only(dbapi_conn, _record) -> None:
        dbapi_conn.execute("PRAGMA query_only = ON")

    try:
        value = theory.ensure(make_session_factory(engine).begin, exp, he.parse_spec(SPEC))
    finally:
        engine.dispose()

    assert value == fresh(SPEC)
    assert stored_theory(client.app, exp) is None
