"""Bad submissions answer with a problem+json 4xx naming the trouble, never a 5xx, and
store and publish nothing."""

from __future__ import annotations

import json

import pytest

from .api import assert_problem, tiny_spec


@pytest.fixture(autouse=True)
def nothing_stored(client, publisher):
    yield
    assert client.get("/v1/experiments").json()["items"] == []
    assert publisher.published == []


def post_raw(client, content, content_type="application/json", **headers):
    return client.post(
        "/v1/experiments", content=content, headers={"Content-Type": content_type, **headers}
    )


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ((), "status"),  # mass assignment: the status is the service's to set
        ((), "tenant"),
        ((), "id"),
        (("model",), "dimension"),
        (("sweep",), "n_train"),
    ],
)
def test_unknown_fields_are_rejected_by_name(client, where, field):
    spec = tiny_spec()
    target = spec
    for key in where:
        target = target[key]
    target[field] = "succeeded"

    body = assert_problem(client.post("/v1/experiments", json=spec), 422, "invalid-spec")

    name = ".".join((*where, field))
    assert {"field": name, "message": "unknown field"} in body["errors"]
    assert name in body["detail"]


def test_nan_literal_is_rejected(client):
    raw = json.dumps(tiny_spec()).replace('"epsilon": 0.5', '"epsilon": NaN')
    assert "NaN" in raw

    body = assert_problem(post_raw(client, raw), 422, "invalid-spec")

    assert [e["field"] for e in body["errors"]] == ["model.epsilon"]
    assert "finite" in body["errors"][0]["message"]


def test_infinity_literal_is_rejected(client):
    raw = json.dumps(tiny_spec()).replace('"n_test": 500', '"n_test": Infinity')

    body = assert_problem(post_raw(client, raw), 422, "invalid-spec")

    assert [e["field"] for e in body["errors"]] == ["sweep.n_test"]


@pytest.mark.parametrize(
    ("section", "key", "value", "field"),
    [
        ("sweep", "seeds", "many", "sweep.seeds"),
        ("model", "q", 7, "model.q"),
        ("model", "features", "fourier", "model.features"),
        ("model", "d", [12], "model.d"),
    ],
)
def test_wrong_types_and_values_name_the_field(client, section, key, value, field):
    spec = tiny_spec()
    spec[section][key] = value

    body = assert_problem(client.post("/v1/experiments", json=spec), 422, "invalid-spec")

    assert field in [e["field"] for e in body["errors"]]
    assert all(e["message"] for e in body["errors"])


@pytest.mark.parametrize("raw", ["[]", '"fig2-cpu"', "3", "null", '{"methods": []}'])
def test_a_body_that_is_not_a_spec_object_is_rejected(client, raw):
    body = assert_problem(post_raw(client, raw), 422, "invalid-spec")
    assert body["errors"]


@pytest.mark.parametrize(
    "raw",
    [b'{"name": "t", "model": {"d": 12', b"", b"{'name': 't'}", b"\xff\xfe{}"],
    ids=["truncated", "empty", "single-quotes", "not-utf8"],
)
def test_malformed_json_is_400(client, raw):
    body = assert_problem(post_raw(client, raw), 400, "bad-request")
    assert body["errors"] == [{"field": "body", "message": "invalid JSON"}]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_wrong_content_type_is_415(client, content_type):
    body = assert_problem(
        post_raw(client, json.dumps(tiny_spec()), content_type), 415, "unsupported-media-type"
    )
    assert content_type in body["detail"]


def test_missing_content_type_is_415(client):
    request = client.build_request("POST", "/v1/experiments", content=json.dumps(tiny_spec()))
    assert "content-type" not in request.headers
    assert_problem(client.send(request), 415, "unsupported-media-type")


def test_json_with_charset_is_accepted(client, publisher):
    resp = post_raw(client, json.dumps(tiny_spec()), "application/json; charset=utf-8")
    assert resp.status_code == 201
    # undo for the autouse check: this one is meant to be stored
    client.delete(resp.headers["location"])
    publisher.published.clear()


def oversized() -> bytes:
    spec = tiny_spec(name="x" * 3000)  # the app's limit is 2048 bytes
    return json.dumps(spec).encode()


def test_body_over_the_limit_is_413(client):
    body = assert_problem(post_raw(client, oversized()), 413, "too-large")
    assert "2048" in body["detail"]


def test_chunked_body_over_the_limit_is_413(client):
    raw = oversized()

    def chunks():
        for i in range(0, len(raw), 500):
            yield raw[i : i + 500]

    request = client.build_request(
        "POST", "/v1/experiments", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"

    assert_problem(client.send(request), 413, "too-large")


def test_lying_content_length_over_the_limit_is_413(client):
    request = client.build_request(
        "POST", "/v1/experiments", content=b"{}", headers={"Content-Type": "application/json"}
    )
    request.headers["Content-Length"] = "999999"
    assert_problem(client.send(request), 413, "too-large")


def test_spec_beyond_the_memory_and_work_limits_is_422(client):
    spec = tiny_spec(
        model={"d": 100000, "q": 3, "epsilon": 0.5}, sweep={"n_values": [100], "seeds": 1}
    )

    body = assert_problem(client.post("/v1/experiments", json=spec), 422, "resource-limit")

    limits = client.app.state.settings
    assert body["estimate"]["peak_bytes"] > limits.max_memory_bytes
    assert body["estimate"]["flops"] > limits.max_flops
    assert body["limits"]["max_memory_bytes"] == limits.max_memory_bytes
    assert body["limits"]["max_flops"] == limits.max_flops
    assert "HSL_MAX_MEMORY_BYTES" in body["detail"] and "HSL_MAX_FLOPS" in body["detail"]
    assert [e["field"] for e in body["errors"]] == ["spec", "spec"]
    assert "memory" in body["errors"][0]["message"]
    assert "flops" in body["errors"][1]["message"]


@pytest.mark.parametrize(
    ("setting", "value", "env", "estimate"),
    [
        ("max_memory_bytes", 1e6, "HSL_MAX_MEMORY_BYTES", "peak_bytes"),
        ("max_flops", 1e3, "HSL_MAX_FLOPS", "flops"),
        ("max_points", 3, "HSL_MAX_POINTS", "points"),
    ],
)
def test_lower_deployment_limits_refuse_the_tiny_spec(make_client, setting, value, env, estimate):
    client = make_client(require_keys=False, **{setting: value})

    resp = client.post("/v1/experiments", json=tiny_spec())

    body = assert_problem(resp, 422, "resource-limit")
    assert env in body["detail"]
    assert body["limits"][setting] == value
    assert body["estimate"][estimate] > value
    assert len(body["errors"]) == 1
    assert set(body["errors"][0]) == {"field", "message"}
    assert client.get("/v1/experiments").json()["items"] == []


def test_over_long_idempotency_key_is_422(client):
    resp = client.post("/v1/experiments", json=tiny_spec(), headers={"Idempotency-Key": "k" * 201})
    body = assert_problem(resp, 422, "invalid-request")
    assert body["errors"][0]["field"] == "idempotency-key"
