"""docker-compose.yml: its structure, and its roles run for real on loopback.

Docker is not needed: `test_compose_roles_run_an_experiment` runs the api, worker and reaper
commands of the compose file as local processes against a fresh PostgreSQL database and a
private Redis (the `postgres_url` and `redis_server` fixtures of tests/servers.py), and checks
that an experiment submitted over HTTP gives the numbers of a local in-process run. It skips
when PostgreSQL (HSL_TEST_PG) or redis-server is missing, and fails instead when
HSL_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port

from . import _compose as c
from .processes import Processes, base_env, same_numbers, wait_http, wait_status

HSL_ROLES = ("api", "worker", "reaper", "worker-gpu")
BACKING = ("postgres", "redis")

SPEC = {
    "name": "compose-smoke",
    "model": {"d": 12, "q": 2, "epsilon": 0.5, "features": "gaussian"},
    "sweep": {"alphas": [1.5, 2.0], "seeds": 2, "seed": 3, "n_test": 500},
    "methods": [{"name": "layerwise_spectral"}],
}


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
    assert (
        services["redis"]["command"]
        == "redis-server --appendonly yes --maxmemory-policy noeviction"
    )
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


def _cuda_check() -> str:
    """The shell of the Dockerfile's RUN that refuses a gpu image without a CUDA PyTorch."""
    text = (c.ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = re.search(r'case "\$\{HSL_EXTRAS\}" in .*? esac', text)
    assert found, "the Dockerfile does not check the gpu image's PyTorch"
    return found.group(0)


def test_gpu_image_build_requires_a_cuda_build_of_pytorch():
    torch = pytest.importorskip("torch")
    script = _cuda_check()
    assert "torch.version.cuda" in script
    env = base_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    plain = subprocess.run(["sh", "-c", script], env={**env, "HSL_EXTRAS": ""})
    assert plain.returncode == 0  # the CPU image does not ask
    gpu = subprocess.run(
        ["sh", "-c", script], env={**env, "HSL_EXTRAS": "[gpu]"}, capture_output=True, text=True
    )
    if torch.version.cuda:
        assert gpu.returncode == 0, gpu.stderr
    else:  # this machine's PyTorch is the CPU build: such an image would not be built
        assert gpu.returncode != 0
        assert f"PyTorch {torch.__version__} is not a CUDA build" in gpu.stderr


def test_gpu_worker_command_refuses_to_start_without_cuda(
    services, tmp_path: Path, postgres_url, redis_server
):
    import hsl_engine as he

    if he.cuda_devices() > 0:
        pytest.skip("this machine has a CUDA device: the gpu worker would start")
    ep = c.Endpoints(postgres_url, redis_server.url, api_port=free_port())
    svc = services["worker-gpu"]
    procs = Processes(tmp_path, base_env())
    try:
        gpu = procs.spawn("worker-gpu", c.local_command(svc, ep), env=c.local_environment(svc, ep))
        assert gpu.popen.wait(120) != 0
        log = gpu.log_path.read_text()
    finally:
        procs.stop_all()
    assert "refusing to serve the 'gpu' queue: PyTorch sees no CUDA device on this machine" in log
    assert "leave 'gpu' out of --queues" in log


def test_local_rewrite_points_compose_urls_at_loopback(services):
    # The compose file's driver and Redis database number stay; the location is the test's.
    ep = c.Endpoints(
        database_url="postgresql://postgres@127.0.0.1:5432/hsl_compose_x",
        redis_url="redis://127.0.0.1:6390",
        api_port=18000,
    )
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


def _local_results() -> dict:
    import hsl_engine as he
    from hsl import document

    res = he.run_experiment(he.parse_spec(SPEC))
    return document.results_document(res.spec, res.points)


def test_compose_roles_run_an_experiment(services, tmp_path: Path, postgres_url, redis_server):
    ep = c.Endpoints(postgres_url, redis_server.url, api_port=free_port())
    # Short leases and a quick reaper, as settings the roles read (checked to exist above).
    procs = Processes(tmp_path, base_env(HSL_LEASE_SECONDS=5, HSL_REAPER_INTERVAL=1))
    try:
        _run_experiment_through_roles(services, ep, procs)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n\nlogs:\n{procs.logs()}") from exc
    finally:
        procs.stop_all()


def _run_experiment_through_roles(services, ep: c.Endpoints, procs: Processes) -> None:
    envs = {role: c.local_environment(services[role], ep) for role in c.ROLES}

    # The distributed api requires keys: migrate, then make one, as an operator would.
    procs.hsl("db", "upgrade", env=envs["api"])
    out = procs.hsl("keys", "create", "--tenant", "compose", env=envs["api"])
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines, "hsl keys create printed nothing"
    key = lines[-1].split()[-1]

    for role in c.ROLES:
        procs.spawn(role, c.local_command(services[role], ep), env=envs[role])

    base = f"http://127.0.0.1:{ep.api_port}"
    wait_http(f"{base}/healthz", timeout=60, procs=procs, alive=True)
    wait_http(f"{base}/readyz", timeout=30, procs=procs, alive=True)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=auth, timeout=10.0) as client:
        r = client.post("/v1/experiments", json=SPEC)
        assert r.status_code == 201, f"POST /v1/experiments: {r.status_code} {r.text}"
        exp_id = r.json()["id"]

        status = wait_status(client, exp_id, timeout=180, procs=procs, alive=True)
        assert status["status"] == "succeeded", f"experiment ended {status}"

        r = client.get(f"/v1/experiments/{exp_id}/results")
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
    # The same points, each once, with identical numbers: same spec, engine, device and dtype
    # (docs/reference.md), so ==.
    same_numbers(remote, local)
