"""The studies resource (issue 13 item 1): a base spec and axes expanded into member
experiments, validated as a whole at submit, deduplicated by spec hash, with status,
progress, cancel, delete, results and figures derived from the members."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

import hsl_engine as he
from service.db import Experiment, Run

from .api import assert_problem, execute, execute_all, runs_of, tiny_spec
from .conftest import both_databases, new_key

GAMMAS = [1.0, 0.6]


def study(**kw):
    body = {"name": "gammas", "base": tiny_spec(), "axes": {"model.gamma": GAMMAS}}
    body.update(kw)
    return body


def submit(client, body=None, **headers):
    resp = client.post("/v1/studies", json=body or study(), headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


def experiments(app) -> int:
    with app.state.sessions() as s:
        return s.execute(select(func.count()).select_from(Experiment)).scalar_one()


@both_databases
def test_submit_expands_the_grid_and_publishes_every_member(client, publisher):
    body = study(axes={"model.gamma": GAMMAS, "sweep.seeds": [1, 2]})

    resp = client.post("/v1/studies", json=body)

    assert resp.status_code == 201, resp.text
    doc = resp.json()
    assert resp.headers["location"] == f"/v1/studies/{doc['id']}" == doc["links"]["self"]
    assert doc["status"] == "queued" and doc["name"] == "gammas"
    # the grid product in the axes' order, the last axis fastest
    assert [m["params"] for m in doc["members"]] == [
        {"model.gamma": 1.0, "sweep.seeds": 1},
        {"model.gamma": 1.0, "sweep.seeds": 2},
        {"model.gamma": 0.6, "sweep.seeds": 1},
        {"model.gamma": 0.6, "sweep.seeds": 2},
    ]
    assert {m["status"] for m in doc["members"]} == {"queued"}
    # 2 alphas per member, one run per seed
    assert doc["progress"] == {
        "points_done": 0,
        "points_total": 2 + 4 + 2 + 4,
        "fraction": 0.0,
        "eta_seconds": None,
        "members": {"queued": 4},
    }
    ids = [m["experiment_id"] for m in doc["members"]]
    assert len(set(ids)) == 4
    runs = [r.id for i in ids for r in runs_of(client.app, i)]
    assert sorted(publisher.published) == sorted(runs) and len(runs) == 6
    for m in doc["members"]:
        exp = client.get(f"/v1/experiments/{m['experiment_id']}").json()
        assert exp["name"] == "t"  # members keep the base spec's name (hash, reuse)
    assert doc["axes"] == {"model.gamma": GAMMAS, "sweep.seeds": [1, 2]}
    assert doc["base"]["model"]["d"] == 12


@both_databases
def test_a_member_already_submitted_is_reused_not_recomputed(client, publisher):
    alone = client.post("/v1/experiments", json=tiny_spec(model={**tiny_spec()["model"]}))
    assert alone.status_code == 201
    execute_all(client.app, alone.json()["id"])  # computed: gamma 1.0 is the default
    published = len(publisher.published)

    doc = submit(client)

    first, second = doc["members"]
    assert first["experiment_id"] == alone.json()["id"]
    assert first["status"] == "succeeded" and first["progress"]["fraction"] == 1.0
    assert second["status"] == "queued"
    new_runs = publisher.published[published:]
    assert sorted(new_runs) == [r.id for r in runs_of(client.app, second["experiment_id"])]
    assert doc["status"] == "running"  # one member done, one queued

    # the same study again: a new study, but every member is reused
    count = experiments(client.app)
    again = submit(client)
    assert again["id"] != doc["id"]
    assert [m["experiment_id"] for m in again["members"]] == [
        m["experiment_id"] for m in doc["members"]
    ]
    assert experiments(client.app) == count
    assert len(publisher.published) == published + len(new_runs)


def test_status_and_progress_follow_the_members(client):
    doc = submit(client)
    first, second = (m["experiment_id"] for m in doc["members"])
    run = runs_of(client.app, first)[0]
    assert execute(client.app, run.id) == "succeeded"

    mid = client.get(f"/v1/studies/{doc['id']}").json()
    assert mid["status"] == "running"
    assert mid["progress"]["points_done"] == 2 and mid["progress"]["points_total"] == 8
    assert mid["progress"]["members"] == {"running": 1, "queued": 1}
    assert mid["started_at"] is not None and mid["finished_at"] is None
    # 6 points left; the queued member borrows the time per sample of the stored ones
    assert mid["progress"]["eta_seconds"] > 0
    assert doc["progress"]["eta_seconds"] is None  # before the first point

    execute_all(client.app, first)
    execute_all(client.app, second)
    done = client.get(f"/v1/studies/{doc['id']}").json()
    assert done["status"] == "succeeded"
    assert done["progress"]["fraction"] == 1.0 and done["progress"]["eta_seconds"] == 0.0
    assert done["finished_at"] is not None


def test_idempotency_key_replays_and_conflicts(client):
    first = client.post("/v1/studies", json=study(), headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201
    count = experiments(client.app)

    replay = client.post("/v1/studies", json=study(), headers={"Idempotency-Key": "k1"})
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    assert experiments(client.app) == count

    other = study(axes={"model.gamma": [0.8]})
    body = assert_problem(
        client.post("/v1/studies", json=other, headers={"Idempotency-Key": "k1"}), 409
    )
    assert body["errors"][0]["field"] == "Idempotency-Key"


@pytest.mark.parametrize(
    ("axes", "field", "words"),
    [
        ({"model.foo": [1]}, "axes.model.foo", "unknown field"),
        ({"model.gamma": [1.0, -1]}, "axes.model.gamma", "value -1"),
        ({"model.d": [12, 10**7]}, "axes.model.d", "value 10000000"),
        ({"model.activation": ["id", "relu"]}, "axes.model.activation", '"relu"'),
        ({"methods.3.ridge": [1.0]}, "axes.methods.3.ridge", "index 3"),
        ({"model.gamma": []}, "axes.model.gamma", "non-empty list"),
        ({"model.gamma": 0.5}, "axes.model.gamma", "non-empty list"),
        ({"model.gamma": [0.5, 0.5]}, "axes.model.gamma", "twice"),
        ({"model..gamma": [0.5]}, "axes.model..gamma", "dotted path"),
        ({"name": ["a", "b"]}, "axes.name", "base spec's name"),
        ({}, "axes", "object"),
    ],
)
def test_invalid_axes_are_422_naming_the_axis_and_value(client, axes, field, words):
    body = assert_problem(client.post("/v1/studies", json=study(axes=axes)), 422, "invalid-spec")
    assert body["title"] == "Invalid study"
    assert body["errors"][0]["field"] == field, body
    assert words in body["errors"][0]["message"], body
    assert experiments(client.app) == 0


def test_a_combination_of_values_names_the_member(client):
    # d = 12 with alpha 8 is fine alone; n = d**alpha beyond 1e9 only at d = 100000
    body = study(
        base=tiny_spec(sweep={"alphas": [1.5, 2.0], "seeds": 1}),
        axes={"model.d": [12, 100_000]},
    )
    problem = assert_problem(client.post("/v1/studies", json=body), 422)
    assert problem["errors"][0]["field"] in ("sweep.alphas", "axes.model.d"), problem
    assert "100000" in problem["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"base": tiny_spec()}, "axes"),
        ({"axes": {"model.gamma": [1.0]}}, "base"),
        ({"base": "no-such-preset", "axes": {"model.gamma": [1.0]}}, "base"),
        ({"base": 3, "axes": {"model.gamma": [1.0]}}, "base"),
        ({"base": tiny_spec(model={"d": 0}), "axes": {"model.gamma": [1.0]}}, "base.model.d"),
        ({"base": tiny_spec(), "axes": {"model.gamma": [1.0]}, "extra": 1}, "extra"),
        ({"base": tiny_spec(), "axes": {"model.gamma": [1.0]}, "name": "a\nb"}, "name"),
        ({"base": tiny_spec(), "axes": {"model.gamma": [1.0]}, "tags": ["a b"]}, "tags[0]"),
    ],
)
def test_invalid_study_bodies_are_422_naming_the_field(client, body, field):
    problem = assert_problem(client.post("/v1/studies", json=body), 422)
    assert problem["errors"][0]["field"] == field, problem


def test_a_preset_name_as_base(client):
    doc = submit(client, {"base": "fig3-cpu", "axes": {"model.gamma": [0.6, 1.0]}})
    # fig3-cpu is an alias: the study is named for the preset it stands for
    assert doc["name"] == he.preset("fig3-cpu").name == "power-law-gaussian-cpu"
    assert doc["base"]["model"]["features"] == "gaussian"
    assert [m["params"]["model.gamma"] for m in doc["members"]] == [0.6, 1.0]


def test_resource_limits_apply_to_every_member_and_to_the_total(make_client):
    client = make_client(max_study_members=3, max_points=10, max_body_bytes=1 << 16)
    client.headers["Authorization"] = f"Bearer {new_key(client.app, 'alice')}"

    too_many = study(axes={"model.gamma": [0.2, 0.4, 0.6, 0.8]})
    body = assert_problem(client.post("/v1/studies", json=too_many), 422, "resource-limit")
    assert "4 members" in body["detail"] and "HSL_MAX_STUDY_MEMBERS" in body["detail"]

    # each member has 2 seeds x 2 alphas = 4 points (fine alone); 3 members make 12 > 10
    three = study(axes={"model.gamma": [0.2, 0.4, 0.6]})
    body = assert_problem(client.post("/v1/studies", json=three), 422, "resource-limit")
    assert body["errors"][0]["field"] == "axes" and "whole study" in body["detail"]
    assert body["estimate"]["points"] == 12

    # one member beyond the limit alone: named by its parameters
    big = study(axes={"sweep.seeds": [2, 8]})
    body = assert_problem(client.post("/v1/studies", json=big), 422, "resource-limit")
    assert "seeds=8" in body["detail"] and body["errors"][0]["field"].startswith("members[")
    assert experiments(client.app) == 0


def test_the_quota_counts_the_new_members(make_client):
    client = make_client(max_active_experiments=3)
    client.headers["Authorization"] = f"Bearer {new_key(client.app, 'alice')}"
    client.post("/v1/experiments", json=tiny_spec(name="other"))
    body = assert_problem(
        client.post("/v1/studies", json=study(axes={"model.gamma": [0.2, 0.4, 0.6]})), 429
    )
    assert body["errors"][0]["field"] == "experiments"
    assert experiments(client.app) == 1  # nothing of the study was stored


@both_databases
def test_cancel_stops_only_the_members_no_one_else_needs(client):
    alone = client.post("/v1/experiments", json=tiny_spec()).json()["id"]  # gamma 1.0
    doc = submit(client, study(axes={"model.gamma": [1.0, 0.6, 0.8]}))
    shared = submit(client, study(name="other", axes={"model.gamma": [0.8]}))
    ids = [m["experiment_id"] for m in doc["members"]]
    assert ids[0] == alone and shared["members"][0]["experiment_id"] == ids[2]

    resp = client.post(f"/v1/studies/{doc['id']}/cancel")

    assert resp.status_code == 200
    after = resp.json()
    assert after["status"] == "cancelled"
    statuses = [m["status"] for m in after["members"]]
    # submitted on its own: kept; only this study's: cancelled; shared with a live study: kept
    assert statuses == ["queued", "cancelled", "queued"]
    assert client.post(f"/v1/studies/{doc['id']}/cancel").json()["members"] == after["members"]
    assert client.get(f"/v1/studies/{shared['id']}").json()["status"] == "queued"


@both_databases
def test_delete_removes_only_the_members_no_one_else_holds(client):
    alone = client.post("/v1/experiments", json=tiny_spec()).json()["id"]
    doc = submit(client, study(axes={"model.gamma": [1.0, 0.6, 0.8]}))
    other = submit(client, study(name="other", axes={"model.gamma": [0.8]}))
    ids = [m["experiment_id"] for m in doc["members"]]
    execute_all(client.app, ids[1])

    resp = client.delete(f"/v1/studies/{doc['id']}")

    assert resp.status_code == 204
    assert_problem(client.get(f"/v1/studies/{doc['id']}"), 404)
    assert client.get(f"/v1/experiments/{alone}").status_code == 200
    assert_problem(client.get(f"/v1/experiments/{ids[1]}"), 404)
    assert runs_of(client.app, ids[1]) == []
    assert client.get(f"/v1/experiments/{ids[2]}").status_code == 200
    assert client.get(f"/v1/studies/{other['id']}").json()["members"][0]["experiment_id"] == ids[2]


def test_a_member_deleted_on_its_own_shows_as_deleted(client):
    doc = submit(client)
    first = doc["members"][0]["experiment_id"]
    assert client.delete(f"/v1/experiments/{first}").status_code == 204
    execute_all(client.app, doc["members"][1]["experiment_id"])

    after = client.get(f"/v1/studies/{doc['id']}").json()

    assert after["members"][0]["experiment_id"] is None
    assert after["members"][0]["status"] == "deleted"
    assert after["status"] == "cancelled"  # not every member succeeded
    results = client.get(f"/v1/studies/{doc['id']}/results").json()
    assert results["members"][0]["status"] == "deleted"
    assert results["members"][0]["power_law"] is None


def test_results_and_figures_across_members(client):
    doc = submit(client)
    assert_problem(client.get(f"/v1/studies/{doc['id']}/plots/mse.png"), 404)
    for m in doc["members"]:
        execute_all(client.app, m["experiment_id"])

    resp = client.get(f"/v1/studies/{doc['id']}/results")

    assert resp.status_code == 200
    res = resp.json()
    assert res["complete"] is True and res["status"] == "succeeded"
    assert [m["params"] for m in res["members"]] == [{"model.gamma": g} for g in GAMMAS]
    for m, gamma in zip(res["members"], GAMMAS, strict=True):
        member = client.get(f"/v1/experiments/{m['experiment_id']}/results").json()
        assert m["thresholds"] == member["thresholds"] and len(m["thresholds"]) == member["d1"]
        assert m["power_law"] == member["power_law"]
        assert m["model"]["gamma"] == gamma and m["feature_dim"] == 78
    for name in ("mse", "exponent", "collapse"):
        png = client.get(res["plots"][name]["png"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG")
        svg = client.get(f"/v1/studies/{doc['id']}/plots/{name}.svg")
        assert svg.headers["content-type"].startswith("image/svg+xml")
        assert b"<svg" in svg.content
    assert_problem(client.get(f"/v1/studies/{doc['id']}/plots/spectrum.png"), 404)
    assert_problem(client.get(f"/v1/studies/{doc['id']}/plots/mse.pdf"), 404)


@both_databases
def test_list_pages_and_filters_by_tag(client):
    made = [
        submit(client, study(name=f"s{i}", tags=["even" if i % 2 == 0 else "odd"]))
        for i in range(5)
    ]

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/studies", params=params).json()
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [s["id"] for s in reversed(made)]
    even = client.get("/v1/studies", params={"tag": "even"}).json()["items"]
    assert [s["name"] for s in even] == ["s4", "s2", "s0"]
    assert (
        client.get("/v1/studies", params={"name": "s3"}).json()["items"][0]["id"] == made[3]["id"]
    )
    assert_problem(client.get("/v1/studies", params={"cursor": "nope"}), 400)
    assert_problem(client.get("/v1/studies", params={"tag": "a b"}), 422)


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("GET", "/results"),
        ("GET", "/plots/mse.png"),
        ("POST", "/cancel"),
        ("DELETE", ""),
        ("PATCH", ""),
    ],
)
def test_other_tenants_studies_are_404(client, bob, method, suffix):
    doc = submit(client)
    kw = {"json": {"notes": "x"}} if method == "PATCH" else {}
    theirs = client.request(method, f"/v1/studies/{doc['id']}{suffix}", headers=bob, **kw)
    unknown = client.request(method, f"/v1/studies/{'0' * 32}{suffix}", **kw)
    assert_problem(theirs, 404)
    assert_problem(unknown, 404)
    assert client.get("/v1/studies", headers=bob).json()["items"] == []
    assert client.get(f"/v1/studies/{doc['id']}").json()["status"] == "queued"


def test_study_presets(client):
    names = [p["name"] for p in client.get("/v1/presets/studies").json()]
    assert names == ["fig3-study", "fig3-study-cpu", "fig5-study", "fig5-study-cpu"]
    fig3 = client.get("/v1/presets/studies/fig3-study-cpu").json()
    assert fig3["study"]["axes"] == {"model.gamma": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]}
    assert fig3["members"] == 6 and fig3["estimate"]["points"] > 0
    # the existing preset routes are unchanged
    assert client.get("/v1/presets/fig3-cpu").json()["name"] == "fig3-cpu"
    assert_problem(client.get("/v1/presets/studies/nope"), 404)
    doc = submit(client, fig3["study"])
    assert len(doc["members"]) == 6
    assert sorted(m["params"]["model.gamma"] for m in doc["members"]) == [
        0.0,
        0.2,
        0.4,
        0.6,
        0.8,
        1.0,
    ]
    with client.app.state.sessions() as s:
        runs = s.execute(select(func.count()).select_from(Run)).scalar_one()
    assert runs == 6 * 2  # 2 seeds each


def test_a_member_submitted_on_its_own_later_survives_the_study(client, publisher):
    doc = submit(client)
    member = doc["members"][1]["experiment_id"]  # gamma 0.6
    published = len(publisher.published)
    resp = client.post(
        "/v1/experiments", json=tiny_spec(model={**tiny_spec()["model"], "gamma": 0.6})
    )
    assert resp.status_code == 200 and resp.json()["id"] == member  # the same experiment
    assert len(publisher.published) == published  # nothing published again

    assert client.post(f"/v1/studies/{doc['id']}/cancel").status_code == 200
    assert client.get(f"/v1/experiments/{member}").json()["status"] == "queued"
    assert client.delete(f"/v1/studies/{doc['id']}").status_code == 204
    assert client.get(f"/v1/experiments/{member}").status_code == 200
    first = doc["members"][0]["experiment_id"]  # only the study's: cancelled, then deleted
    assert_problem(client.get(f"/v1/experiments/{first}"), 404)
