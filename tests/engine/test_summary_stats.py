"""The power law's statistics: interval coverage, the fit window, refusals, partial seed sets."""

from __future__ import annotations

import math

import numpy as np
import pytest

import hsl_engine as he
from hsl_engine._summary import consistent_points, seed_slopes, slope_interval

NS = np.array([2000.0, 4000.0, 8000.0, 16000.0, 32000.0, 64000.0])


def synthetic_table(rng: np.random.Generator, seeds: int, exponent: float) -> np.ndarray:
    """Seed-by-n MSEs around ``exp(0.5) n**exponent`` with the noise of a real sweep: a
    per-seed offset and slope (a seed's nested samples make its points move together, the
    teacher differs per seed) and per-point scatter, all log-normal."""
    x = np.log(NS) - np.log(NS).mean()
    offset = rng.normal(0.0, 0.08, size=(seeds, 1))
    slope = rng.normal(0.0, 0.04, size=(seeds, 1))
    scatter = rng.normal(0.0, 0.03, size=(seeds, NS.size))
    return np.exp(0.5 + exponent * np.log(NS) + offset + slope * x + scatter)


@pytest.mark.parametrize("seeds", [3, 10])
def test_exponent_interval_has_its_nominal_coverage(seeds):
    # 400 replications (deterministic seed): a 95 % interval must cover the true exponent
    # 90-99 % of the time (the bootstrap over 3 seeds it replaces covered 74 %)
    rng = np.random.default_rng(12345)
    truth = -0.5
    covered = 0
    reps = 400
    for _ in range(reps):
        slopes, _ = seed_slopes(synthetic_table(rng, seeds, truth), NS)
        lo, hi = slope_interval(slopes)
        covered += lo <= truth <= hi
    assert 0.9 <= covered / reps <= 0.99, covered / reps


def test_one_seed_has_no_interval():
    slopes, _ = seed_slopes(synthetic_table(np.random.default_rng(0), 1, -0.5), NS)
    assert slope_interval(slopes) is None


def _spec(ns, seeds=3):
    return he.parse_spec(
        {
            "model": {"d": 20, "d1": 2, "gamma": 1.0, "features": "gaussian"},
            "sweep": {"n_values": [int(n) for n in ns], "seeds": seeds},
        }
    )


def _points(ns, mse, cos2, seeds=range(3)):
    out = []
    for s in seeds:
        for n, m, c in zip(ns, mse, cos2, strict=True):
            out.append(
                he.Point(
                    method="layerwise_spectral",
                    seed=s,
                    n=int(n),
                    alpha=math.log(n) / math.log(20),
                    mse=float(m) * (1 + 0.01 * s),
                    overlap=float(np.mean(c)),
                    cos2=tuple(float(v) for v in c),
                    eigenvalues=None,
                    recovered=int(sum(v > 0.5 for v in c)),
                    n_train_used=int(n),
                    seconds=0.0,
                )
            )
    return out


def test_nothing_learned_prints_no_exponent():
    # MSE 1.04 to 0.97 and no direction past cos2 1/2: no recovery window, no exponent
    ns = NS
    mse = np.linspace(1.04, 0.97, ns.size)
    cos2 = [(0.05, 0.01)] * ns.size
    spec = _spec(ns)
    summary = he.summarize(spec, _points(ns, mse, cos2), rng=he.summary_rng(spec))
    pl = summary.power_law
    assert pl.exponent is None and pl.exponent_ci is None
    assert "no recovery window" in pl.reason
    assert pl.n_points == 0 and pl.n_range is None


def test_fit_window_needs_four_points_and_reports_them():
    ns = NS
    cos2 = [(0.2, 0.0), (0.4, 0.1), (0.6, 0.2), (0.8, 0.3), (0.9, 0.45), (0.95, 0.55)]
    mse = 3.0 * ns**-0.3
    spec = _spec(ns)
    pl = he.summarize(spec, _points(ns, mse, cos2), rng=he.summary_rng(spec)).power_law
    # direction 1 reaches 1/2 between 4000 and 8000, direction 2 between 32000 and 64000:
    # the window is the 3 points 8000..32000 plus... only 8000, 16000, 32000: refused
    assert pl.exponent is None and "3 sweep points" in pl.reason
    assert pl.n_range == (8000, 32000) and pl.n_points == 3
    # recovered earlier: 4 points from 4000, every seed fitted
    cos2[1] = (0.55, 0.1)
    pl = he.summarize(spec, _points(ns, mse, cos2), rng=he.summary_rng(spec)).power_law
    assert pl.exponent == pytest.approx(-0.3, abs=1e-9)
    assert pl.n_range == (4000, 32000) and pl.n_points == 4 and pl.seeds == (0, 1, 2)
    lo, hi = pl.exponent_ci
    assert lo <= pl.exponent <= hi


def test_partial_results_use_one_seed_set():
    # seed 0 has every n, seed 1 only the first three (still running): thresholds and the
    # fit use seed 0 alone, curve rows name their seeds
    ns = NS
    cos2 = [(0.2, 0.0), (0.55, 0.1), (0.6, 0.2), (0.8, 0.3), (0.9, 0.4), (0.95, 0.45)]
    mse = 3.0 * ns**-0.3
    full = _points(ns, mse, cos2, seeds=[0])
    part = _points(ns[:3], mse[:3], [(0.9, 0.9)] * 3, seeds=[1])
    spec = _spec(ns, seeds=2)
    summary = he.summarize(spec, full + part, rng=he.summary_rng(spec))
    rows = summary.curves["layerwise_spectral"]
    assert rows[0].seeds == (0, 1) and rows[-1].seeds == (0,)
    # with seed 1 mixed in, direction 1 would be recovered at the first n already
    assert summary.thresholds[0].censored is None
    assert summary.power_law.seeds == (0,)
    points, seeds = consistent_points(full + part, "layerwise_spectral")
    assert seeds == (0,) and {p.seed for p in points} == {0}
