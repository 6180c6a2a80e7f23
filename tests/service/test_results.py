"""Results, CSV and plots: empty before any point, partial while runs are missing, and,
once the worker has executed every run, the same numbers as a local run of the engine;
each point names the engine version, device and backend that computed it."""

from __future__ import annotations

import csv
import dataclasses
import io

import pytest
from sqlalchemy import select, update

import hsl_engine as he
from hsl.document import results_document
from service.db import Point

from .api import assert_problem, execute, execute_all, runs_of, tiny_spec
from .conftest import both_databases

SPEC = tiny_spec(methods=[{"name": "layerwise_spectral"}, {"name": "kernel_rbf"}])
EXACT = ("mse", "overlap", "cos2", "eigenvalues", "recovered", "n_train_used", "alpha")


@pytest.fixture(scope="module")
def local_points() -> dict[tuple[str, int, int], dict]:
    """The points of the same spec run locally, keyed by (method, seed, n)."""
    spec = he.parse_spec(SPEC)
    result = he.run_experiment(spec)
    doc = results_document(spec, result.points)
    return {(p["method"], p["seed"], p["n"]): p for p in doc["points"]}


def submit(client, spec=SPEC) -> str:
    resp = client.post("/v1/experiments", json=spec)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def test_results_before_any_point_are_empty_and_incomplete(client):
    exp = submit(client)

    resp = client.get(f"/v1/experiments/{exp}/results")

    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    doc = resp.json()
    assert doc["experiment_id"] == exp
    assert doc["complete"] is False
    assert doc["points"] == []
    assert doc["spec_hash"] == he.parse_spec(SPEC).spec_hash
    assert doc["spec"] == he.parse_spec(SPEC).model_dump(mode="json")
    assert doc["engine_version"] == he.ENGINE_VERSION
    assert doc["d1"] == he.parse_spec(SPEC).model.hidden_dim
    assert len(doc["weights"]) == doc["d1"]

    csv_resp = client.get(f"/v1/experiments/{exp}/results.csv")
    assert csv_resp.status_code == 200
    assert csv_resp.text.count("\n") == 1  # the header only


@both_databases
def test_executed_experiment_has_the_numbers_of_a_local_run(client, local_points):
    exp = submit(client)

    assert execute_all(client.app, exp) == ["succeeded"] * 4

    status = client.get(f"/v1/experiments/{exp}").json()
    assert status["status"] == "succeeded"
    assert status["started_at"] is not None and status["finished_at"] is not None
    assert status["progress"]["points_done"] == status["progress"]["points_total"] == 8
    assert status["progress"]["fraction"] == 1.0
    assert status["progress"]["runs"] == {"succeeded": 4}

    doc = client.get(f"/v1/experiments/{exp}/results").json()
    assert doc["complete"] is True
    assert len(doc["points"]) == status["progress"]["points_total"]
    stored = {(p["method"], p["seed"], p["n"]): p for p in doc["points"]}
    assert stored.keys() == local_points.keys()
    for key, local in local_points.items():
        for field in EXACT:
            assert stored[key][field] == local[field], (key, field)
        for field in ("engine_version", "device", "backend"):
            assert stored[key][field] == local[field], (key, field)
    assert {p["engine_version"] for p in doc["points"]} == {he.ENGINE_VERSION}
    assert doc["engine_version"] == he.ENGINE_VERSION and "engine_versions" not in doc
    assert set(doc["curves"]) == {"layerwise_spectral", "kernel_rbf"}

    # finished work stays finished: cancel is a no-op, the spec is deduplicated
    assert client.post(f"/v1/experiments/{exp}/cancel").json()["status"] == "succeeded"
    again = client.post("/v1/experiments", json=SPEC)
    assert again.status_code == 200 and again.json()["id"] == exp


def cell(value) -> str:
    """A CSV cell: empty for a missing value, floats written to round-trip exactly."""
    return "" if value is None else repr(value)


def test_csv_has_a_header_and_one_row_per_point(client):
    exp = submit(client)
    execute_all(client.app, exp)
    doc = client.get(f"/v1/experiments/{exp}/results").json()
    points, doc_d1 = doc["points"], doc["d1"]

    resp = client.get(f"/v1/experiments/{exp}/results.csv")

    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/csv")
    assert "attachment" in resp.headers["content-disposition"]
    reader = csv.DictReader(io.StringIO(resp.text))
    rows = list(reader)
    assert reader.fieldnames[:4] == ["method", "seed", "n", "alpha"]
    assert f"cos2_{doc_d1}" in reader.fieldnames and "eig_1" in reader.fieldnames
    assert len(rows) == len(points) == 8
    for row, point in zip(rows, points, strict=True):
        assert (row["method"], int(row["seed"]), int(row["n"])) == (
            point["method"],
            point["seed"],
            point["n"],
        )
        assert row["mse"] == cell(point["mse"])
        assert row["overlap"] == cell(point["overlap"])
        cos2 = point["cos2"] or [None] * doc_d1
        assert [row[f"cos2_{i + 1}"] for i in range(doc_d1)] == [cell(v) for v in cos2]


def test_plots_render_in_png_and_svg(client):
    exp = submit(client)
    execute_all(client.app, exp)

    for name in ("mse", "overlap", "cos2", "spectrum"):
        png = client.get(f"/v1/experiments/{exp}/plots/{name}.png")
        assert png.status_code == 200, (name, png.text)
        assert png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG\r\n\x1a\n")

        svg = client.get(f"/v1/experiments/{exp}/plots/{name}.svg")
        assert svg.status_code == 200, (name, svg.text)
        assert svg.headers["content-type"].startswith("image/svg+xml")
        assert "<svg" in svg.text


