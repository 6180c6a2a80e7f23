"""Bearer keys on every /v1 route; the keyless embedded mode on loopback only."""

from __future__ import annotations

import re

import fastapi.routing
import pytest
from fastapi.routing import APIRoute

from service.db import keys

from .api import assert_problem, tiny_spec

DUMMY = {"experiment_id": "0" * 32, "filename": "mse.png", "name": "fig2-cpu"}


def api_routes(app) -> list[tuple[str, set[str]]]:
    """(path, methods) of every APIRoute. Newer FastAPI nests included routers in
    ``app.routes`` and flattens them with ``iter_route_contexts``; older ones list them flat."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if iter_contexts is None:
        return [(r.path, r.methods) for r in app.routes if isinstance(r, APIRoute)]
    return [
        (c.path, c.methods)
        for c in iter_contexts(app.routes)
        if isinstance(c.original_route, APIRoute)
    ]


def v1_calls(app) -> list[tuple[str, str]]:
    """(method, url) of every /v1 operation, path parameters filled with dummies."""
    calls = []
    for path, methods in api_routes(app):
        if path.startswith("/v1"):
            url = re.sub(r"\{(\w+)\}", lambda m: DUMMY.get(m.group(1), "x"), path)
            calls += [(method, url) for method in sorted(methods)]
    return calls


def test_the_route_table_is_what_the_contract_lists(app):
    assert set(v1_calls(app)) >= {
        ("POST", "/v1/experiments"),
        ("GET", "/v1/experiments"),
        ("GET", f"/v1/experiments/{'0' * 32}"),
        ("GET", f"/v1/experiments/{'0' * 32}/results"),
        ("GET", f"/v1/experiments/{'0' * 32}/results.csv"),
        ("GET", f"/v1/experiments/{'0' * 32}/plots/mse.png"),
        ("POST", f"/v1/experiments/{'0' * 32}/cancel"),
        ("DELETE", f"/v1/experiments/{'0' * 32}"),
        ("GET", "/v1/presets"),
        ("GET", "/v1/presets/fig2-cpu"),
    }


@pytest.fixture
def revoked_key(app) -> str:
    with app.state.sessions.begin() as session:
        key = keys.create_key(session, "carol")
    with app.state.sessions.begin() as session:
        assert keys.revoke_key(session, key[:12]) == 1
    return key


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Basic x",
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "Bearer not-a-key",
        "Bearer hsl_" + "A" * 43,  # well-formed, never issued
        "REVOKED",
    ],
)
def test_every_v1_route_needs_a_live_key(client, publisher, revoked_key, authorization):
    if authorization == "REVOKED":
        authorization = f"Bearer {revoked_key}"
    for method, url in v1_calls(client.app):
        request = client.build_request(method, url, json=tiny_spec() if method == "POST" else None)
        del request.headers["authorization"]
        if authorization is not None:
            request.headers["Authorization"] = authorization

        resp = client.send(request)

        assert_problem(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"] == "Bearer", (method, url)
    assert publisher.published == []
    assert client.get("/v1/experiments").json()["items"] == []


def test_a_revoked_key_stops_working_at_once(client, app):
    with app.state.sessions.begin() as session:
        key = keys.create_key(session, "dave")
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/experiments", headers=headers).status_code == 200

    with app.state.sessions.begin() as session:
        keys.revoke_key(session, key[:12])

    assert_problem(client.get("/v1/experiments", headers=headers), 401, "unauthorized")


def test_the_scheme_is_case_insensitive_and_keys_of_one_tenant_share_its_data(client, app):
    exp = client.post("/v1/experiments", json=tiny_spec()).json()["id"]
    with app.state.sessions.begin() as session:
        second = keys.create_key(session, "alice")

    resp = client.get(f"/v1/experiments/{exp}", headers={"Authorization": f"bearer {second}"})

    assert resp.status_code == 200
    assert resp.json()["id"] == exp


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/docs"])
def test_health_and_docs_need_no_key(client, path):
    request = client.build_request("GET", path)
    del request.headers["authorization"]
    assert client.send(request).status_code == 200


def test_keyless_embedded_mode_on_loopback(make_client):
    client = make_client(require_keys=None, host="127.0.0.1", broker_url=None)
    assert "authorization" not in client.headers

    resp = client.post("/v1/experiments", json=tiny_spec())

    assert resp.status_code == 201, resp.text
    exp = resp.json()["id"]
    assert client.get(f"/v1/experiments/{exp}").json()["status"] == "queued"
    assert [e["id"] for e in client.get("/v1/experiments").json()["items"]] == [exp]
    assert client.get("/v1/presets").status_code == 200
    # a key that is sent is still checked
    bad = client.get("/v1/experiments", headers={"Authorization": "Bearer not-a-key"})
    assert_problem(bad, 401, "unauthorized")


@pytest.mark.parametrize(
    "settings",
    [
        {"host": "0.0.0.0"},
        {"host": "::"},
        {"host": "127.0.0.1", "broker_url": "redis://127.0.0.1:1/0"},
        {"host": "127.0.0.1", "require_keys": True},
    ],
    ids=["all-interfaces", "all-interfaces-v6", "with-broker", "required"],
)
def test_keys_are_required_off_loopback_or_with_a_broker(make_client, settings):
    client = make_client(**({"require_keys": None} | settings))

    for method, url in [("GET", "/v1/experiments"), ("POST", "/v1/experiments")]:
        resp = client.request(method, url, json=tiny_spec() if method == "POST" else None)
        assert_problem(resp, 401, "unauthorized")


def test_concurrent_key_creation_for_a_new_tenant_makes_one_tenant(app):
    """Several `hsl keys create --tenant NAME` at once for a tenant that does not exist yet:
    every one gets a key, and one tenant row holds them (the losers read the winner's row)."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import func, select

    from service.db import ApiKey, Tenant, keys

    def mint(_: int) -> str:
        with app.state.sessions.begin() as session:
            return keys.create_key(session, "racing-tenant")

    with ThreadPoolExecutor(8) as pool:
        minted = list(pool.map(mint, range(8)))
    assert len(set(minted)) == 8
    with app.state.sessions() as session:
        tenants = session.execute(
            select(Tenant.id).where(Tenant.name == "racing-tenant")
        ).scalars().all()
        assert len(tenants) == 1
        held = session.execute(
            select(func.count()).select_from(ApiKey).where(ApiKey.tenant_id == tenants[0])
        ).scalar_one()
        assert held == 8
