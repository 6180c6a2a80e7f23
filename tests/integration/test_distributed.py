"""End to end on the distributed stack: real PostgreSQL, a private Redis, ``hsl api``,
two Celery worker processes and the reaper, all started by the test on loopback."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from sqlalchemy import select

import hsl_engine as he
from hsl import document
from service.db import Run, make_engine, make_session_factory
from tests.factories import TINY_SPEC
from tests.servers import free_port

from .processes import Processes, base_env, same_numbers, wait_http, wait_status
from .test_embedded import SLOW_SPEC


@pytest.fixture
def stack(tmp_path, postgres_url, redis_server):
    port = free_port()
    procs = Processes(
        tmp_path,
        base_env(
            HSL_DATABASE_URL=postgres_url,
            HSL_BROKER_URL=redis_server.url,
            HSL_LEASE_SECONDS=3,
            HSL_REAPER_INTERVAL=1,
            HSL_THREADS=1,
        ),
    )
    procs.hsl("db", "upgrade")
    key = procs.hsl("keys", "create", "--tenant", "lab").split()[-1]
    procs.start("api", "api", "--port", str(port))
    workers = [procs.start(f"worker{i}", "worker", "--concurrency", "1") for i in (1, 2)]
    procs.start("reaper", "reaper")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", procs=procs)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    try:
        yield procs, client, workers, postgres_url
    finally:
        client.close()
        procs.stop_all()


def _local(spec) -> dict:
    res = he.run_experiment(he.parse_spec(spec))
    return document.results_document(res.spec, res.points)


def test_two_workers_share_the_runs_and_match_hsl_run(stack):
    procs, client, workers, _ = stack
    spec = {
        **TINY_SPEC,
        "sweep": {**TINY_SPEC["sweep"], "seeds": 4},
        "methods": [{"name": "layerwise_spectral"}, {"name": "kernel_poly"}],
    }
    r = client.post("/v1/experiments", json=spec)
    assert r.status_code == 201, r.text
    exp_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/experiments/{exp_id}"
    doc = wait_status(client, exp_id, procs=procs, timeout=240)
    assert doc["status"] == "succeeded", doc
    remote = client.get(f"/v1/experiments/{exp_id}/results").json()
    assert remote["complete"] is True
    same_numbers(remote, _local(spec))
    claimed = [w.log_path.read_text().count("claimed by") for w in workers]
    assert all(c >= 1 for c in claimed), f"runs per worker: {claimed}\n{procs.logs()}"
    assert sum(claimed) == 8


def test_killing_a_worker_mid_run_loses_nothing(stack):
    procs, client, workers, db_url = stack
    spec = {**SLOW_SPEC, "name": "distributed-kill", "sweep": {**SLOW_SPEC["sweep"], "seeds": 2}}
    exp_id = client.post("/v1/experiments", json=spec).json()["id"]
    wait_status(
        client,
        exp_id,
        procs=procs,
        timeout=120,
        predicate=lambda d: 1 <= d["progress"]["points_done"] < 8,
    )

    engine = make_engine(db_url)
    sessions = make_session_factory(engine)
    with sessions() as s:
        owners = [
            o
            for o in s.execute(
                select(Run.lease_owner).where(Run.experiment_id == exp_id, Run.status == "running")
            ).scalars()
            if o
        ]
    assert owners, procs.logs()
    pid = int(owners[0].split(":")[1])  # host:pid:nonce of the pool process
    victim = next(w for w in workers if os.getpgid(pid) == w.popen.pid)
    victim.kill(signal.SIGKILL)  # the worker and its pool child, mid-run
    killed = time.monotonic()
    procs.start("worker3", "worker", "--concurrency", "1")

    doc = wait_status(client, exp_id, procs=procs, timeout=300)
    recovered = time.monotonic() - killed
    assert doc["status"] == "succeeded", f"{doc}\n{procs.logs()}"
    remote = client.get(f"/v1/experiments/{exp_id}/results").json()
    # each point once; the resumed run's numbers agree to the eigensolver's tolerance
    same_numbers(remote, _local(spec), rel=1e-6)
    with sessions() as s:
        runs = s.execute(select(Run).where(Run.experiment_id == exp_id)).scalars().all()
    assert max(r.attempts for r in runs) == 2  # the killed run was claimed again, once
    engine.dispose()
    assert recovered < 200
