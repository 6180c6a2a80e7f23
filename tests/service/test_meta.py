"""Presets, health, readiness, the OpenAPI document and the framework's own errors, all in
the service's problem+json."""

from __future__ import annotations

import pytest

import hsl_engine as he

from .api import RecordingPublisher, assert_problem

CONTRACT_PATHS = {
    "/v1/experiments": {"get", "post"},
    "/v1/experiments/{experiment_id}": {"get", "delete", "patch"},
    "/v1/experiments/{experiment_id}/results": {"get"},
    "/v1/experiments/{experiment_id}/results.csv": {"get"},
    "/v1/experiments/{experiment_id}/plots/{filename}": {"get"},
    "/v1/experiments/{experiment_id}/cancel": {"post"},
    "/v1/presets": {"get"},
    "/v1/presets/{name}": {"get"},
    "/v1/presets/studies": {"get"},
    "/v1/presets/studies/{name}": {"get"},
    "/v1/studies": {"get", "post"},
    "/v1/studies/{study_id}": {"get", "delete", "patch"},
    "/v1/studies/{study_id}/results": {"get"},
    "/v1/studies/{study_id}/plots/{filename}": {"get"},
    "/v1/studies/{study_id}/cancel": {"post"},
    "/v1/compare": {"get"},
    "/v1/compare/plots/{filename}": {"get"},
    "/healthz": {"get"},
    "/readyz": {"get"},
}


def test_presets_list_every_preset_with_its_spec_and_estimate(client):
    resp = client.get("/v1/presets")

    assert resp.status_code == 200
    presets = {p["name"]: p for p in resp.json()}
    assert set(presets) == set(he.preset_names())
    fig2 = presets["fig2-cpu"]
    assert fig2["spec"] == he.preset("fig2-cpu").model_dump(mode="json")
    assert he.parse_spec(fig2["spec"]).spec_hash == he.preset("fig2-cpu").spec_hash
    assert fig2["description"]
    est = he.estimate_resources(he.preset("fig2-cpu"))
    assert fig2["estimate"] == {
        "points": est.points,
        "feature_dim": est.feature_dim,
        "peak_bytes": est.peak_bytes,
        "flops": est.flops,
    }
    assert client.get("/v1/presets/fig2-cpu").json() == fig2


def test_a_preset_spec_can_be_submitted_as_it_is(client):
    spec = client.get("/v1/presets/fig2-cpu").json()["spec"]
    resp = client.post("/v1/experiments", json=spec)
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec_hash"] == he.preset("fig2-cpu").spec_hash


def test_unknown_preset_is_a_404_problem(client):
    body = assert_problem(client.get("/v1/presets/nope"), 404, "not-found")
    assert "fig2-cpu" in body["detail"]


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


def test_readyz_reports_the_database_and_the_worker(client):
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ready", "database": "ok", "worker": "ok"}


def test_readyz_is_503_when_the_publisher_is_down(make_client):
    client = make_client(publisher=RecordingPublisher(healthy=False))

    resp = client.get("/readyz")

    body = assert_problem(resp, 503, "unavailable")
    assert body["checks"] == {"database": "ok", "worker": "unavailable"}
    assert resp.headers["retry-after"]


def test_readyz_is_503_on_an_unmigrated_database(make_client, tmp_path):
    client = make_client(database_url=f"sqlite:///{tmp_path}/empty.db")

    body = assert_problem(client.get("/readyz"), 503, "unavailable")

    assert body["checks"]["database"] == "not migrated"


def test_openapi_lists_the_contract_and_the_spec_schema(client):
    resp = client.get("/openapi.json")

    assert resp.status_code == 200
    schema = resp.json()
    for path, methods in CONTRACT_PATHS.items():
        assert path in schema["paths"], path
        assert methods <= set(schema["paths"][path]), path
    components = schema["components"]["schemas"]
    assert "ExperimentSpec" in components
    assert {"name", "model", "sweep", "methods"} <= set(components["ExperimentSpec"]["properties"])
    body = schema["paths"]["/v1/experiments"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ExperimentSubmission"
    }
    # the spec's fields plus the labels that are no part of it
    submission = components["ExperimentSubmission"]["properties"]
    assert set(submission) == set(components["ExperimentSpec"]["properties"]) | {"tags", "notes"}
    study_body = schema["paths"]["/v1/studies"]["post"]["requestBody"]
    assert study_body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StudySubmission"
    }
    assert {"base", "axes"} <= set(components["StudySubmission"]["required"])
    # every new route declares its errors as problem+json
    for path in [p for p in CONTRACT_PATHS if p.startswith(("/v1/studies", "/v1/compare"))]:
        for op in schema["paths"][path].values():
            for code in ("401", "404", "422"):
                assert set(op["responses"][code]["content"]) == {"application/problem+json"}
    status = components["StatusDocument"]
    assert "engine_version" in status["required"]
    assert status["properties"]["engine_version"]["type"] == "string"
    results = schema["paths"]["/v1/experiments/{experiment_id}/results"]["get"]
    assert "engine_versions" in results["description"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/experiments"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_docs_page(client):
    resp = client.get("/docs")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in resp.text


@pytest.mark.parametrize("path", ["/nope", "/v1/nope", "/v2/experiments", "/v1/experiments/x/y"])
def test_unknown_route_is_a_404_problem(client, path):
    assert_problem(client.get(path), 404, "not-found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/experiments"),
        ("PUT", "/v1/experiments/x"),
        ("PUT", "/v1/studies/x"),
        ("GET", "/v1/experiments/x/cancel"),
        ("POST", "/healthz"),
        ("DELETE", "/v1/presets/fig2-cpu"),
    ],
)
def test_wrong_method_is_a_405_problem(client, method, path):
    resp = client.request(method, path)
    assert_problem(resp, 405, "method-not-allowed")
    assert resp.headers["allow"]
