"""GET /v1/experiments (newest first, filters, cursor pagination) and
GET /v1/experiments/{id}; tenants never see each other's experiments."""

from __future__ import annotations

import base64
import json

import pytest

from .api import assert_problem, tiny_spec
from .conftest import both_databases


def submit_five(client) -> list[str]:
    """Five experiments, oldest first: names a, b, a, b, a (distinct specs by seed)."""
    ids = []
    for i in range(5):
        spec = tiny_spec(name="ab"[i % 2])
        spec["sweep"]["seed"] = i
        resp = client.post("/v1/experiments", json=spec)
        assert resp.status_code == 201
        ids.append(resp.json()["id"])
    return ids


@both_databases
def test_list_is_newest_first_and_filters_by_status_and_name(client):
    ids = submit_five(client)
    assert client.post(f"/v1/experiments/{ids[1]}/cancel").status_code == 200

    resp = client.get("/v1/experiments")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    page = resp.json()
    assert [e["id"] for e in page["items"]] == ids[::-1]
    assert page["next_cursor"] is None
    assert {e["status"] for e in page["items"]} == {"queued", "cancelled"}
    assert page["items"][0] == client.get(f"/v1/experiments/{ids[4]}").json()

    def listed(**params) -> list[str]:
        r = client.get("/v1/experiments", params=params)
        assert r.status_code == 200, r.text
        return [e["id"] for e in r.json()["items"]]

    assert listed(status="cancelled") == [ids[1]]
    assert listed(status="queued") == [ids[4], ids[3], ids[2], ids[0]]
    assert listed(status="succeeded") == []
    assert listed(name="a") == [ids[4], ids[2], ids[0]]
    assert listed(name="b", status="queued") == [ids[3]]
    assert listed(name="nobody") == []


@both_databases
def test_cursor_pagination_visits_each_experiment_once(client):
    ids = submit_five(client)

    seen, pages, cursor = [], 0, None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        resp = client.get("/v1/experiments", params=params)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert len(page["items"]) <= 2
        seen += [e["id"] for e in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10, "pagination does not end"

    assert pages == 3
    assert seen == ids[::-1]

    # the cursor composes with a filter
    first = client.get("/v1/experiments", params={"limit": 1, "name": "a"}).json()
    rest = client.get(
        "/v1/experiments", params={"name": "a", "cursor": first["next_cursor"]}
    ).json()
    assert [e["id"] for e in first["items"] + rest["items"]] == [ids[4], ids[2], ids[0]]
    assert rest["next_cursor"] is None


def _b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "not-a-cursor",
        "!!!",
        _b64([1, 2]),
        _b64({"a": 1}),
        _b64(["2026-01-01T00:00:00+00:00"]),
        _b64("ab"),
        # a timestamp without a zone: the service's cursors always carry UTC
        _b64(["2026-01-01T00:00:00", "abc"]),
    ],
)
def test_invalid_cursor_is_a_400_naming_cursor(client, cursor):
    client.post("/v1/experiments", json=tiny_spec())

    resp = client.get("/v1/experiments", params={"cursor": cursor})

    body = assert_problem(resp, 400, "bad-request")
    assert [e["field"] for e in body["errors"]] == ["cursor"]
    assert "cursor" in body["detail"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1000}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"status": "done"}, "status"),
    ],
)
def test_invalid_list_parameters_are_422(client, params, field):
    body = assert_problem(client.get("/v1/experiments", params=params), 422, "invalid-request")
    assert [e["field"] for e in body["errors"]] == [field]
    assert field in body["detail"]


@both_databases
def test_unknown_and_foreign_ids_answer_the_same_404(client, bob):
    mine = client.post("/v1/experiments", json=tiny_spec()).json()["id"]
    unknown = "0" * 32

    foreign = client.get(f"/v1/experiments/{mine}", headers=bob)
    missing = client.get(f"/v1/experiments/{unknown}", headers=bob)

    a = assert_problem(foreign, 404, "not-found")
    b = assert_problem(missing, 404, "not-found")
    assert set(a) == set(b)
    assert {k: v for k, v in a.items() if k not in ("instance", "detail")} == {
        k: v for k, v in b.items() if k not in ("instance", "detail")
    }
    assert a["detail"].replace(mine, unknown) == b["detail"]
    assert a["instance"].replace(mine, unknown) == b["instance"]
    assert foreign.headers.keys() == missing.headers.keys()
    # the owner still sees it
    assert client.get(f"/v1/experiments/{mine}").status_code == 200


@both_databases
def test_lists_never_show_other_tenants_experiments(client, bob):
    mine = client.post("/v1/experiments", json=tiny_spec(name="mine")).json()["id"]
    theirs = client.post("/v1/experiments", json=tiny_spec(name="theirs"), headers=bob)
    theirs = theirs.json()["id"]

    assert [e["id"] for e in client.get("/v1/experiments").json()["items"]] == [mine]
    assert [e["id"] for e in client.get("/v1/experiments", headers=bob).json()["items"]] == [theirs]
    assert client.get("/v1/experiments", params={"name": "theirs"}).json()["items"] == []


@pytest.mark.parametrize("suffix", ["", "/results", "/results.csv", "/plots/mse.png"])
def test_every_experiment_route_hides_other_tenants(client, bob, suffix):
    mine = client.post("/v1/experiments", json=tiny_spec()).json()["id"]
    assert_problem(client.get(f"/v1/experiments/{mine}{suffix}", headers=bob), 404, "not-found")
