import json

import pytest

import hsl_engine as he
from hsl import cli, document

TINY = {
    "name": "tiny",
    "model": {"d": 8, "gamma": 1.0},
    "sweep": {"alphas": [2.0, 2.5, 3.0, 3.5], "seeds": 2},
    "methods": [{"name": "layerwise_spectral"}, {"name": "kernel_rbf", "n_landmarks": 200}],
}

RESULT_KEYS = {
    "experiment_id",
    "spec",
    "spec_hash",
    "engine_version",
    "complete",
    "d1",
    "feature_dim",
    "weights",
    "points",
    "curves",
    "thresholds",
    "power_law",
    "theory",
}
POINT_KEYS = {
    "method",
    "seed",
    "n",
    "alpha",
    "mse",
    "overlap",
    "cos2",
    "eigenvalues",
    "recovered",
    "n_train_used",
    "seconds",
}


@pytest.fixture(scope="module")
def tiny_points() -> list[he.Point]:
    """The points of TINY, run once for the tests that only read them (they never change
    them: points are frozen dataclasses)."""
    return he.run_experiment(he.parse_spec(TINY)).points


@pytest.fixture
def tiny_spec_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def test_run_writes_results_plots_and_summary(tmp_path, tiny_spec_file, capsys):
    out = tmp_path / "res" / "tiny.json"
    code = cli.main(
        [
            "run",
            str(tiny_spec_file),
            "--out",
            str(out),
            "--plots",
            str(tmp_path / "plots"),
            "--quiet",
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert RESULT_KEYS <= set(doc)
    assert doc["complete"] is True and doc["d1"] == 3 and doc["feature_dim"] == 36
    assert doc["spec_hash"] == he.parse_spec(TINY).spec_hash
    assert len(doc["points"]) == 2 * 2 * 4
    assert POINT_KEYS <= set(doc["points"][0])
    assert set(doc["curves"]) == {"layerwise_spectral", "kernel_rbf"}
    assert {
        "n",
        "alpha",
        "n_seeds",
        "mse_mean",
        "mse_sem",
        "overlap_mean",
        "overlap_sem",
        "cos2_mean",
        "recovered_mean",
    } <= set(doc["curves"]["layerwise_spectral"][0])
    assert {"feature", "weight", "n_half", "n_half_theory", "n_onset_theory"} <= set(
        doc["thresholds"][0]
    )
    assert {"curve", "spectrum"} <= set(doc["theory"])
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == sorted(
        f"{n}.{f}" for n in ("mse", "overlap", "cos2", "spectrum") for f in ("png", "svg")
    )
    printed = capsys.readouterr().out
    assert "per-feature recovery threshold" in printed and "power law" in printed
    assert "kernel_rbf" in printed


@pytest.mark.slow  # two whole runs; the engine's determinism is checked fast in test_experiment
def test_same_spec_gives_same_document_numbers(tmp_path, tiny_spec_file):
    docs = []
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        assert cli.main(["run", str(tiny_spec_file), "--out", str(out), "--quiet"]) == 0
        doc = json.loads(out.read_text())
        for p in doc["points"]:
            p.pop("seconds")
        docs.append(doc)
    assert docs[0] == docs[1]


def test_run_computes_the_exact_theory_once_for_all_its_documents(tmp_path):
    """Every document ``hsl run`` writes (one per point, then the final one) carries the exact
    finite-size theory, computed once, first: the engine's memo tables of the finite-size
    curve and the n_half search (functools.lru_cache) count every call, hit or miss."""
    from hsl_engine import _finite_size

    memos = (_finite_size._curve, _finite_size._n_half)
    spec = {  # Gaussian features: an exact theory; one method: a short run
        **TINY,
        "model": {**TINY["model"], "features": "gaussian"},
        "methods": [{"name": "layerwise_spectral"}],
    }
    spec_file = tmp_path / "gaussian.json"
    spec_file.write_text(json.dumps(spec))
    for memo in memos:
        memo.cache_clear()
    out = tmp_path / "tiny.json"

    assert cli.main(["run", str(spec_file), "--out", str(out), "--quiet"]) == 0

    assert [(m.cache_info().hits, m.cache_info().misses) for m in memos] == [(0, 1), (0, 1)]
    doc = json.loads(out.read_text())
    for memo in memos:
        memo.cache_clear()
    fresh = document.exact_theory(he.parse_spec(spec))
    assert fresh["finite_size"] and fresh["finite_size_note"] is None
    assert doc["theory"]["finite_size"] == fresh["finite_size"]
    assert [t["n_half_finite_size"] for t in doc["thresholds"]] == fresh["n_half_finite_size"]


def test_invalid_spec_names_field_and_range(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"d": 10**6, "gamma": float("nan")}}))
    assert cli.main(["run", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.d: must be in [2, 100000], got 1000000" in err
    assert "model.gamma" in err


def test_unknown_preset_lists_the_presets(capsys):
    assert cli.main(["run", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "'no-such-preset' is neither a spec file nor a preset" in err and "fig2-cpu" in err


def test_presets_listing(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("fig2-cpu", "fig3-cpu", "fig4-cpu", "kernels-cpu", "fig2-d400"):
        assert name in out
    assert cli.main(["presets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fig2-cpu"]["spec"]["model"]["d"] == 60


def test_points_round_trip_and_csv(tiny_points):
    spec = he.parse_spec(TINY)
    points = list(tiny_points)
    assert [document.point_from_dict(document.point_to_dict(p)) for p in points] == points
    doc = document.results_document(spec, points)
    csv_text = document.points_csv(doc)
    lines = csv_text.strip().splitlines()
    assert len(lines) == 1 + len(points)
    header = lines[0].split(",")
    assert header[:5] == ["method", "seed", "n", "alpha", "mse"]
    assert "cos2_3" in header and "eig_13" in header
    first = dict(zip(header, lines[1].split(",")))
    assert float(first["mse"]) == points[0].mse


def test_partial_document_while_running(tiny_points):
    spec = he.parse_spec(TINY)
    points = tiny_points[:2]  # two sizes: too few for a fit
    doc = document.results_document(spec, points, experiment_id="x", complete=False)
    assert doc["complete"] is False and doc["experiment_id"] == "x"
    # too few points: no exponent, and the reason
    assert doc["power_law"]["exponent"] is None and doc["power_law"]["reason"]
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc  # strict JSON, no NaN


def test_progress_reports_every_point(capsys):
    import io

    spec = he.parse_spec(TINY)
    stream = io.StringIO()
    progress = cli.Progress(spec, stream)
    he.run_experiment(spec, on_point=progress)
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == he.points_total(spec)
    assert lines[-1].startswith("[" + "#" * 28 + "] 16/16 points")
    assert "ETA 0s" in lines[-1]


@pytest.mark.slow  # the tiny run twice, once on PyTorch (the engine's torch tests are fast)
def test_run_with_the_torch_backend_matches_numpy(tmp_path, tiny_spec_file, capsys):
    pytest.importorskip("torch")
    docs = {}
    for backend in ("numpy", "torch"):
        out = tmp_path / f"{backend}.json"
        args = ["run", str(tiny_spec_file), "--out", str(out), "--quiet", "--backend", backend]
        assert cli.main(args) == 0
        assert f"on cpu ({backend})" in capsys.readouterr().err
        docs[backend] = json.loads(out.read_text())
    assert docs["torch"]["spec"]["solver"]["backend"] == "torch"
    pairs = list(zip(docs["numpy"]["points"], docs["torch"]["points"], strict=True))
    assert pairs
    for a, b in pairs:
        assert (b["device"], b["backend"]) == ("cpu", "torch")
        assert (a["method"], a["seed"], a["n"]) == (b["method"], b["seed"], b["n"])
        # the same samples on both backends: float64 agrees to rounding
        assert abs(a["mse"] - b["mse"]) <= 1e-8
        if a["cos2"] is not None:
            assert max(abs(x - y) for x, y in zip(a["cos2"], b["cos2"])) <= 1e-8


def test_run_on_a_missing_cuda_device_fails_at_once(tmp_path, tiny_spec_file, capsys):
    if he.cuda_devices():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "r.json"
    for device in ("cuda", "cuda:3"):
        code = cli.main(["run", str(tiny_spec_file), "--out", str(out), "--device", device])
        assert code == 2
        err = capsys.readouterr().err
        assert f"device {device!r} is not available" in err or "needs PyTorch" in err
        assert "points" not in err  # refused before the estimate and before any point
    assert not out.exists()
    code = cli.main(["run", str(tiny_spec_file), "--device", "cuda", "--backend", "numpy"])
    assert code == 2
    assert "solver.backend" in capsys.readouterr().err


def test_version_names_the_package_and_the_engine(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("hsl ") and f"(engine {he.ENGINE_VERSION})" in out


def test_malformed_or_unreadable_spec_files_exit_2_naming_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"d": 10,}}')
    assert cli.main(["run", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"spec file {bad} is not valid JSON" in err and "line 1 column 20" in err
    missing = tmp_path / "missing.json"
    assert cli.main(["run", str(missing), "--quiet"]) == 2
    assert f"cannot read spec file {missing}" in capsys.readouterr().err
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{")
    assert cli.main(["run", str(binary), "--quiet"]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    # spec and --resume together, or neither: a usage error too
    assert cli.main(["run", str(bad), "--resume", str(bad)]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "experiment-results.json").exists()


def test_presets_show_memory_work_and_time(capsys):
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("fig2-cpu "))
    est = he.estimate_resources(he.preset("fig2-cpu"))
    assert f"{est.peak_bytes / 2**30:.2f} GiB" in row
    assert f"{est.flops:.2e}" in row
    assert "~" + cli._work_time(cli.cpu_seconds(he.preset("fig2-cpu"), est)) in row
    # the quoted time is the engine's cost model: each point's fixed cost plus its work at
    # the rate of its kind of work
    assert cli.cpu_seconds(he.preset("fig2-cpu"), est) == est.seconds
    assert est.seconds > est.points * he.POINT_OVERHEAD_SECONDS
    # every name fits its column: the memory figures end where the header's "memory" ends
    header = lines[0]
    longest = max(he.preset_names(), key=len)
    row = next(line for line in lines if line.startswith(longest + " "))
    assert row.index(" GiB") + len(" GiB") == header.index("memory") + len("memory")


def test_a_reader_that_goes_away_gets_no_traceback():
    """'hsl presets | head -1': the reader has gone; hsl exits quietly with 141."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: EPIPE, deterministically
    hsl = [sys.executable, "-c", "import sys; from hsl.cli import main; sys.exit(main())"]
    try:
        proc = subprocess.run([*hsl, "presets"], stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()
    assert proc.returncode == 141


RESUMABLE = {
    "name": "resumable",
    "model": {"d": 12, "gamma": 1.0},
    "sweep": {"n_values": [2000, 4000, 8000, 16000, 32000], "seeds": 3, "n_test": 2000},
    # the dense solver's accumulation is keyed by chunks: a resumed run is exact (a Krylov
    # run resumed mid-sweep agrees to the solver tolerance: its warm start differs)
    "methods": [{"name": "layerwise_spectral", "sample_split": False}],
    "solver": {"eigensolver": "dense"},
}


@pytest.mark.slow  # a real process interrupted mid-run, resumed, then run whole: ~10 s
def test_ctrl_c_stops_at_a_point_boundary_and_resume_continues(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(RESUMABLE))
    out = tmp_path / "partial.json"
    hsl = [sys.executable, "-c", "import sys; from hsl.cli import main; sys.exit(main())"]
    proc = subprocess.Popen(
        [*hsl, "run", str(spec_file), "--out", str(out), "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not out.exists():  # the document is written after every point
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    total = 15
    assert proc.returncode == 130, err
    assert "stopping after the point in progress" in err
    assert f"continue with: hsl run --resume {out}" in err
    partial = json.loads(out.read_text())
    stored = partial["points"]
    assert partial["complete"] is False and 1 <= len(stored) < total
    # one progress line per point computed (stderr is not a terminal)
    assert err.count(" points  elapsed ") == len(stored)

    resumed = subprocess.run(
        [*hsl, "run", "--resume", str(out), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ},
    )
    assert resumed.returncode == 0, resumed.stderr
    # only the missing points were computed: one progress line each
    assert resumed.stderr.count(" points  elapsed ") == total - len(stored)
    assert f"{len(stored)} stored in {out}" in resumed.stderr
    final = json.loads(out.read_text())
    assert final["complete"] is True and len(final["points"]) == total
    # the stored points are the ones of the first session (their own measured seconds)
    key = lambda p: (p["method"], p["seed"], p["n"])  # noqa: E731
    by_key = {key(p): p for p in final["points"]}
    for p in stored:
        assert by_key[key(p)] == p

    # and the points equal an uninterrupted run's, but for the seconds
    reference = tmp_path / "reference.json"
    assert cli.main(["run", str(spec_file), "--out", str(reference), "--quiet"]) == 0
    capsys.readouterr()
    full = json.loads(reference.read_text())
    for doc in (final, full):
        for p in doc["points"]:
            p.pop("seconds")
            # the work done, not a result: the resumed run's first point also accumulates
            # the chunks of the points it skipped (with 3 or more points stored, more
            # chunks than the uninterrupted run adds at that n)
            p.pop("operator_flops")
    assert final["points"] == full["points"]
    assert final["curves"] == full["curves"] and final["thresholds"] == full["thresholds"]


def test_resume_refuses_a_file_that_is_not_a_results_document(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"points": []}))
    assert cli.main(["run", "--resume", str(other), "--quiet"]) == 2
    assert "is not a results document" in capsys.readouterr().err
    doc = document.results_document(he.parse_spec(RESUMABLE), [], complete=False)
    doc["points"] = [{"method": "kernel_rbf", "seed": 0, "n": 2000, "mse": 1.0}]
    other.write_text(json.dumps(doc))
    assert cli.main(["run", "--resume", str(other), "--quiet"]) == 2
    assert "points[0] (kernel_rbf, seed 0, n=2000) is not a point of its spec" in (
        capsys.readouterr().err
    )


def _summary_doc(exact: list[float | None] | None) -> dict:
    thresholds = [
        {
            "feature": i + 1,
            "weight": w,
            "n_half": 1000.0 * (i + 1),
            "n_half_theory": 800.0 * (i + 1),
        }
        for i, w in enumerate((0.7, 0.4))
    ]
    if exact is not None:
        for t, x in zip(thresholds, exact):
            t["n_half_finite_size"] = x
    model = {"d": 20, "q": 2, "gamma": 1.0, "activation": "id", "features": "gaussian"}
    return {
        "spec": {"name": "s", "model": model},
        "d1": 2,
        "feature_dim": 210,
        "thresholds": thresholds,
        "power_law": None,
        "curves": {},
        "theory": {"finite_size_note": None if exact else "Hermite features: not exact"},
    }


def test_summary_prints_both_theories_thresholds():
    text = cli.summary_text(_summary_doc([2000.0, None]))
    header = next(line for line in text.splitlines() if "n_half" in line)
    assert "asymptotic" in header and "exact" in header
    row1 = next(line for line in text.splitlines() if line.strip().startswith("1 "))
    # measured 1000 against asymptotic 800 (1.25) and exact 2000 (0.50)
    assert row1.split()[-4:] == ["800", "1.25", "2000", "0.50"]
    row2 = next(line for line in text.splitlines() if line.strip().startswith("2 "))
    assert row2.split()[-2:] == ["-", "-"]  # no exact threshold for direction 2
    # without the exact theory: no column, and the reason
    text = cli.summary_text(_summary_doc(None))
    assert "exact" not in text.splitlines()[3]
    assert "no exact finite-size theory: Hermite features: not exact" in text
