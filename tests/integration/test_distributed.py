"""End to end on the distributed stack: real PostgreSQL, a private Redis, ``hsl api``,
two Celery worker processes and the reaper, all started by the test on loopback."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import redis
from sqlalchemy import select

import hsl_engine as he
from hsl import document
from service.db import Run, Worker, make_engine, make_session_factory, utcnow
from tests.factories import TINY_SPEC
from tests.servers import free_port

from .processes import Processes, base_env, same_numbers, wait_http, wait_status, wait_until
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


def _workers(sessions) -> list[Worker]:
    with sessions() as s:
        return list(s.execute(select(Worker).order_by(Worker.id)).scalars())


def test_a_cuda_spec_waits_on_the_gpu_queue_while_only_cpu_workers_run(stack, redis_server):
    procs, client, workers, db_url = stack
    engine = make_engine(db_url)
    sessions = make_session_factory(engine)
    try:
        # the two CPU workers registered themselves once ready, and probed their devices
        rows = wait_until(
            lambda: (
                (rows := _workers(sessions))
                and len(rows) == 2
                and all(w.torch is not None for w in rows)
                and rows
            ),
            timeout=60,
            what="two registered cpu workers",
            procs=procs,
        )
        pids = {w.popen.pid for w in workers}
        for row in rows:
            assert row.kind == "celery" and row.queues == ["cpu"], row.__dict__
            assert row.pid in pids and row.expires_at > utcnow()
            assert row.cuda_devices == he.cuda_devices()

        if he.cuda_devices() == 0:
            # a worker for the gpu queue on this machine would fail every cuda run: it refuses
            gpu = procs.start("worker-gpu", "worker", "--queues", "gpu", "--concurrency", "1")
            assert gpu.popen.wait(120) != 0
            gpu.stopped = True
            log = gpu.log_path.read_text()
            assert "refusing to serve the 'gpu' queue" in log, log
            assert "PyTorch sees no CUDA device" in log, log
            assert len(_workers(sessions)) == 2  # it never registered

        spec = {**TINY_SPEC, "name": "wants-a-gpu", "device": "cuda"}
        r = client.post("/v1/experiments", json=spec)
        assert r.status_code == 201, r.text  # accepted: a GPU worker may come
        doc = r.json()
        cuda_id = doc["id"]
        assert doc["status"] == "queued" and doc["queue"] == "gpu"
        assert doc["waiting"] == "waiting for a GPU worker (none is registered)"

        # the CPU workers do run CPU work meanwhile
        cpu_id = client.post("/v1/experiments", json=TINY_SPEC).json()["id"]
        done = wait_status(client, cpu_id, procs=procs, timeout=180, alive=True)
        assert done["status"] == "succeeded" and done["queue"] == "cpu" and done["waiting"] is None
        time.sleep(3)  # a few reaper sweeps and worker polls more

        doc = client.get(f"/v1/experiments/{cuda_id}").json()
        assert doc["status"] == "queued", doc
        assert doc["progress"]["points_done"] == 0 and doc["started_at"] is None
        assert doc["waiting"] == "waiting for a GPU worker (none is registered)"
        with sessions() as s:
            runs = s.execute(select(Run).where(Run.experiment_id == cuda_id)).scalars().all()
        assert len(runs) == 2
        for run in runs:
            assert (run.queue, run.status, run.attempts, run.lease_owner) == (
                "gpu",
                "queued",
                0,
                None,
            )
            assert run.published_at is not None
        # its messages wait in Redis' gpu list, where no worker listens
        assert redis.Redis.from_url(redis_server.url).llen("gpu") == len(runs)
        for w in workers:
            assert cuda_id not in w.log_path.read_text(), procs.logs()

        # a worker that stops says goodbye: its row goes
        workers[0].stop()
        wait_until(
            lambda: [w.pid for w in _workers(sessions)] == [workers[1].popen.pid],
            timeout=30,
            what="the stopped worker's row to go",
            procs=procs,
        )
    finally:
        engine.dispose()
