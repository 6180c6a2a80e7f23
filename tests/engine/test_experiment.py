import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import hsl_engine as he
from hsl_engine._summary import Point, n_half_crossing


def small_spec(**over):
    data = {
        "model": {"d": 8, "gamma": 1.0},
        "sweep": {"alphas": [2.0, 2.75, 3.5], "seeds": 2},
        "methods": [
            {"name": "layerwise_spectral"},
            {"name": "kernel_rbf", "n_landmarks": 300},
            {"name": "kernel_poly", "n_landmarks": 300},
            {"name": "latent_rbf", "n_landmarks": 200},
        ],
    }
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return he.parse_spec(data)


def without_time(points):
    return [dataclasses.replace(p, seconds=0.0) for p in points]


# the two smaller sample sizes of small_spec (n = 64, 304): whole-run checks that hold at any n
# skip its largest (1448), which costs most of the run
TWO_SIZES = {"alphas": [2.0, 2.75]}


def test_same_spec_same_numbers():
    spec = small_spec(sweep=TWO_SIZES)
    a = he.run_experiment(spec).points
    b = he.run_experiment(spec).points
    assert len(a) == he.points_total(spec) == 4 * 2 * 2
    assert without_time(a) == without_time(b)


def test_points_have_the_contract_fields():
    spec = small_spec(sweep={"seeds": 1})
    n_max = spec.sample_sizes()[-1][0]
    pts = {p.method: p for p in he.run_experiment(spec).points if p.n == n_max}
    d1 = spec.model.hidden_dim
    sp = pts["layerwise_spectral"]
    assert len(sp.cos2) == d1 and len(sp.eigenvalues) == d1 + 10
    assert sp.recovered == sum(c > 0.5 for c in sp.cos2)
    assert sp.overlap == pytest.approx(np.mean(sp.cos2))
    # sample split: a fresh batch for A2 and another for the readout
    assert sp.n_train_used == 3 * sp.n
    assert np.all(np.diff(np.abs(sp.eigenvalues)) <= 1e-12)
    assert sp.extra["converged"] is True
    assert pts["kernel_rbf"].cos2 is None and pts["kernel_rbf"].n_train_used == sp.n
    assert pts["latent_rbf"].cos2 is not None


def test_adding_a_method_does_not_change_another_methods_numbers():
    alone = small_spec(methods=[{"name": "layerwise_spectral"}], sweep=TWO_SIZES)
    both = small_spec(sweep=TWO_SIZES)
    a = [p for p in he.run_experiment(alone).points]
    b = [p for p in he.run_experiment(both).points if p.method == "layerwise_spectral"]
    assert without_time(a) == without_time(b)


def test_resumed_run_matches_full_run():
    spec = small_spec(sweep={"seeds": 1, **TWO_SIZES})
    for method in ("layerwise_spectral", "kernel_rbf"):
        full = list(he.iter_run(spec, method, 0))
        resumed = list(he.iter_run(spec, method, 0, skip={full[0].n}))
        assert [p.n for p in resumed] == [p.n for p in full[1:]]
        for p, q in zip(full[1:], resumed):
            # the Krylov warm start differs; converged results agree to the solver tolerance
            assert q.mse == pytest.approx(p.mse, abs=1e-6)
            if p.cos2 is not None:
                np.testing.assert_allclose(q.cos2, p.cos2, atol=1e-6)


def test_cancellation_stops_at_a_point_boundary():
    spec = small_spec(sweep={"seeds": 1})
    done = []
    pts = he.iter_run(spec, "layerwise_spectral", 0, should_stop=lambda: len(done) >= 2)
    for p in pts:
        done.append(p)
    assert len(done) == 2


def test_dense_and_krylov_and_float32_agree(seed):
    base = {"model": {"d": 10, "gamma": 1.0}, "sweep": {"alphas": [3.0], "seeds": 1, "seed": seed}}
    results = {}
    for solver in (
        {"eigensolver": "dense"},
        {"eigensolver": "krylov"},
        {"eigensolver": "krylov", "dtype": "float32"},
    ):
        spec = he.parse_spec({**base, "solver": solver})
        results[tuple(solver.values())] = he.run_experiment(spec).points[0]
    dense, krylov, f32 = results.values()
    assert dense.extra["eigensolver"] == "dense" and krylov.extra["eigensolver"] == "krylov"
    np.testing.assert_allclose(krylov.cos2, dense.cos2, atol=1e-6)
    assert krylov.mse == pytest.approx(dense.mse, abs=1e-6)
    np.testing.assert_allclose(f32.cos2, dense.cos2, atol=2e-3)


