"""POST /v1/experiments: the status document, publication after the commit, dedupe of the
same spec per tenant and engine version, Idempotency-Key."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from sqlalchemy import update

import hsl_engine as he
from service.db import Experiment, Point

from .api import assert_problem, execute_all, runs_of, tiny_spec
from .conftest import both_databases

STATUS_FIELDS = {
    "id",
    "name",
    "status",
    "spec_hash",
    "engine_version",
    "created_at",
    "started_at",
    "finished_at",
    "progress",
    "error",
    "links",
}


@both_databases
def test_submit_returns_201_with_location_and_a_queued_status_document(client, publisher):
    spec = tiny_spec(methods=[{"name": "layerwise_spectral"}, {"name": "kernel_rbf"}])
    resp = client.post("/v1/experiments", json=spec)

    assert resp.status_code == 201, resp.text
    assert resp.headers["content-type"] == "application/json"
    doc = resp.json()
    assert STATUS_FIELDS <= doc.keys()
    assert resp.headers["location"] == f"/v1/experiments/{doc['id']}"
    assert doc["name"] == "t"
    assert doc["status"] == "queued"
    assert doc["spec_hash"] == he.parse_spec(spec).spec_hash
    assert doc["spec_hash"].startswith("sha256:")
    assert doc["engine_version"] == he.ENGINE_VERSION
    assert doc["created_at"] and doc["started_at"] is None and doc["finished_at"] is None
    assert doc["error"] is None
    # 2 methods x 2 seeds = 4 runs, 2 sample sizes each
    progress = doc["progress"]
    assert progress["points_done"] == 0
    assert progress["points_total"] == 4 * 2
    assert progress["fraction"] == 0.0
    assert "eta_seconds" in progress
    assert progress["runs"] == {"queued": 4}
    base = f"/v1/experiments/{doc['id']}"
    assert doc["links"]["self"] == base
    assert doc["links"]["results"] == f"{base}/results"
    assert doc["links"]["results_csv"] == f"{base}/results.csv"
    assert doc["links"]["cancel"] == f"{base}/cancel"
    assert doc["links"]["plots"]["mse"]["svg"] == f"{base}/plots/mse.svg"

    # one run per (method, seed), each published once
    runs = runs_of(client.app, doc["id"])
    assert sorted((r.method, r.seed) for r in runs) == sorted(he.runs(he.parse_spec(spec)))
    assert sorted(publisher.published) == sorted(r.id for r in runs)
    assert all(r.published_at is not None for r in runs)

    # the Location answers with the same document
    again = client.get(resp.headers["location"])
    assert again.status_code == 200
    assert again.json() == doc


@both_databases
def test_same_spec_from_the_same_tenant_returns_the_existing_experiment(client, publisher):
    first = client.post("/v1/experiments", json=tiny_spec())
    assert first.status_code == 201
    published = list(publisher.published)

    # the same spec, written differently (defaults spelled out, keys reordered)
    spelled = tiny_spec()
    spelled["model"]["activation"] = "id"
    spelled = dict(reversed(list(spelled.items())))
    second = client.post("/v1/experiments", json=spelled)

    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert publisher.published == published


@both_databases
def test_same_spec_from_another_tenant_is_a_new_experiment(client, bob):
    mine = client.post("/v1/experiments", json=tiny_spec())
    theirs = client.post("/v1/experiments", json=tiny_spec(), headers=bob)
    assert mine.status_code == theirs.status_code == 201
    assert theirs.json()["id"] != mine.json()["id"]
    assert theirs.json()["spec_hash"] == mine.json()["spec_hash"]


def age(app: FastAPI, experiment_id: str, version: str = "0.1.0") -> None:
    """Make an experiment look accepted, and its points computed, by engine ``version``."""
    with app.state.sessions.begin() as s:
        s.execute(
            update(Experiment).where(Experiment.id == experiment_id).values(engine_version=version)
        )
        s.execute(
            update(Point).where(Point.experiment_id == experiment_id).values(engine_version=version)
        )


@both_databases
def test_same_spec_after_an_engine_version_change_is_a_new_experiment(client, publisher):
    first = client.post("/v1/experiments", json=tiny_spec()).json()
    assert execute_all(client.app, first["id"]) == ["succeeded"] * 2
    age(client.app, first["id"])  # an earlier engine accepted and computed it
    published = len(publisher.published)

    again = client.post("/v1/experiments", json=tiny_spec())

    assert again.status_code == 201, again.text
    doc = again.json()
    assert doc["id"] != first["id"]
    assert doc["engine_version"] == he.ENGINE_VERSION
    assert doc["status"] == "queued" and doc["progress"]["points_done"] == 0
    assert len(publisher.published) == published + 2  # computed afresh
    # under this engine version the new one is the spec's experiment now
    third = client.post("/v1/experiments", json=tiny_spec())
    assert third.status_code == 200 and third.json()["id"] == doc["id"]
    # the earlier one stays as it was, with what computed it
    old = client.get(f"/v1/experiments/{first['id']}").json()
    assert old["status"] == "succeeded" and old["engine_version"] == "0.1.0"
    assert client.get(f"/v1/experiments/{first['id']}/results").json()["engine_version"] == (
        "0.1.0"
    )

    assert execute_all(client.app, doc["id"]) == ["succeeded"] * 2
    results = client.get(f"/v1/experiments/{doc['id']}/results").json()
    assert results["engine_version"] == he.ENGINE_VERSION and "engine_versions" not in results
    assert {p["engine_version"] for p in results["points"]} == {he.ENGINE_VERSION}


def test_idempotency_key_replay_after_an_engine_version_change_names_the_original(client):
    headers = {"Idempotency-Key": "k2"}
    first = client.post("/v1/experiments", json=tiny_spec(), headers=headers).json()
    age(client.app, first["id"])

    replay = client.post("/v1/experiments", json=tiny_spec(), headers=headers)

    # a retry of the request that created it, not a new submission
    assert replay.status_code == 200
    assert replay.json()["id"] == first["id"]
    assert replay.json()["engine_version"] == "0.1.0"


@both_databases
def test_a_cancelled_spec_may_be_submitted_again(client, publisher):
    first = client.post("/v1/experiments", json=tiny_spec()).json()
    assert client.post(f"/v1/experiments/{first['id']}/cancel").json()["status"] == "cancelled"
    published = len(publisher.published)

    again = client.post("/v1/experiments", json=tiny_spec())

    assert again.status_code == 201, again.text
    assert again.json()["id"] != first["id"]
    assert again.json()["status"] == "queued"
    assert len(publisher.published) == published + 2


@both_databases
def test_idempotency_key_replays_and_conflicts(client, publisher):
    headers = {"Idempotency-Key": "retry-42"}
    first = client.post("/v1/experiments", json=tiny_spec(), headers=headers)
    assert first.status_code == 201
    published = list(publisher.published)

    replay = client.post("/v1/experiments", json=tiny_spec(), headers=headers)
    assert replay.status_code == 200
    assert replay.json()["id"] == first.json()["id"]
    assert publisher.published == published

    other = client.post("/v1/experiments", json=tiny_spec(name="other"), headers=headers)
    body = assert_problem(other, 409, "conflict")
    assert {"field": "Idempotency-Key", "message": "reused with another spec"} in body["errors"]
    assert publisher.published == published
    listed = client.get("/v1/experiments").json()["items"]
    assert [e["id"] for e in listed] == [first.json()["id"]]


def test_idempotency_key_after_cancel_still_names_the_cancelled_experiment(client):
    headers = {"Idempotency-Key": "k1"}
    first = client.post("/v1/experiments", json=tiny_spec(), headers=headers).json()
    client.post(f"/v1/experiments/{first['id']}/cancel")

    replay = client.post("/v1/experiments", json=tiny_spec(), headers=headers)

    assert replay.status_code == 200
    assert replay.json()["id"] == first["id"]
    assert replay.json()["status"] == "cancelled"


@both_databases
def test_concurrent_submissions_of_one_spec_make_one_experiment(client, publisher):
    def post(i: int):
        headers = {"Idempotency-Key": "same"} if i % 2 else {}
        return client.post("/v1/experiments", json=tiny_spec(), headers=headers)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))

    assert sorted(r.status_code for r in responses) == [200] * 7 + [201], [
        r.text[:300] for r in responses if r.status_code >= 300
    ]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(publisher.published) == 2
    assert len(client.get("/v1/experiments").json()["items"]) == 1
