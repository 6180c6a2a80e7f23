"""Tags and notes on experiments (issue 13 item 6): set at submit, edited with PATCH,
filtered with ?tag=, never part of the spec hash; and GET /v1/compare (item 2)."""

from __future__ import annotations

import pytest

from .api import assert_problem, execute_all, tiny_spec
from .conftest import both_databases


def submit(client, **top):
    resp = client.post("/v1/experiments", json=tiny_spec(**top))
    assert resp.status_code in (200, 201), resp.text
    return resp


@both_databases
def test_tags_and_notes_at_submit_are_not_part_of_the_spec(client):
    plain = submit(client).json()
    tagged = submit(client, tags=["gamma-scan", "v2", "gamma-scan"], notes="first try\nok")

    assert tagged.status_code == 200  # the same spec: the same experiment
    doc = tagged.json()
    assert doc["id"] == plain["id"] and doc["spec_hash"] == plain["spec_hash"]
    assert doc["tags"] == ["gamma-scan", "v2"] and doc["notes"] == "first try\nok"
    results = client.get(f"/v1/experiments/{doc['id']}/results").json()
    assert "tags" not in results["spec"] and "notes" not in results["spec"]
    # tags given again are added, notes replaced
    again = submit(client, tags=["v3", "v2"], notes="second").json()
    assert again["tags"] == ["gamma-scan", "v2", "v3"] and again["notes"] == "second"
    assert client.get(f"/v1/experiments/{doc['id']}").json()["tags"] == again["tags"]


@both_databases
def test_patch_edits_tags_and_notes_and_the_list_filters_by_tag(client):
    a = submit(client, name="a", tags=["keep"]).json()["id"]
    b = submit(client, name="b").json()["id"]
    before = client.get(f"/v1/experiments/{b}")

    resp = client.patch(f"/v1/experiments/{b}", json={"tags": ["keep", "x:1"], "notes": "n"})

    assert resp.status_code == 200
    doc = resp.json()
    assert doc["tags"] == ["keep", "x:1"] and doc["notes"] == "n"
    assert doc["spec_hash"] == before.json()["spec_hash"]
    assert client.get(f"/v1/experiments/{b}").headers["etag"] != before.headers["etag"]
    listed = client.get("/v1/experiments", params={"tag": "keep"}).json()["items"]
    assert [e["id"] for e in listed] == [b, a]
    assert [
        e["id"] for e in client.get("/v1/experiments", params={"tag": "x:1"}).json()["items"]
    ] == [b]
    assert client.get("/v1/experiments", params={"tag": "kee"}).json()["items"] == []
    # notes only: tags kept; null clears the notes; an empty list clears the tags
    assert client.patch(f"/v1/experiments/{b}", json={"notes": None}).json()["tags"] == [
        "keep",
        "x:1",
    ]
    cleared = client.patch(f"/v1/experiments/{b}", json={"tags": []}).json()
    assert cleared["tags"] == [] and cleared["notes"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tags": ["ok", "not ok"]}, "tags[1]"),
        ({"tags": ["-lead"]}, "tags[0]"),
        ({"tags": ["x" * 65]}, "tags[0]"),
        ({"tags": [f"t{i}" for i in range(21)]}, "tags"),
        ({"tags": "a"}, "tags"),
        ({"tags": None}, "tags"),
        ({"notes": "x" * 10_001}, "notes"),
        ({"notes": "bell\u0007"}, "notes"),
        ({"notes": "a\u202eb"}, "notes"),
        ({}, "body"),
        ({"spec": {}}, "spec"),
    ],
)
def test_invalid_labels_are_422_naming_the_field(client, body, field):
    exp = submit(client).json()["id"]
    problem = assert_problem(client.patch(f"/v1/experiments/{exp}", json=body), 422)
    assert problem["errors"][0]["field"] == field, problem
    if field.startswith("tags") and "tags" in body and isinstance(body["tags"], list):
        # the same rules at submit
        sent = client.post("/v1/experiments", json=tiny_spec(name="new", **body))
        assert assert_problem(sent, 422)["errors"][0]["field"] == field