def test_unconverged_solve_warns_and_is_recorded():
    spec = he.parse_spec(
        {
            "model": {"d": 10},
            "sweep": {"alphas": [2.5], "seeds": 1},
            "solver": {"eigensolver": "krylov", "max_passes": 1},
        }
    )
    with pytest.warns(he.ConvergenceWarning, match="max_passes"):
        p = he.run_experiment(spec).points[0]
    assert p.extra["converged"] is False and p.extra["passes"] == 1


def test_cuda_device_is_a_clear_error():
    spec = he.parse_spec({"sweep": {"alphas": [1.5]}, "device": "cuda"})
    with pytest.raises(he.DeviceError, match="cuda"):
        he.run_experiment(spec)


def synthetic_points(spec, mse_fn, cos2_fn, seeds):
    pts = []
    for s in seeds:
        for n, a in spec.sample_sizes():
            c = cos2_fn(n, s)
            pts.append(
                Point(
                    "layerwise_spectral",
                    s,
                    n,
                    a,
                    mse_fn(n, s),
                    float(np.mean(c)),
                    tuple(c),
                    None,
                    int(sum(v > 0.5 for v in c)),
                    n,
                    0.0,
                )
            )
    return pts


def test_threshold_interpolates_in_log_n():
    assert n_half_crossing(np.array([100.0, 400.0]), np.array([0.25, 0.75])) == (
        pytest.approx(200.0),
        None,
    )
    assert n_half_crossing(np.array([100.0, 400.0]), np.array([0.6, 0.9])) == (100.0, "left")
    assert n_half_crossing(np.array([100.0, 400.0]), np.array([0.1, 0.2])) == (None, None)


def test_power_law_fit_is_exact_on_an_exact_power_law():
    spec = he.parse_spec(
        {
            "model": {"d": 10, "d1": 2, "gamma": 1.0},
            "sweep": {"n_values": [100, 200, 400, 800, 1600, 3200], "seeds": 3},
        }
    )

    # cos2 linear in log n: direction 1 crosses 1/2 at n = 141, direction 2 at n = 2262,
    # so interpolation is exact and the window is [200, 1600] (4 points)
    def cos2(n, s):
        return [float(np.clip(0.5 + 0.25 * np.log2(n / m), 0, 1)) for m in (141.0, 2262.0)]

    pts = synthetic_points(spec, mse_fn=lambda n, s: 3.0 * n**-0.5, cos2_fn=cos2, seeds=range(3))
    summary = he.summarize(spec, pts, rng=he.summary_rng(spec))
    pl = summary.power_law
    assert pl.exponent == pytest.approx(-0.5, abs=1e-12)
    assert pl.intercept == pytest.approx(np.log(3.0), abs=1e-12)
    assert pl.exponent_ci == pytest.approx((-0.5, -0.5), abs=1e-12)
    assert pl.n_range == (200, 1600) and pl.n_points == 4 and pl.seeds == (0, 1, 2)
    assert [t.n_half for t in summary.thresholds] == [
        pytest.approx(141.0, rel=1e-12),
        pytest.approx(2262.0, rel=1e-12),
    ]


def test_summaries_work_on_partial_points():
    spec = small_spec()
    pts = he.run_experiment(small_spec(sweep={"seeds": 1, **TWO_SIZES})).points
    partial = [p for p in pts if p.n < 8**3.5 - 1]  # seed 0 only, two of three sizes
    assert len({p.n for p in partial}) == 2
    summary = he.summarize(spec, partial, rng=he.summary_rng(spec))
    rows = summary.curves["layerwise_spectral"]
    assert [r.n_seeds for r in rows] == [1, 1]
    assert rows[0].mse_sem is None
    assert summary.curves["kernel_rbf"][0].cos2_mean is None
    assert len(summary.thresholds) == spec.model.hidden_dim
    empty = he.summarize(spec, [], rng=he.summary_rng(spec))
    assert empty.curves == {} and empty.power_law is None
    assert all(t.n_half is None for t in empty.thresholds)
    assert len(empty.theory_curve) > 10


def test_eta_counts_remaining_points():
    spec = small_spec(sweep={"seeds": 1}, methods=[{"name": "layerwise_spectral"}])
    pts = he.run_experiment(spec).points
    assert he.expected_seconds(spec, []) is None
    assert he.expected_seconds(spec, pts) == 0.0
    assert he.expected_seconds(spec, pts[:1]) > 0


RECORDED = Path(__file__).parent / "data" / "recorded_runs.json"


