"""End to end on the embedded default: ``hsl serve`` as a subprocess (SQLite under
./.hsl/, in-process worker), driven over HTTP and by the ``hsl`` client commands."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.factories import TINY_SPEC
from tests.servers import free_port

from .processes import Processes, base_env, same_numbers, wait_http, wait_status

SLOW_SPEC = {
    "name": "embedded-kill",
    "model": {"d": 30, "q": 2, "epsilon": 0.5, "features": "gaussian"},
    "sweep": {"n_values": [2000, 8000, 30000, 60000, 90000], "seeds": 1, "seed": 1, "n_test": 500},
    "methods": [{"name": "layerwise_spectral"}],
}


@pytest.fixture
def embedded(tmp_path):
    port = free_port()
    procs = Processes(tmp_path, base_env(HSL_LEASE_SECONDS=2, HSL_REAPER_INTERVAL=0.5))
    url = f"http://127.0.0.1:{port}"

    def start():
        procs.start("serve", "serve", "--port", str(port))
        wait_http(f"{url}/readyz", procs=procs)

    start()
    try:
        yield procs, url, start
    finally:
        procs.stop_all()


def test_submit_wait_results_match_hsl_run(embedded, tmp_path):
    procs, url, _ = embedded
    spec = {**TINY_SPEC, "methods": [{"name": "layerwise_spectral"}, {"name": "kernel_rbf"}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    exp_id = procs.hsl("submit", "spec.json", "--url", url).strip()
    procs.hsl("wait", exp_id, "--url", url, "--timeout", "120")
    procs.hsl("results", exp_id, "--url", url, "--out", "remote.json", "--plots", "plots")
    procs.hsl("run", "spec.json", "--out", "local.json", "--quiet")

    remote = json.loads((tmp_path / "remote.json").read_text())
    local = json.loads((tmp_path / "local.json").read_text())
    assert remote["complete"] is True and remote["experiment_id"] == exp_id
    assert remote["spec_hash"] == local["spec_hash"]
    same_numbers(remote, local)
    assert remote["thresholds"] == local["thresholds"]
    assert remote["curves"] == local["curves"]
    assert (tmp_path / ".hsl" / "hsl.db").exists()  # the embedded default's SQLite file
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        f"{n}.{f}" for n in ("mse", "overlap", "cos2", "spectrum") for f in ("png", "svg")
    )
    # the same spec over plain HTTP is the same experiment
    r = httpx.post(f"{url}/v1/experiments", json=spec)
    assert r.status_code == 200 and r.json()["id"] == exp_id
    csv = procs.hsl("results", exp_id, "--url", url, "--csv")
    assert len(csv.strip().splitlines()) == 1 + len(local["points"])


def test_killing_the_service_mid_run_loses_nothing(embedded, tmp_path):
    procs, url, start = embedded
    with httpx.Client(base_url=url, timeout=10) as client:
        exp_id = client.post("/v1/experiments", json=SLOW_SPEC).json()["id"]
        doc = wait_status(
            client,
            exp_id,
            procs=procs,
            timeout=120,
            predicate=lambda d: 1 <= d["progress"]["points_done"] < 5,
        )
    done_before = doc["progress"]["points_done"]
    procs.procs[-1].kill()  # SIGKILL: no orderly shutdown, the lease is left behind
    killed_at = time.monotonic()
    start()
    with httpx.Client(base_url=url, timeout=10) as client:
        doc = wait_status(client, exp_id, procs=procs, timeout=300)
        results = client.get(f"/v1/experiments/{exp_id}/results").json()
    assert doc["status"] == "succeeded", doc
    assert doc["progress"]["points_done"] == doc["progress"]["points_total"] == 5
    ns = sorted(p["n"] for p in results["points"])
    assert ns == SLOW_SPEC["sweep"]["n_values"]  # every point once
    assert done_before >= 1
    assert time.monotonic() - killed_at < 240


def test_backend_torch_on_cpu_runs_and_matches_numpy(embedded):
    import hsl_engine as he

    if not he.torch_available():
        pytest.skip("PyTorch is not installed here")
    procs, url, _ = embedded
    torch_spec = {**TINY_SPEC, "name": "torch", "device": "cpu", "solver": {"backend": "torch"}}
    numpy_spec = {**TINY_SPEC, "name": "numpy", "device": "cpu", "solver": {"backend": "numpy"}}
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = {}
        for spec in (torch_spec, numpy_spec):
            r = client.post("/v1/experiments", json=spec)
            assert r.status_code == 201, r.text
            assert r.json()["queue"] == "cpu"
            ids[spec["name"]] = r.json()["id"]
        results = {}
        for name, exp_id in ids.items():
            doc = wait_status(client, exp_id, procs=procs, timeout=180, alive=True)
            assert doc["status"] == "succeeded", doc
            assert doc["waiting"] is None
            results[name] = client.get(f"/v1/experiments/{exp_id}/results").json()

    def by_key(doc):
        return {(p["method"], p["seed"], p["n"]): p for p in doc["points"]}

    got, want = by_key(results["torch"]), by_key(results["numpy"])
    assert got.keys() == want.keys() and len(got) == 2 * len(TINY_SPEC["sweep"]["alphas"])
    for key, p in got.items():
        q = want[key]
        assert (p["device"], p["backend"]) == ("cpu", "torch"), key
        assert (q["device"], q["backend"]) == ("cpu", "numpy"), key
        # the same sample streams on the CPU: float64 numbers agree to rounding
        assert p["mse"] == pytest.approx(q["mse"], rel=0, abs=1e-6), key
        assert p["cos2"] == pytest.approx(q["cos2"], rel=0, abs=1e-6), key


def test_a_cuda_spec_without_cuda_is_refused_at_submit(embedded):
    import hsl_engine as he

    procs, url, _ = embedded
    device = "cuda" if he.cuda_devices() == 0 else f"cuda:{he.cuda_devices()}"
    with pytest.raises(he.DeviceError) as expected:
        he.resolve_device(device)
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/experiments", json={**TINY_SPEC, "device": device})
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        body = r.json()
        assert body["type"].endswith("/invalid-spec")
        assert body["errors"] == [{"field": "device", "message": str(expected.value)}]
        assert client.get("/v1/experiments").json()["items"] == []  # nothing stored
