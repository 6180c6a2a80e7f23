"""POST /v1/experiments/{id}/cancel and DELETE /v1/experiments/{id}: queued work never
starts, both are scoped to the tenant, delete removes runs and points."""

from __future__ import annotations

from sqlalchemy import func, select

from service.db import Experiment, Point, Run

from .api import assert_problem, execute, runs_of, tiny_spec
from .conftest import both_databases


def submit(client, **top) -> str:
    resp = client.post("/v1/experiments", json=tiny_spec(**top))
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def count(app, model, experiment_id: str) -> int:
    column = model.id if model is Experiment else model.experiment_id
    with app.state.sessions() as session:
        return session.execute(
            select(func.count()).select_from(model).where(column == experiment_id)
        ).scalar_one()


@both_databases
def test_cancel_of_a_queued_experiment_cancels_its_runs(client):
    exp = submit(client)

    resp = client.post(f"/v1/experiments/{exp}/cancel")

    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    doc = resp.json()
    assert doc["id"] == exp
    assert doc["status"] == "cancelled"
    assert doc["finished_at"] is not None
    assert doc["progress"]["runs"] == {"cancelled": 2}
    assert doc["progress"]["eta_seconds"] is None
    runs = runs_of(client.app, exp)
    assert [r.status for r in runs] == ["cancelled", "cancelled"]
    # a message delivered after the cancel finds nothing to do
    assert execute(client.app, runs[0].id) == "nothing_to_do"
    assert count(client.app, Point, exp) == 0

    again = client.post(f"/v1/experiments/{exp}/cancel")
    assert again.status_code == 200
    assert again.json() == doc
    assert client.get(f"/v1/experiments/{exp}").json() == doc


def test_cancel_of_a_running_experiment_keeps_its_points(client):
    exp = submit(client)
    first, second = runs_of(client.app, exp)
    assert execute(client.app, first.id) == "succeeded"

    doc = client.post(f"/v1/experiments/{exp}/cancel").json()

    assert doc["status"] == "cancelled"
    assert doc["progress"]["runs"] == {"succeeded": 1, "cancelled": 1}
    assert doc["progress"]["points_done"] == 2
    assert execute(client.app, second.id) == "nothing_to_do"
    results = client.get(f"/v1/experiments/{exp}/results").json()
    assert results["complete"] is False
    assert len(results["points"]) == 2


@both_databases
def test_delete_removes_the_experiment_its_runs_and_points(client):
    exp = submit(client)
    keep = submit(client, name="keep")
    execute(client.app, runs_of(client.app, exp)[0].id)
    assert count(client.app, Point, exp) == 2

    resp = client.delete(f"/v1/experiments/{exp}")

    assert resp.status_code == 204
    assert resp.content == b""
    assert_problem(client.get(f"/v1/experiments/{exp}"), 404, "not-found")
    assert_problem(client.get(f"/v1/experiments/{exp}/results"), 404, "not-found")
    assert count(client.app, Experiment, exp) == 0
    assert count(client.app, Run, exp) == 0
    assert count(client.app, Point, exp) == 0
    assert [e["id"] for e in client.get("/v1/experiments").json()["items"]] == [keep]
    assert count(client.app, Run, keep) == 2
    # gone: a second delete and a cancel find nothing
    assert_problem(client.delete(f"/v1/experiments/{exp}"), 404, "not-found")
    assert_problem(client.post(f"/v1/experiments/{exp}/cancel"), 404, "not-found")
    # and the spec may be submitted again
    assert client.post("/v1/experiments", json=tiny_spec()).status_code == 201


@both_databases
def test_another_tenant_can_neither_cancel_nor_delete(client, bob):
    exp = submit(client)
    before = client.get(f"/v1/experiments/{exp}").json()

    assert_problem(client.post(f"/v1/experiments/{exp}/cancel", headers=bob), 404, "not-found")
    assert_problem(client.delete(f"/v1/experiments/{exp}", headers=bob), 404, "not-found")

    assert client.get(f"/v1/experiments/{exp}").json() == before
    assert before["status"] == "queued"
    assert [r.status for r in runs_of(client.app, exp)] == ["queued", "queued"]
    assert count(client.app, Run, exp) == 2


def test_unknown_id_cancel_and_delete_are_404(client):
    assert_problem(client.post("/v1/experiments/nope/cancel"), 404, "not-found")
    assert_problem(client.delete("/v1/experiments/nope"), 404, "not-found")