@pytest.mark.parametrize("filename", ["loss.png", "mse.pdf", "mse", "mse.png.svg", ".png"])
def test_unknown_plot_is_a_404_problem(client, filename):
    exp = submit(client)
    execute(client.app, runs_of(client.app, exp)[0].id)

    body = assert_problem(client.get(f"/v1/experiments/{exp}/plots/{filename}"), 404, "not-found")
    assert "mse" in body["detail"]


def test_plots_before_any_point_are_a_404_problem(client):
    exp = submit(client)
    assert_problem(client.get(f"/v1/experiments/{exp}/plots/mse.png"), 404, "not-found")


def test_partial_results_hold_the_points_of_the_executed_run(client, local_points):
    exp = submit(client)
    run = runs_of(client.app, exp)[0]

    assert execute(client.app, run.id) == "succeeded"

    status = client.get(f"/v1/experiments/{exp}").json()
    assert status["status"] == "running"
    assert status["progress"]["points_done"] == 2
    assert status["progress"]["fraction"] == 2 / 8
    assert status["progress"]["runs"] == {"succeeded": 1, "queued": 3}
    assert status["finished_at"] is None

    doc = client.get(f"/v1/experiments/{exp}/results").json()
    assert doc["complete"] is False
    assert len(doc["points"]) == status["progress"]["points_done"]
    assert {(p["method"], p["seed"]) for p in doc["points"]} == {(run.method, run.seed)}
    for p in doc["points"]:
        assert p["mse"] == local_points[(p["method"], p["seed"], p["n"])]["mse"]

    # the rest arrives: the document grows and completes
    execute_all(client.app, exp)
    doc = client.get(f"/v1/experiments/{exp}/results").json()
    assert doc["complete"] is True
    assert len(doc["points"]) == 8


def set_run_points(app, run_id: int, **values) -> None:
    with app.state.sessions.begin() as s:
        s.execute(update(Point).where(Point.run_id == run_id).values(**values))


@both_databases
def test_points_of_two_engine_versions_are_listed_and_the_newest_named(client):
    exp = submit(client)
    first, *_ = runs_of(client.app, exp)
    execute_all(client.app, exp)
    # the first run was computed by an older engine (its column says so; the JSON does not)
    set_run_points(client.app, first.id, engine_version="0.1.0")

    doc = client.get(f"/v1/experiments/{exp}/results").json()

    assert doc["engine_versions"] == ["0.1.0", he.ENGINE_VERSION]
    assert doc["engine_version"] == he.ENGINE_VERSION
    for p in doc["points"]:
        older = (p["method"], p["seed"]) == (first.method, first.seed)
        assert p["engine_version"] == ("0.1.0" if older else he.ENGINE_VERSION), p


def test_provenance_is_read_from_the_columns_when_the_json_lacks_it(client):
    exp = submit(client)
    execute_all(client.app, exp)
    with client.app.state.sessions.begin() as s:
        for point in s.scalars(select(Point).where(Point.experiment_id == exp)):
            data = {k: v for k, v in point.data.items() if k not in ("device", "backend")}
            point.data = {**data, "engine_version": "0.0.1"}  # the column wins
            point.device, point.backend = "cuda:3", "torch"

    doc = client.get(f"/v1/experiments/{exp}/results").json()

    assert len(doc["points"]) == 8
    assert {(p["engine_version"], p["device"], p["backend"]) for p in doc["points"]} == {
        (he.ENGINE_VERSION, "cuda:3", "torch")
    }


def test_points_that_recorded_no_provenance_say_so(client):
    exp = submit(client)
    execute_all(client.app, exp)
    # as stored before the engine recorded what computed a point (migration 0002 leaves null)
    with client.app.state.sessions.begin() as s:
        for point in s.scalars(select(Point).where(Point.experiment_id == exp)):
            keep = {k: v for k, v in point.data.items() if k not in ("engine_version", "device")}
            point.data = {**keep, "backend": None}
            point.engine_version = point.device = point.backend = None

    doc = client.get(f"/v1/experiments/{exp}/results").json()

    assert len(doc["points"]) == 8
    for p in doc["points"]:
        assert (p["engine_version"], p["device"], p["backend"]) == (None, None, None)
    # no point knows its engine: the document does not claim this one computed them
    assert doc["engine_version"] is None and "engine_versions" not in doc


def test_engine_versions_are_ordered_by_release_number_not_as_text():
    spec = he.parse_spec(SPEC)
    method, seed = he.runs(spec)[0]
    points = list(he.iter_run(spec, method, seed))
    assert len(points) == 2
    versions = ["0.10.0", "0.9.1"]
    aged = [
        dataclasses.replace(p, extra={**p.extra, "engine_version": v})
        for p, v in zip(points, versions, strict=True)
    ]

    doc = results_document(spec, aged)

    assert doc["engine_versions"] == ["0.9.1", "0.10.0"]
    assert doc["engine_version"] == "0.10.0"
    assert [p["engine_version"] for p in doc["points"]] == versions  # sorted by n
    assert results_document(spec, aged[:1])["engine_version"] == "0.10.0"
    assert "engine_versions" not in results_document(spec, aged[:1])
    assert results_document(spec, [])["engine_version"] == he.ENGINE_VERSION
