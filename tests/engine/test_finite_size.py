"""The exact proportional-regime theory (hsl_engine._finite_size, docs/theory.md).

Fast checks: its large-n limit is the first-order formula of docs/model.md section 4, its bulk
edges and outliers are where a directly sampled C_hat has them, it is deterministic, and it
reaches the results document. Slow checks: it predicts what hsl's dense-solver runs measure
in Gaussian mode, in the proportional regime where the asymptotic overlay is off by 1.2x or
more, within the seed noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import hsl_engine as he
from hsl.document import results_document


def gaussian_spec(model, n_values, seeds=5, seed=0, **kw):
    return he.parse_spec(
        {
            "model": {"features": "gaussian", **model},
            "sweep": {"n_values": n_values, "seeds": seeds, "seed": seed, "n_test": 4000},
            "solver": {"eigensolver": "dense"},
            **kw,
        }
    )


def test_large_n_limit_is_the_first_order_formula():
    # 1 - cos2_i -> (n_i / n) E[y^2 h_i^2] with n_i = D / (2 lambda_i^2) and, for g = id,
    # E[y^2 h_i^2] = 1 + 4 lambda_i^2 (docs/model.md section 4); corrections are O(D / n)
    model = he.parse_spec({"model": {"d": 20, "d1": 4, "gamma": 0.5, "features": "gaussian"}})
    model = model.model
    dim = model.feature_dim
    n = 2e4 * dim
    signs = np.array([1.0, -1.0, 1.0, -1.0])
    (p,) = he.finite_size_curve(model, [n], signs=signs)
    weights = np.abs(he.theory(model).weights)
    first_order = dim / (2 * weights**2 * n) * (1 + 4 * weights**2)
    tail = 1 - np.array(p.cos2)
    assert np.allclose(tail, first_order, rtol=0.05), (tail, first_order)
    # the outliers sit at sqrt 2 lambda_i (1 + O(D/n)) with the sign of lambda_i
    spikes = math.sqrt(2) * weights * signs
    assert np.allclose(p.outliers, spikes, rtol=0.02), (p.outliers, spikes)


def test_edges_and_outliers_match_a_sampled_c_hat(seed):
    # C_hat = (1/n) sum y z z^T sampled directly (D = 300, n/D = 12, id): its extreme bulk
    # eigenvalues and its outliers against the predicted edges and outliers
    rng = np.random.default_rng(seed)
    dim, n, d1 = 300, 3600, 3
    lam = np.array([0.8, -0.5, 0.33])
    lam = lam / np.linalg.norm(lam)
    spec = he.parse_spec({"model": {"d": 24, "d1": d1, "features": "gaussian"}})
    model = spec.model
    assert model.feature_dim == dim
    order = np.argsort(-np.abs(lam))
    weights = he.theory(model).weights
    lam_spec = np.sign(lam[order]) * weights  # the theory's teacher: |lambda| from gamma
    z = rng.standard_normal((n, dim))
    h = z[:, :d1]
    y = ((h * h - 1) @ lam_spec) / math.sqrt(2)
    y = y - y.mean()
    c_hat = (z.T * y) @ z / n
    evals, vecs = np.linalg.eigh(c_hat)
    (p,) = he.finite_size_curve(model, [n], signs=np.sign(lam_spec))
    lo, hi = p.bulk_edges
    has = np.array([o is not None for o in p.outliers])
    assert has.sum() >= 2
    # each direction's outlier is the eigenvalue whose eigenvector carries it (a single
    # extreme sample can make a larger spike of its own, which is not the direction's). The
    # extreme samples have large h_1^2 and pull the strongest direction's outlier out by
    # 1-14 % (sampled 1.39-1.57 over root seeds 0-4 against 1.37 predicted; the continuum
    # leaves them out, docs/theory.md section 6.1); the second's is within 6 %
    carrier = np.argmax(vecs[:d1][has] ** 2, axis=1)
    predicted = np.array([o for o in p.outliers if o is not None])
    assert np.allclose(evals[carrier], predicted, rtol=0.16), (evals[carrier], predicted)
    assert np.all(np.abs(evals[carrier]) >= np.abs(predicted) * 0.94), (evals[carrier], predicted)
    # the edges are the continuum's: beyond them only the spikes of single extreme samples
    # (measured 1-2 per side for root seeds 0-4; the continuum leaves out TAIL_SAMPLES = 4 in
    # expectation), and the continuum's extreme eigenvalue sits at the edge (fluctuations
    # ~ D^(-2/3))
    inner = np.delete(evals, carrier)
    limit = he._finite_size.TAIL_SAMPLES
    above, below = inner[inner > hi], inner[inner < lo]
    assert above.size <= limit and below.size <= limit, (above, below, lo, hi)
    top_bulk = inner[inner.size - 1 - above.size]
    low_bulk = inner[below.size]
    assert abs(top_bulk - hi) < 0.1 * hi, (top_bulk, hi)
    assert abs(low_bulk - lo) < 0.1 * abs(lo), (low_bulk, lo)


def test_deterministic_and_validated():
    spec = gaussian_spec({"d": 12, "d1": 3, "gamma": 0.5}, [200, 800], seeds=2)
    a = he.finite_size_curve(spec, [200, 800])
    he._finite_size._curve.cache_clear()
    he._finite_size._law.cache_clear()
    b = he.finite_size_curve(spec, [200, 800])
    assert a == b
    assert a[0].overlap == pytest.approx(np.mean(a[0].cos2))
    with pytest.raises(ValueError, match="model.features"):
        he.finite_size_curve(he.parse_spec({"model": {"d": 12}}), [100])
    with pytest.raises(ValueError, match="n_values"):
        he.finite_size_curve(spec, [0.5])
    with pytest.raises(ValueError, match="signs"):
        he.finite_size_curve(spec.model, [100], signs=[1, 2, 1])


def test_teacher_signs_are_the_seeds_teachers():
    spec = gaussian_spec({"d": 12, "d1": 5}, [100], seeds=3, seed=11)
    for i in range(3):
        teacher = he.make_seed_data(spec, i).teacher
        assert np.array_equal(he.teacher_signs(spec, i), np.sign(teacher.weights))


def test_n_half_is_where_cos2_crosses_one_half():
    spec = gaussian_spec({"d": 16, "d1": 3, "gamma": 0.5}, [100], seeds=2)
    n_half = he.n_half_finite_size(spec)
    assert all(x is not None for x in n_half)
    assert n_half == sorted(n_half)  # strongest first
    for i, x in enumerate(n_half):
        below, above = he.finite_size_curve(spec, [x * 0.97, x * 1.03])
        assert below.cos2[i] < 0.5 <= above.cos2[i], (i, below.cos2, above.cos2)


def test_results_document_carries_the_finite_size_theory():
    spec = gaussian_spec({"d": 12, "d1": 3}, [150, 600], seeds=2)
    doc = results_document(spec, [])
    fs = doc["theory"]["finite_size"]
    assert [p["n"] for p in fs] == [150, 600]
    assert {"n", "mse", "overlap", "recovered", "cos2", "bulk_edge", "outliers"} <= set(fs[0])
    assert len(fs[0]["cos2"]) == 3
    assert doc["theory"]["finite_size_note"] is None
    assert all("n_half_finite_size" in t for t in doc["thresholds"])
    hermite = he.parse_spec({"model": {"d": 12, "d1": 3}, "sweep": {"n_values": [150]}})
    doc = results_document(hermite, [])
    assert doc["theory"]["finite_size"] is None
    assert "gaussian" in doc["theory"]["finite_size_note"]
    assert all(t["n_half_finite_size"] is None for t in doc["thresholds"])


# Proportional-regime configurations: D = 300 or 465, n/D from 2 to 64, several activations
# and noise levels. In every one the asymptotic overlay's n_half (2 n_i) is off by more than
# 1.2x for most directions.
AGREEMENT = {
    "id": ({"d": 24, "d1": 5, "gamma": 0.4}, [900, 1800, 3600, 7200, 14400]),
    "tanh-noise": (
        {"d": 24, "d1": 4, "gamma": 0.8, "activation": "tanh", "noise_std": 1.0},
        [1200, 2400, 4800, 9600],
    ),
    "quadratic": (
        {"d": 24, "d1": 4, "gamma": 0.2, "activation": "quadratic"},
        [600, 1200, 2400, 4800, 9600],
    ),
    "id-noise": (
        {"d": 24, "d1": 6, "gamma": 1.0, "noise_std": 1.0},
        [1200, 2400, 4800, 9600, 19200],
    ),
    # the cos2-vs-theory-gaussian-cpu preset's model (D = 465, eight directions of comparable
    # weight) around its thresholds, n/D 4.5-58
    "id-d1-8": ({"d": 30, "d1": 8, "gamma": 0.6}, [2100, 4200, 8400, 16800, 27000]),
}


def agreement(name: str, seed: int) -> dict:
    """Dense-solver runs (5 teachers) against the theory: the figures the slow test checks."""
    model, ns = AGREEMENT[name]
    spec = gaussian_spec(model, ns, seeds=5, seed=seed)
    result = he.run_experiment(spec, threads=1)
    rows = result.summary.curves["layerwise_spectral"]
    theory = he.finite_size_curve(spec, ns)
    exact = he.n_half_finite_size(spec)
    # the bare first-order formula of the former overlay, n_half = 2 n_i = D / (nu1 lambda_i)^2
    # (the yardstick; the corrected overlay `he.theory(...).n_half` is close to the
    # exact theory at large n/D and would leave nothing to test)
    th = he.theory(spec.model)
    bare = th.feature_dim / (th.nu1 * np.asarray(th.weights)) ** 2
    sim = np.array([r.cos2_mean for r in rows])
    pred = np.array([p.cos2 for p in theory])
    per_seed = {}
    for p in result.points:
        per_seed.setdefault(p.n, []).append(p.cos2)
    sem = np.array([np.std(per_seed[n], axis=0, ddof=1) / math.sqrt(5) for n in ns])
    off = np.array([x is None or not 1 / 1.2 <= x / b <= 1.2 for x, b in zip(exact, bare)])
    mse_sim = np.array([r.mse_mean for r in rows])
    mse_pred = np.array([p.mse for p in theory])
    err = np.abs(sim - pred)
    return {
        "off": off,
        "mean_abs_cos2_off": float(err[:, off].mean()) if off.any() else float("nan"),
        "mean_abs_cos2": float(err.mean()),
        "mean_sem": float(sem.mean()),
        "mse_rel": mse_pred / mse_sim - 1,
        "n_half_ratio": [None if x is None else x / b for x, b in zip(exact, bare)],
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(AGREEMENT))
def test_finite_size_theory_predicts_dense_runs(name, seed):
    got = agreement(name, seed)
    assert got["off"].sum() >= 2  # the asymptotic overlay is off here: a regime worth testing
    # mean |cos2_sim - cos2_theory| over directions and n within 0.05 and the MSE within
    # 10 %: the target of issue 12, for every setting (the seed mean's own noise, its mean
    # SEM, is 0.02-0.07: quadratic's is above the bound, so the bound is not relaxed to it).
    # measured for root seeds 0-4 (docs/theory.md section 9): 0.019-0.039 and at most 6.3 %
    assert got["mean_abs_cos2_off"] <= 0.05, got
    assert np.all(np.abs(got["mse_rel"]) <= 0.10), got