def per_sample_eta(spec, done):
    """The ETA rule before the cost model: each method's seconds per training sample so
    far, times the samples of the points left (kept to show what the cost model fixes)."""
    spent = {}
    for p in done:
        acc = spent.setdefault(p.method, [0.0, 0.0])
        acc[0] += p.seconds
        acc[1] += p.n
    overall = sum(a[0] for a in spent.values()) / sum(a[1] for a in spent.values())
    keys = {(p.method, p.seed, p.n) for p in done}
    left = 0.0
    for method, seed in he.runs(spec):
        acc = spent.get(method)
        rate = acc[0] / acc[1] if acc else overall
        left += sum(rate * n for n, _ in spec.sample_sizes() if (method, seed, n) not in keys)
    return left


def test_eta_against_recorded_runs():
    """The ETA after k points against what the rest of a recorded run really took.

    The recordings are of CPU presets on a quiet 2-core machine (scripts/record-runs): the
    first ETA, after one point, is within 2x of the truth on every run (the issue's target),
    and from a quarter of the points on within 1.5x; the former per-sample rule was 3.2-16x
    off on every run."""
    runs = json.loads(RECORDED.read_text())["runs"]
    assert {r["preset"] for r in runs} >= {"fig2-cpu", "fig3-cpu", "fig4-cpu"}
    for run in runs:
        spec = he.parse_spec(run["spec"])
        points = [SimpleNamespace(method=m, seed=s, n=n, seconds=t) for m, s, n, t in run["points"]]
        assert len(points) == he.points_total(spec)
        est = he.estimate_resources(spec)
        ratios = []
        for k in range(1, len(points)):
            truth = sum(p.seconds for p in points[k:])
            ratios.append(he.expected_seconds(spec, points[:k], estimate=est) / truth)
        assert 1 / 2 <= ratios[0] <= 2, (run["preset"], ratios[0])
        quarter = ratios[len(points) // 4 :]
        assert all(1 / 1.5 <= r <= 1.5 for r in quarter), (run["preset"], quarter)
        old = per_sample_eta(spec, points[:1]) / sum(p.seconds for p in points[1:])
        assert not 1 / 3 <= old <= 3, (run["preset"], old)  # what the cost model replaces


def test_reference_rates_are_those_the_recorded_runs_fit():
    """The cost model's rates (the quote before a run starts) are refitted whenever the runs
    are recorded again (``scripts/record-runs --fit``): within 20 % of the least-squares fit
    for every kind of work and dtype the recordings hold, and its fixed cost per point
    stays small against the points' seconds."""
    from hsl_engine._estimate import REFERENCE_RATES, fit_rates

    fitted = fit_rates(json.loads(RECORDED.read_text())["runs"])
    assert {("q2", "float64"), ("q2", "float32"), ("dense", "float64")} <= set(fitted)
    for key, (a, rate, count) in fitted.items():
        assert count >= 20, key
        assert 1 / 1.2 <= REFERENCE_RATES[key] / rate <= 1.2, (key, rate)
        assert 0.0 <= a <= 1.0, (key, a)


def test_fixed_cost_per_point_follows_the_recorded_runs():
    """A point's fixed cost grows with D (`point_overhead_seconds`): within 2x of the fixed
    cost each recording's fit finds (where that is not ~0), from D = 465 to 7260."""
    from hsl_engine._estimate import fit_rates, point_overhead_seconds

    runs = json.loads(RECORDED.read_text())["runs"]
    fitted = fit_rates(runs)
    checked = set()
    for run in runs:
        spec = he.parse_spec(run["spec"])
        est = he.estimate_resources(spec)
        for kind in est.kinds.values():
            a = fitted[(kind, spec.solver.dtype)][0]
            if a > 0.01:
                ratio = point_overhead_seconds(spec.model.feature_dim) / a
                assert 1 / 2 <= ratio <= 2, (run["preset"], kind, a, ratio)
                checked.add(spec.model.feature_dim)
    assert {465, 1830, 7260} <= checked
    assert point_overhead_seconds(7260) > 5 * point_overhead_seconds(465)


def test_eta_is_none_before_the_first_point_and_ignores_unknown_points():
    spec = small_spec(sweep={"seeds": 1})
    assert he.expected_seconds(spec, []) is None
    stranger = SimpleNamespace(method="no_such_method", seed=0, n=7, seconds=1.0)
    assert he.expected_seconds(spec, [stranger]) is None
    n0 = spec.sample_sizes()[0][0]
    one = SimpleNamespace(method="layerwise_spectral", seed=0, n=n0, seconds=2.0)
    left = he.expected_seconds(spec, [one, stranger])
    # the estimated seconds left, scaled by measured over estimated for the first point
    est = he.estimate_resources(spec)
    work = est.point_seconds
    assert all(w > he.POINT_OVERHEAD_SECONDS for ws in work.values() for w in ws)
    done_work = work["layerwise_spectral"][0]
    all_work = sum(sum(ws) for ws in work.values())
    assert left == pytest.approx(2.0 * (all_work - done_work) / done_work, rel=1e-12)
