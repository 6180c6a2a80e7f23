"""``hsl.Client`` and ``hsl.Results`` against a real ``hsl serve`` (a subprocess: SQLite,
in-process worker), and the same results object for a local ``hsl run``."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

import hsl
from hsl import Client, Results
from hsl.results import MissingDependency
from tests.factories import TINY_SPEC
from tests.integration.processes import Processes, base_env, wait_http
from tests.servers import free_port

pd = pytest.importorskip("pandas")

SLOW = {
    "name": "slow",
    "model": {"d": 30, "q": 2, "epsilon": 0.5, "features": "gaussian"},
    "sweep": {
        "n_values": [2000, 30000, 60000, 90000, 120000],
        "seeds": 1,
        "seed": 1,
        "n_test": 500,
    },
    "methods": [{"name": "layerwise_spectral"}],
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    port = free_port()
    procs = Processes(folder, base_env(HSL_EVENTS_POLL_SECONDS=0.1))
    procs.start("serve", "serve", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/readyz", procs=procs, alive=True)
    try:
        yield url, procs, folder
    finally:
        procs.stop_all()


def test_the_package_exports_the_client_and_its_errors():
    assert hsl.Client is Client and hsl.Results is Results
    for name in (
        "HslError",
        "NotFound",
        "ValidationError",
        "Unauthorized",
        "ServiceUnavailable",
        "NotAnHslService",
        "WaitTimeout",
    ):
        assert issubclass(getattr(hsl, name), hsl.HslError)
    assert not issubclass(hsl.HslError, SystemExit)


def test_submit_wait_results_and_frames(served, tmp_path):
    url, _, _ = served
    points, statuses = [], []
    with Client(url) as c:
        exp = c.submit(TINY_SPEC, name="lib-tiny")
        assert exp["status"] in ("queued", "running", "succeeded")
        doc = c.wait(exp["id"], on_point=points.append, on_status=statuses.append)
        assert doc["status"] == "succeeded"
        res = c.results(exp["id"])
        listed = c.list(name="lib-tiny")
        again = c.submit(TINY_SPEC, name="lib-tiny")  # same spec: the same experiment
    total = doc["progress"]["points_total"]
    assert statuses[-1]["status"] == "succeeded"
    # every point arrived once through the stream (unless it had finished before the wait)
    key = lambda p: (p["method"], p["seed"], p["n"])  # noqa: E731
    assert len(points) == len({key(p) for p in points})
    assert {key(p) for p in points} <= {key(p) for p in res.points}
    assert res.complete and res.experiment_id == exp["id"] and len(res.points) == total
    assert [d["id"] for d in listed] == [exp["id"]] and again["id"] == exp["id"]

    frame = res.points_frame()
    assert len(frame) == total and {"mse", "cos2_1", "engine_version"} <= set(frame.columns)
    from_csv = pd.read_csv(io.StringIO(res.to_csv()))
    pd.testing.assert_frame_equal(
        frame[list(from_csv.columns)].reset_index(drop=True), from_csv, check_dtype=False
    )
    curves = res.curves_frame()
    assert set(curves["method"]) == {"layerwise_spectral"}
    assert len(curves) == len(res.curves["layerwise_spectral"])
    assert len(res.thresholds_frame()) == len(res.thresholds)
    parquet = res.to_parquet(tmp_path / "points.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), frame)


def test_the_same_results_object_for_a_local_run(served, tmp_path):
    url, _, _ = served
    spec = {**TINY_SPEC, "name": "lib-local"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with Client(url) as c:
        exp = c.submit(tmp_path / "spec.json")
        assert c.wait(exp["id"])["status"] == "succeeded"
        remote = c.results(exp["id"])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hsl.cli",
            "run",
            str(tmp_path / "spec.json"),
            "--out",
            str(tmp_path / "local.json"),
            "--quiet",
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    local = Results.from_file(tmp_path / "local.json")
    assert local.experiment_id is None and local.spec_hash == remote.spec_hash
    numbers = ["method", "seed", "n", "alpha", "mse", "overlap", "recovered", "n_train_used"]
    a = remote.points_frame().sort_values(["method", "seed", "n"]).reset_index(drop=True)
    b = local.points_frame().sort_values(["method", "seed", "n"]).reset_index(drop=True)
    cos2 = [col for col in a.columns if col.startswith("cos2_")]
    pd.testing.assert_frame_equal(a[numbers + cos2], b[numbers + cos2])
    assert local.thresholds == remote.thresholds
    assert "power law" in local.summary()


def test_typed_errors_carry_the_problem(served):
    url, _, _ = served
    with Client(url) as c:
        with pytest.raises(hsl.NotFound) as missing:
            c.get("0" * 32)
        with pytest.raises(hsl.ValidationError) as invalid:
            c.submit({**TINY_SPEC, "model": {**TINY_SPEC["model"], "d": 1}})
        with pytest.raises(hsl.NotFound):
            c.submit("no-such-preset")
    assert missing.value.status == 404 and missing.value.exit_code == 1
    assert invalid.value.status == 422 and invalid.value.exit_code == 2
    assert [e["field"] for e in invalid.value.errors] == ["model.d"]
    # the keyless local service still checks a key that is sent
    with Client(url, "hsl_not-a-real-key") as c, pytest.raises(hsl.Unauthorized) as denied:
        c.get("0" * 32)
    assert "HSL_API_KEY" in str(denied.value)


def test_wait_timeout_cancel_and_delete(served):
    url, _, _ = served
    with Client(url) as c:
        exp = c.submit(SLOW, name="lib-cancel")
        with pytest.raises(hsl.WaitTimeout):
            c.wait(exp["id"], timeout=0.5)
        assert c.cancel(exp["id"])["id"] == exp["id"]
        assert c.wait(exp["id"])["status"] == "cancelled"
        c.delete(exp["id"])
        with pytest.raises(hsl.NotFound):
            c.get(exp["id"])
        with pytest.raises(hsl.NotFound):
            c.delete(exp["id"])  # never retried, so a real miss


def test_wait_falls_back_to_polling_without_the_stream(served):
    url, _, _ = served
    with Client(url) as c:
        exp = c.submit(
            {**TINY_SPEC, "name": "lib-poll", "sweep": {**TINY_SPEC["sweep"], "seed": 11}}
        )
        seen = []
        doc = c.wait(exp["id"], stream=False, poll_interval=0.1, on_status=seen.append)
    assert doc["status"] == "succeeded" and seen[-1] == doc


def test_tables_without_pandas_or_pyarrow_say_which_extra(monkeypatch, tmp_path):
    doc = {"spec": {"name": "x"}, "points": [], "d1": 0}
    res = Results(doc)
    assert res.to_csv().startswith("method,seed,n")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(MissingDependency, match=r"hsl\[parquet\]"):
        res.to_parquet(tmp_path / "x.parquet")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingDependency, match=r"hsl\[pandas\]"):
        res.points_frame()
    with pytest.raises(ValueError, match="not an hsl results document"):
        Results({"points": []})


def test_the_list_cancel_and_delete_commands(served, capsys):
    from hsl.cli import main

    url, _, _ = served
    with Client(url) as c:
        exp = c.submit(SLOW, name="cli-list")
    assert main(["list", "--name", "cli-list", "--url", url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["id", "status", "points", "created", "name"]
    assert len(out) == 2 and out[1].startswith(exp["id"]) and out[1].endswith("cli-list")
    assert main(["list", "--status", "succeeded", "--name", "cli-list", "--url", url]) == 0
    assert capsys.readouterr().out == ""
    assert main(["cancel", exp["id"], "--url", url]) == 0
    assert "cancel requested" in capsys.readouterr().err
    assert main(["wait", exp["id"], "--url", url, "--quiet"]) == 1  # cancelled
    assert "cancelled" in capsys.readouterr().err
    assert main(["delete", exp["id"], "--url", url]) == 0
    assert main(["status", exp["id"], "--url", url]) == 1
    assert "Not found (404)" in capsys.readouterr().err
