"""Routing to GPU workers: the queue of each device, the ``auto`` rule against the registered
workers (live, none, stale), the GPU memory limit, the device checks of the embedded service
and what a status document says while a run waits for a worker.

The registered workers are real rows in the test's migrated database (service/db/workers.py),
written as a worker's registration writes them; the broker is the recording stand-in.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import update

import hsl_engine as he
from service.config import DEFAULT_GPU_MEMORY_BYTES, Settings
from service.db import Experiment, Worker, utcnow, workers
from service.db.workers import Devices
from service.experiments.repository import queue_for

from .api import assert_problem, runs_of, tiny_spec
from .conftest import both_databases, new_key

# an address nothing listens on: the settings of a distributed API (its publisher is the
# recording stand-in, so no broker is contacted)
BROKER = "redis://127.0.0.1:9/0"
H200 = 141 * 10**9


def spec_of(**top) -> he.ExperimentSpec:
    return he.parse_spec(tiny_spec(**top))


def estimate(spec: he.ExperimentSpec) -> he.ResourceEstimate:
    return he.estimate_resources(spec, sample_budget_bytes=Settings().sample_budget_bytes)


# a spec whose dense solve needs ~92 GiB: more than the 80 GiB default, less than an H200
BIG = {
    "model": {"d": 300, "q": 2, "epsilon": 0.5, "features": "gaussian"},
    "sweep": {"n_values": [1000], "seeds": 1, "seed": 0, "n_test": 500},
    "solver": {"eigensolver": "dense"},
}
ROOMY = {"max_memory_bytes": 1e13, "max_flops": 1e20}  # the host limits out of the way


def register(
    app,
    *,
    queues=("gpu",),
    cuda_devices: int = 1,
    memory: int | None = 80 * 2**30,
    ttl: float = 60.0,
) -> str:
    """A worker row, as `worker.registration.Registration` writes it; returns its id."""
    worker_id = f"host:{uuid.uuid4().hex[:6]}"
    with app.state.sessions.begin() as s:
        workers.register(
            s,
            worker_id=worker_id,
            hostname="host",
            pid=1234,
            kind="celery",
            queues=list(queues),
            engine_version=he.ENGINE_VERSION,
            ttl_seconds=ttl,
            devices=Devices(torch=True, cuda_devices=cuda_devices, cuda_memory_bytes=memory),
        )
    return worker_id


def make_stale(app, worker_id: str, minutes: float = 10.0) -> None:
    """The worker stopped beating ``minutes`` ago (killed without a goodbye)."""
    then = utcnow() - timedelta(minutes=minutes)
    with app.state.sessions.begin() as s:
        s.execute(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(last_seen=then, expires_at=then + timedelta(seconds=90))
        )


@pytest.fixture
def distributed(make_client):
    """A distributed API (a broker URL is set): cuda specs are accepted and wait."""

    def make(**overrides):
        c = make_client(broker_url=BROKER, **overrides)
        c.headers["Authorization"] = f"Bearer {new_key(c.app, 'alice')}"
        return c

    return make


def queues_of(app, exp_id: str) -> set[str]:
    return {r.queue for r in runs_of(app, exp_id)}


# 1. queue_for, unit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "queue"),
    [("cpu", "cpu"), ("cuda", "gpu"), ("cuda:0", "gpu"), ("cuda:3", "gpu"), ("auto", "cpu")],
)
def test_each_device_has_its_queue_without_gpu_workers(device, queue):
    spec = spec_of(device=device)
    assert queue_for(spec) == queue
    assert queue_for(spec, estimate(spec), gpu_route_flops=0.0, gpu_workers=0) == queue


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_explicit_devices_ignore_the_workers_and_the_work(device):
    spec = spec_of(device=device)
    est = estimate(spec)
    expected = "cpu" if device == "cpu" else "gpu"
    for workers_alive in (0, 2):
        for route_flops in (0.0, est.flops * 10):
            got = queue_for(spec, est, gpu_route_flops=route_flops, gpu_workers=workers_alive)
            assert got == expected


def test_auto_goes_to_gpu_only_with_enough_work_a_gpu_worker_and_room():
    spec = spec_of(device="auto")
    est = estimate(spec)
    route = dict(gpu_route_flops=est.flops, gpu_workers=1, gpu_memory_bytes=est.peak_bytes)
    assert queue_for(spec, est, **route) == "gpu"  # at the thresholds exactly
    assert queue_for(spec, est, **{**route, "gpu_route_flops": est.flops * 1.01}) == "cpu"
    assert queue_for(spec, est, **{**route, "gpu_workers": 0}) == "cpu"
    assert queue_for(spec, est, **{**route, "gpu_memory_bytes": est.peak_bytes * 0.99}) == "cpu"
    assert queue_for(spec, None, **route) == "cpu"  # no estimate: no reason to move it
    # NumPy runs on the CPU only
    numpy = spec_of(device="auto", solver={"backend": "numpy"})
    assert queue_for(numpy, estimate(numpy), **route) == "cpu"
    bigger = dataclasses.replace(est, flops=est.flops * 1e6)
    assert queue_for(spec, bigger, **route) == "gpu"


# 2. auto through the API, against the registered workers --------------------------------


@both_databases
def test_auto_spec_follows_the_live_gpu_workers(make_client):
    client = make_client(gpu_route_flops=0.0)
    client.headers["Authorization"] = f"Bearer {new_key(client.app, 'alice')}"
    app, publisher = client.app, client.app.state.publisher

    def submit(seed: int) -> dict:
        r = client.post(
            "/v1/experiments",
            json=tiny_spec(device="auto", sweep={**tiny_spec()["sweep"], "seed": seed}),
        )
        assert r.status_code == 201, r.text
        return r.json()

    none = submit(1)  # no worker registered at all
    assert none["queue"] == "cpu" and queues_of(app, none["id"]) == {"cpu"}

    gpu = register(app)
    live = submit(2)
    assert live["queue"] == "gpu" and queues_of(app, live["id"]) == {"gpu"}
    assert {publisher.queues[r.id] for r in runs_of(app, live["id"])} == {"gpu"}

    make_stale(app, gpu)
    stale = submit(3)
    assert stale["queue"] == "cpu" and queues_of(app, stale["id"]) == {"cpu"}

    register(app, queues=("cpu", "gpu"), cuda_devices=0, memory=None)  # serves gpu, no GPU
    register(app, queues=("cpu",), cuda_devices=1)  # a GPU, but not on the gpu queue
    assert submit(4)["queue"] == "cpu"

    register(app, queues=("gpu",), ttl=60)
    assert submit(5)["queue"] == "gpu"


def test_auto_spec_below_the_work_threshold_stays_on_cpu(make_client):
    client = make_client()  # the default HSL_GPU_ROUTE_FLOPS, far above the tiny spec
    client.headers["Authorization"] = f"Bearer {new_key(client.app, 'alice')}"
    register(client.app)
    assert client.app.state.settings.gpu_route_flops == 1e14
    doc = client.post("/v1/experiments", json=tiny_spec(device="auto")).json()
    assert doc["queue"] == "cpu"


def test_auto_spec_too_big_for_the_gpus_goes_to_cpu_not_refused(make_client):
    client = make_client(gpu_route_flops=0.0, **ROOMY)
    client.headers["Authorization"] = f"Bearer {new_key(client.app, 'alice')}"
    register(client.app, memory=80 * 2**30)
    r = client.post("/v1/experiments", json=tiny_spec(device="auto", **BIG))
    assert r.status_code == 201, r.text
    assert r.json()["queue"] == "cpu"
    register(client.app, memory=H200)  # the smallest GPU still decides
    again = tiny_spec(device="auto", name="again", **BIG)
    assert client.post("/v1/experiments", json=again).json()["queue"] == "cpu"


def test_auto_spec_that_fits_an_h200_goes_to_gpu(make_client):
    client = make_client(gpu_route_flops=1e14, **ROOMY)
    client.headers["Authorization"] = f"Bearer {new_key(client.app, 'alice')}"
    register(client.app, memory=H200)
    assert estimate(spec_of(device="auto", **BIG)).flops > 1e14
    doc = client.post("/v1/experiments", json=tiny_spec(device="auto", **BIG)).json()
    assert doc["queue"] == "gpu"


# 3. the GPU memory limit ----------------------------------------------------------------


def _refused_for_gpu_memory(client, spec, limit: float, source: str) -> dict:
    r = client.post("/v1/experiments", json=spec)
    body = assert_problem(r, 422, "resource-limit")
    [problem] = body["errors"]
    assert problem["field"] == "device"
    assert f"exceeds the GPU memory {limit:.3g} bytes" in problem["message"]
    assert source in problem["message"] and source in body["detail"]
    assert body["limits"] == {"gpu_memory_bytes": limit}
    assert body["estimate"]["peak_bytes"] > limit
    with client.app.state.sessions() as s:
        assert s.query(Experiment).count() == 0  # nothing stored
    assert client.app.state.publisher.published == []
    return body


def test_cuda_spec_over_the_configured_gpu_memory_is_refused(distributed):
    client = distributed(gpu_memory_bytes=1e6)
    register(client.app, memory=H200)  # the setting wins over what workers report
    _refused_for_gpu_memory(client, tiny_spec(device="cuda"), 1e6, "HSL_GPU_MEMORY_BYTES")


def test_cuda_spec_over_the_smallest_live_gpu_is_refused(distributed):
    client = distributed(**ROOMY)
    register(client.app, memory=H200)
    small = register(client.app, memory=40 * 2**30)
    body = _refused_for_gpu_memory(
        client, tiny_spec(device="cuda", **BIG), 40 * 2**30, "the smallest GPU of the 2 live"
    )
    assert "HSL_GPU_MEMORY_BYTES" in body["detail"]
    make_stale(client.app, small)  # only live workers count: the H200 is left
    r = client.post("/v1/experiments", json=tiny_spec(device="cuda:0", **BIG))
    assert r.status_code == 201, r.text
    assert r.json()["queue"] == "gpu"


def test_cuda_spec_is_sized_against_80_gib_when_no_gpu_worker_is_known(distributed):
    client = distributed(**ROOMY)
    assert DEFAULT_GPU_MEMORY_BYTES == 80 * 2**30
    _refused_for_gpu_memory(
        client, tiny_spec(device="cuda", **BIG), DEFAULT_GPU_MEMORY_BYTES, "the default"
    )
    # the host limits still come first, with their own problem
    strict = distributed(max_memory_bytes=1e9)
    body = assert_problem(strict.post("/v1/experiments", json=tiny_spec(device="cuda", **BIG)), 422)
    assert "HSL_MAX_MEMORY_BYTES" in body["detail"]


def test_cuda_spec_that_fits_is_accepted_onto_the_gpu_queue(distributed):
    client = distributed()
    r = client.post("/v1/experiments", json=tiny_spec(device="cuda:1"))
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["queue"] == "gpu"
    assert queues_of(client.app, doc["id"]) == {"gpu"}
    publisher = client.app.state.publisher
    assert {publisher.queues[r.id] for r in runs_of(client.app, doc["id"])} == {"gpu"}


# 4. the embedded service refuses what its own machine cannot run ------------------------


def _device_error(device: str) -> str:
    with pytest.raises(he.DeviceError) as exc:
        he.resolve_device(device)
    return str(exc.value)


@pytest.mark.parametrize("which", ["cuda", "beyond"])
def test_embedded_service_refuses_a_cuda_device_this_machine_lacks(make_client, which):
    if which == "cuda" and he.cuda_devices() > 0:
        pytest.skip("this machine has a CUDA device: 'cuda' is valid here")
    # one index past the devices there are: missing on every machine
    device = "cuda" if which == "cuda" else f"cuda:{he.cuda_devices()}"
    client = make_client(require_keys=False)
    assert client.app.state.settings.embedded
    r = client.post("/v1/experiments", json=tiny_spec(device=device))
    body = assert_problem(r, 422, "invalid-spec")
    assert body["errors"] == [{"field": "device", "message": _device_error(device)}]
    assert body["detail"] == f"device: {_device_error(device)}"
    with client.app.state.sessions() as s:
        assert s.query(Experiment).count() == 0


def test_distributed_service_accepts_a_cuda_device_the_api_machine_lacks(distributed):
    client = distributed()
    device = f"cuda:{he.cuda_devices()}"  # the API's machine lacks it; a GPU worker may not
    r = client.post("/v1/experiments", json=tiny_spec(device=device))
    assert r.status_code == 201, r.text


def test_embedded_service_refuses_backend_torch_without_pytorch(make_client, monkeypatch):
    client = make_client(require_keys=False)
    monkeypatch.setattr(he, "torch_available", lambda: False)
    spec = tiny_spec(device="cpu", solver={"backend": "torch"})
    body = assert_problem(client.post("/v1/experiments", json=spec), 422, "invalid-spec")
    [problem] = body["errors"]
    assert problem["field"] == "solver.backend"
    assert "PyTorch" in problem["message"] and "not installed" in problem["message"]
    # numpy and auto need no PyTorch
    for backend in ("numpy", "auto"):
        ok = tiny_spec(device="cpu", solver={"backend": backend})
        assert client.post("/v1/experiments", json=ok).status_code == 201


def test_embedded_service_accepts_backend_torch_where_pytorch_is_installed(make_client):
    if not he.torch_available():
        pytest.skip("PyTorch is not installed here")
    client = make_client(require_keys=False)
    spec = tiny_spec(device="cpu", solver={"backend": "torch"})
    r = client.post("/v1/experiments", json=spec)
    assert r.status_code == 201, r.text
    assert r.json()["queue"] == "cpu"


# 5. what the status document says while runs wait ---------------------------------------


@both_databases
def test_status_says_a_cuda_spec_waits_for_a_gpu_worker(distributed):
    client = distributed()
    app = client.app
    doc = client.post("/v1/experiments", json=tiny_spec(device="cuda")).json()
    url = f"/v1/experiments/{doc['id']}"
    assert doc["status"] == "queued" and doc["queue"] == "gpu"
    assert doc["waiting"] == "waiting for a GPU worker (none is registered)"

    cpu_only = register(app, queues=("cpu",), cuda_devices=0, memory=None)
    assert client.get(url).json()["waiting"] == "waiting for a GPU worker (none is registered)"

    gpu = register(app)
    assert client.get(url).json()["waiting"] is None

    make_stale(app, gpu, minutes=10)
    waiting = client.get(url).json()["waiting"]
    assert waiting.startswith("waiting for a GPU worker (none is alive; the last one was seen")
    assert client.get("/v1/experiments").json()["items"][0]["waiting"] == waiting

    client.post(f"{url}/cancel")
    assert client.get(url).json()["waiting"] is None
    assert cpu_only


@both_databases
def test_status_says_a_cpu_spec_waits_for_a_cpu_worker(distributed):
    client = distributed()
    doc = client.post("/v1/experiments", json=tiny_spec(device="cpu")).json()
    assert doc["queue"] == "cpu"
    assert doc["waiting"] == "waiting for a worker on the 'cpu' queue (none is registered)"
    register(client.app, queues=("cpu",), cuda_devices=0, memory=None)
    assert client.get(f"/v1/experiments/{doc['id']}").json()["waiting"] is None


def test_status_document_schema_has_queue_and_waiting(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["StatusDocument"]
    assert schema["properties"]["queue"]["type"] == "string"
    assert "queue" in schema["required"]
    assert {"type": "null"} in schema["properties"]["waiting"]["anyOf"]


# 6. the registry ------------------------------------------------------------------------


@both_databases
def test_live_excludes_expired_rows_and_prune_removes_day_old_ones(client):
    app = client.app
    live_id = register(app)
    stale_id = register(app)
    make_stale(app, stale_id, minutes=10)
    old_id = register(app)
    make_stale(app, old_id, minutes=2 * 24 * 60)
    with app.state.sessions.begin() as s:
        assert [w.id for w in workers.live(s)] == [live_id]
        assert [w.id for w in workers.live_gpu_workers(s)] == [live_id]
        assert workers.prune(s) == 1
    with app.state.sessions.begin() as s:
        assert sorted(w.id for w in s.query(Worker)) == sorted([live_id, stale_id])
        assert workers.heartbeat(s, stale_id, ttl_seconds=30)
        assert not workers.heartbeat(s, old_id, ttl_seconds=30)
    with app.state.sessions() as s:
        assert sorted(w.id for w in workers.live(s)) == sorted([live_id, stale_id])
        row = s.get(Worker, live_id)
        assert row.queues == ["gpu"] and row.cuda_memory_bytes == 80 * 2**30