def test_patch_of_another_tenants_experiment_is_404(client, bob):
    exp = submit(client).json()["id"]
    assert_problem(client.patch(f"/v1/experiments/{exp}", json={"notes": "x"}, headers=bob), 404)
    assert client.get(f"/v1/experiments/{exp}").json()["notes"] is None


def test_study_tags_and_notes(client):
    body = {"base": tiny_spec(), "axes": {"model.gamma": [1.0]}, "tags": ["s"], "notes": "why"}
    doc = client.post("/v1/studies", json=body).json()
    assert doc["tags"] == ["s"] and doc["notes"] == "why"
    patched = client.patch(f"/v1/studies/{doc['id']}", json={"tags": ["t"], "notes": None}).json()
    assert patched["tags"] == ["t"] and patched["notes"] is None
    assert patched["study_hash"] == doc["study_hash"]
    problem = assert_problem(client.patch(f"/v1/studies/{doc['id']}", json={"tags": [""]}), 422)
    assert problem["errors"][0]["field"] == "tags[0]"


# -- compare ---------------------------------------------------------------------------


def test_compare_returns_curves_exponents_and_only_the_differences(client):
    a = submit(client, name="a").json()["id"]
    b = submit(client, name="b", model={**tiny_spec()["model"], "gamma": 0.6}).json()["id"]
    execute_all(client.app, a)
    execute_all(client.app, b)

    resp = client.get("/v1/compare", params={"ids": f"{a},{b},{a}"})

    assert resp.status_code == 200
    doc = resp.json()
    assert doc["ids"] == [a, b]
    assert doc["differences"] == {"name": ["a", "b"], "model.gamma": [1.0, 0.6]}
    for e, exp_id in zip(doc["experiments"], (a, b), strict=True):
        full = client.get(f"/v1/experiments/{exp_id}/results").json()
        assert e["experiment_id"] == exp_id and e["status"] == "succeeded"
        assert e["curves"] == full["curves"] and e["thresholds"] == full["thresholds"]
        assert e["power_law"] == full["power_law"]
        assert e["theory_curve"] == full["theory"]["curve"]
    for name in ("mse", "overlap"):
        for x in ("n", "n_over_n_half"):
            png = client.get(f"/v1/compare/plots/{name}.png", params={"ids": f"{a},{b}", "x": x})
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    svg = client.get(doc["plots"]["mse"]["svg"])
    assert svg.status_code == 200 and b"<svg" in svg.content


def test_compare_scaled_axis_moves_the_curves(client):
    a = submit(client, name="a").json()["id"]
    execute_all(client.app, a)
    plain = client.get("/v1/compare/plots/mse.svg", params={"ids": a}).content
    scaled = client.get("/v1/compare/plots/mse.svg", params={"ids": a, "x": "n_over_n_half"})
    # another x axis: another figure (the same data, x divided by n_half_theory)
    assert scaled.status_code == 200 and scaled.content != plain


def test_compare_errors(client, bob):
    a = submit(client).json()["id"]
    theirs = client.post("/v1/experiments", json=tiny_spec(name="bob"), headers=bob).json()["id"]
    assert_problem(client.get("/v1/compare", params={"ids": f"{a},{theirs}"}), 404)
    assert_problem(client.get("/v1/compare", params={"ids": f"{a},{'0' * 32}"}), 404)
    ids = ",".join(f"{i:032x}" for i in range(13))
    problem = assert_problem(client.get("/v1/compare", params={"ids": ids}), 422)
    assert problem["errors"][0]["field"] == "ids" and "at most 12" in problem["detail"]
    assert (
        assert_problem(client.get("/v1/compare", params={"ids": ","}), 422)["errors"][0]["field"]
        == "ids"
    )
    assert_problem(client.get("/v1/compare"), 422)
    # no points yet, an unknown plot, an unknown axis
    assert_problem(client.get("/v1/compare/plots/mse.png", params={"ids": a}), 404)
    assert_problem(client.get("/v1/compare/plots/cos2.png", params={"ids": a}), 404)
    problem = assert_problem(
        client.get("/v1/compare/plots/mse.png", params={"ids": a, "x": "alpha"}), 422
    )
    assert problem["errors"][0]["field"] == "x"
