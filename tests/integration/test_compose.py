"""docker-compose.yml: its structure, and its roles run for real on loopback.

Docker is not needed: `test_compose_roles_run_an_experiment` runs the api, worker and reaper
commands of the compose file as local processes against a fresh PostgreSQL database and a
private Redis, and checks that an experiment submitted over HTTP gives the numbers of a local
in-process run. It skips when PostgreSQL (127.0.0.1:5432) or redis-server is missing, and fails
instead when HSL_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from . import _compose as c

HSL_ROLES = ("api", "worker", "reaper", "worker-gpu")
BACKING = ("postgres", "redis")

SPEC = {
    "name": "compose-smoke",
    "model": {"d": 12, "q": 2, "epsilon": 0.5, "features": "gaussian"},
    "sweep": {"alphas": [1.5, 2.0], "seeds": 2, "seed": 3, "n_test": 500},
    "methods": [{"name": "layerwise_spectral"}],
}
TERMINAL = {"succeeded", "failed", "cancelled"}
COMPARED = ("mse", "cos2", "recovered", "n_train_used")


@pytest.fixture(scope="module")
def compose() -> dict:
    return c.load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# ---------------------------------------------------------------------------------- static


def test_services_are_the_deployment(services):
    assert set(services) == set(HSL_ROLES) | set(BACKING)


def test_every_long_running_service_has_a_healthcheck(services):
    for name, svc in services.items():
        if name.startswith("worker") or name == "reaper":
            continue
        test = svc.get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
    assert services["postgres"]["healthcheck"]["test"][-1] == "pg_isready -U hsl"
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "urllib" in api_check and "http://127.0.0.1:8000/healthz" in api_check


def test_hsl_roles_share_one_image_and_the_env_anchor(compose, services):
    env = compose["x-hsl-env"]
    for name in HSL_ROLES:
        svc = services[name]
        # PyYAML builds an alias as the very same object: identity means the anchor is used.
        assert svc["environment"] is env, f"{name} does not use the x-hsl-env anchor"
        assert svc["restart"] == "unless-stopped", name
        assert svc["entrypoint"] == [], f"{name}: commands start with `hsl`; clear the ENTRYPOINT"
    cpu_roles = [n for n in HSL_ROLES if n != "worker-gpu"]
    for name in cpu_roles:
        assert services[name]["image"] == "hsl:latest", name
        assert services[name]["build"] == ".", name
    # The GPU image is the same Dockerfile with the gpu extra.
    gpu_build = services["worker-gpu"]["build"]
    assert gpu_build["context"] == "." and gpu_build["args"]["HSL_EXTRAS"] == "[gpu]"
    assert env == {
        "HSL_DATABASE_URL": "postgresql+psycopg://hsl:hsl@postgres:5432/hsl",
        "HSL_BROKER_URL": "redis://redis:6379/0",
    }
    pg = services["postgres"]["environment"]
    assert (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]) == ("hsl",) * 3


def test_commands(services):
    assert services["api"]["command"] == (
        'sh -c "hsl db upgrade && hsl api --host 0.0.0.0 --port 8000"'
    )
    assert services["api"]["ports"] == ["8000:8000"]
    assert services["worker"]["command"] == "hsl worker --queues cpu --concurrency 2"
    assert services["reaper"]["command"] == "hsl reaper"
    assert services["worker-gpu"]["command"] == "hsl worker --queues gpu --concurrency 1"
    assert services["redis"]["command"] == "redis-server --appendonly yes"
    # `--scale worker=N` needs no fixed name and no host port on the worker.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]


def test_start_order_follows_health(services):
    api = services["api"]["depends_on"]
    assert api == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    # Workers and the reaper start once the api is healthy, i.e. after the migrations ran.
    for name in ("worker", "reaper", "worker-gpu"):
        assert services[name]["depends_on"] == {"api": {"condition": "service_healthy"}}, name


def test_gpu_worker_is_a_profile_with_an_nvidia_device(services):
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name, svc in services.items():
        if name != "worker-gpu":
            assert "profiles" not in svc, f"{name} must start without a profile"


def test_volumes_are_declared_and_mounted(compose, services):
    assert set(compose["volumes"]) == {"pgdata", "redisdata"}
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "redisdata:/data" in services["redis"]["volumes"]


def test_every_hsl_variable_is_a_setting(compose, services):
    from service.config import Settings

    known = {f"HSL_{name.upper()}" for name in Settings.model_fields}
    used = {k for svc in services.values() for k in (svc.get("environment") or {})}
    used |= set(compose["x-hsl-env"])
    hsl_vars = {k for k in used if k.startswith("HSL_")}
    assert hsl_vars, "the compose file configures no HSL_* variable"
    assert hsl_vars <= known, f"not settings of service.config.Settings: {hsl_vars - known}"
    # The overrides the run-it test adds must be settings too, or they would be silently ignored.
    assert {"HSL_LEASE_SECONDS", "HSL_REAPER_INTERVAL"} <= known


def test_dockerfile_and_dockerignore():
    dockerfile = (c.ROOT / "Dockerfile").read_text().splitlines()
    instructions = [ln.strip() for ln in dockerfile if ln.strip() and not ln.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert 'ENTRYPOINT ["hsl"]' in instructions
    users = [ln.split()[1] for ln in instructions if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert any("pip install" in ln for ln in instructions)
    ignored = set((c.ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".hsl", "out", ".git", "__pycache__", "reports"} <= ignored


def test_local_rewrite_points_compose_urls_at_loopback(services):
    ep = c.Endpoints(database="hsl_compose_x", redis_port=6390, api_port=18000)
    env = c.local_environment(services["api"], ep)
    assert env == {
        "HSL_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/hsl_compose_x",
        "HSL_BROKER_URL": "redis://127.0.0.1:6390/0",
    }
    assert c.local_command(services["api"], ep) == [
        "sh",
        "-c",
        "hsl db upgrade && hsl api --host 127.0.0.1 --port 18000",
    ]
    assert c.local_command(services["reaper"], ep) == ["hsl", "reaper"]


# ---------------------------------------------------------------------------------- run it


def _wait_http_ok(client, url: str, groups: c.ProcessGroups, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        groups.assert_alive()
        try:
            r = client.get(url)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:300]}"
        except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, reset, ...
            last = repr(exc)
        time.sleep(0.5)
    raise AssertionError(f"{url} not 200 within {timeout:.0f} s; last: {last}")


def _wait_redis(port: int, groups: c.ProcessGroups, timeout: float = 20.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    try:
        while True:
            groups.assert_alive()
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
    finally:
        client.close()


def _local_results() -> dict:
    import hsl_engine as he
    from hsl import document

    res = he.run_experiment(he.parse_spec(SPEC))
    return document.results_document(res.spec, res.points)


def test_compose_roles_run_an_experiment(services, tmp_path: Path):
    c.require_services()
    groups = c.ProcessGroups(tmp_path)
    with c.fresh_database() as db:
        ep = c.Endpoints(database=db, redis_port=c.free_port(), api_port=c.free_port())
        try:
            _run_experiment_through_roles(services, ep, groups, tmp_path)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n\nlogs:\n{groups.tails()}") from exc
        finally:
            groups.stop_all()


def _run_experiment_through_roles(services, ep, groups, tmp_path) -> None:
    import httpx

    redis_argv = ["redis-server", "--port", str(ep.redis_port), "--bind", "127.0.0.1"]
    redis_argv += ["--save", "", "--appendonly", "no"]
    groups.start("redis", redis_argv, c.base_environment({}))
    _wait_redis(ep.redis_port, groups)

    overrides = {"HSL_LEASE_SECONDS": "5", "HSL_REAPER_INTERVAL": "1"}
    envs = {
        role: c.base_environment({**c.local_environment(services[role], ep), **overrides})
        for role in c.ROLES
    }

    # The distributed api requires keys: migrate, then make one, as an operator would.
    c.run_once(["hsl", "db", "upgrade"], envs["api"], tmp_path)
    out = c.run_once(["hsl", "keys", "create", "--tenant", "compose"], envs["api"], tmp_path)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines, "hsl keys create printed nothing"
    key = lines[-1].split()[-1]

    for role in c.ROLES:
        groups.start(role, c.local_command(services[role], ep), envs[role])

    base = f"http://127.0.0.1:{ep.api_port}"
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, timeout=10.0) as client:
        _wait_http_ok(client, "/healthz", groups, timeout=60)
        _wait_http_ok(client, "/readyz", groups, timeout=30)

        r = client.post("/v1/experiments", json=SPEC, headers=auth)
        assert r.status_code == 201, f"POST /v1/experiments: {r.status_code} {r.text}"
        exp_id = r.json()["id"]

        deadline = time.monotonic() + 180
        while True:
            groups.assert_alive()
            r = client.get(f"/v1/experiments/{exp_id}", headers=auth)
            assert r.status_code == 200, f"GET status: {r.status_code} {r.text}"
            status = r.json()
            if status["status"] in TERMINAL:
                break
            assert time.monotonic() < deadline, f"not finished within 180 s: {status}"
            time.sleep(0.5)
        assert status["status"] == "succeeded", f"experiment ended {status}"

        r = client.get(f"/v1/experiments/{exp_id}/results", headers=auth)
        assert r.status_code == 200, f"GET results: {r.status_code} {r.text}"
        remote = r.json()

    n_expected = len(SPEC["methods"]) * SPEC["sweep"]["seeds"] * len(SPEC["sweep"]["alphas"])
    progress = status["progress"]
    assert remote["complete"] is True
    assert progress["points_total"] == n_expected, progress
    assert progress["points_done"] == n_expected, progress
    assert len(remote["points"]) == n_expected

    local = _local_results()
    assert remote["spec_hash"] == local["spec_hash"] == status["spec_hash"]
    by_key = {(p["method"], p["seed"], p["n"]): p for p in local["points"]}
    remote_keys = [(p["method"], p["seed"], p["n"]) for p in remote["points"]]
    assert sorted(remote_keys) == sorted(by_key), "the service ran other points than the engine"
    for p in remote["points"]:
        mine = by_key[(p["method"], p["seed"], p["n"])]
        for name in COMPARED:
            # Same spec, engine, device and dtype: identical numbers (shared/API.md), so ==.
            assert p[name] == mine[name], (
                f"{name} differs at method={p['method']} seed={p['seed']} n={p['n']}: "
                f"service {p[name]!r} vs local {mine[name]!r}"
            )
