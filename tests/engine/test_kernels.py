"""Tests of the kernel ridge regression baselines in ``hsl_engine._kernels``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from hsl_engine._errors import EngineError
from hsl_engine._kernels import (
    KernelFit,
    KernelRidgeSweep,
    _NystroemState,
    _predict,
    median_bandwidth,
    poly_kernel,
    rbf_kernel,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _normalised_mse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((pred - target) ** 2) / np.var(target))


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- kernels and bandwidth -------------------------------------------------------------------


def test_rbf_kernel_matches_double_loop():
    rng = _rng(1)
    a = rng.standard_normal((5, 3))
    b = rng.standard_normal((4, 3))
    b[0] = a[2]  # a coincident pair exercises the clip of tiny negative squared distances
    bw = 1.3
    expected = np.empty((5, 4))
    for i in range(5):
        for j in range(4):
            expected[i, j] = math.exp(-np.sum((a[i] - b[j]) ** 2) / (2 * bw**2))
    got = rbf_kernel(a, b, bw)
    assert got.shape == (5, 4)
    assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert got[2, 0] <= 1.0


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_poly_kernel_matches_double_loop(degree):
    rng = _rng(2)
    a = rng.standard_normal((6, 4))
    b = rng.standard_normal((3, 4))
    expected = np.empty((6, 3))
    for i in range(6):
        for j in range(3):
            expected[i, j] = (1.0 + float(np.dot(a[i], b[j])) / 4) ** degree
    got = poly_kernel(a, b, degree)
    assert got.shape == (6, 3)
    assert_allclose(got, expected, rtol=1e-12, atol=0)


def test_kernels_reject_mismatched_widths():
    with pytest.raises(ValueError, match="widths"):
        rbf_kernel(np.zeros((2, 3)), np.zeros((2, 4)), 1.0)
    with pytest.raises(ValueError, match="degree"):
        poly_kernel(np.zeros((2, 3)), np.zeros((2, 3)), 0)


def test_median_bandwidth_matches_double_loop_on_prefix():
    rng = _rng(3)
    x = rng.standard_normal((30, 4))
    # Rows past max_samples must be ignored: make them far away so using them would show.
    x[20:] += 100.0
    dists = [np.linalg.norm(x[i] - x[j]) for i in range(20) for j in range(i + 1, 20)]
    assert median_bandwidth(x, max_samples=20) == pytest.approx(np.median(dists), rel=1e-12)
    assert median_bandwidth(x[:20]) == pytest.approx(np.median(dists), rel=1e-12)


def test_median_bandwidth_rejects_degenerate_input():
    with pytest.raises(EngineError, match="bandwidth"):
        median_bandwidth(np.ones((10, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        median_bandwidth(np.ones((1, 3)))


# --- exact solve ------------------------------------------------------------------------------


def _bordered_solution(k_train, k_test, y, ridge):
    """Closed form of KRR with an unpenalised intercept, solved as one dense system.

    Stationarity of ``(1/n)||K a + c 1 - y||^2 + ridge a^T K a`` holds when
    ``(K + n ridge I) a + c 1 = y`` and ``1^T a = 0``.
    """
    n = k_train.shape[0]
    system = np.zeros((n + 1, n + 1))
    system[:n, :n] = k_train + n * ridge * np.eye(n)
    system[:n, n] = 1.0
    system[n, :n] = 1.0
    sol = np.linalg.solve(system, np.append(y, 0.0))
    return k_test @ sol[:n] + sol[n]


@pytest.mark.parametrize("kernel", ["rbf", "poly"])
def test_exact_krr_matches_bordered_closed_form(kernel):
    rng = _rng(4)
    n, d, ridge = 50, 3, 1e-2
    x = rng.standard_normal((n, d))
    y = np.cos(x[:, 0]) + x[:, 1] ** 2 + 3.0  # nonzero mean: the intercept matters
    xt = rng.standard_normal((20, d))
    if kernel == "rbf":
        model = KernelRidgeSweep("rbf", ridge=ridge, n_landmarks=100, rng=rng)
        fit = model.fit_predict(x, y, xt)
        bw = median_bandwidth(x)
        k_train, k_test = rbf_kernel(x, x, bw), rbf_kernel(xt, x, bw)
        assert fit.bandwidth == bw
    else:
        model = KernelRidgeSweep("poly", ridge=ridge, n_landmarks=100, degree=3, rng=rng)
        fit = model.fit_predict(x, y, xt)
        k_train, k_test = poly_kernel(x, x, 3), poly_kernel(xt, x, 3)
        assert fit.bandwidth is None
    expected = _bordered_solution(k_train, k_test, y, ridge)
    assert isinstance(fit, KernelFit)
    assert (fit.solver, fit.n_train_used, fit.n_landmarks) == ("exact", n, n)
    assert fit.predictions.shape == (20,)
    assert_allclose(fit.predictions, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n_landmarks", [100, 40])
def test_intercept_is_unpenalised(n_landmarks):
    # Shifting all labels by a constant must shift every prediction by exactly that constant,
    # in both solvers; a penalised or merely "centred" intercept would shrink part of it.
    rng = _rng(5)
    x = rng.standard_normal((80, 3))
    y = np.sin(x[:, 0])
    xt = rng.standard_normal((15, 3))
    model = KernelRidgeSweep("rbf", ridge=1e-1, n_landmarks=n_landmarks, incremental=False, rng=rng)
    base = model.fit_predict(x, y, xt).predictions
    shifted = model.fit_predict(x, y + 50.0, xt).predictions
    assert_allclose(shifted - 50.0, base, rtol=0, atol=1e-9)


def test_cholesky_failure_raises_engine_error():
    # A rank-3 linear kernel with a negligible ridge is numerically singular.
    rng = _rng(6)
    x = rng.standard_normal((60, 2))
    model = KernelRidgeSweep("poly", ridge=1e-300, n_landmarks=100, degree=1, rng=rng)
    with pytest.raises(EngineError, match="Cholesky"):
        model.fit_predict(x, x[:, 0], x[:5])


# --- Nystroem vs exact ------------------------------------------------------------------------


def _problem(n, d, seed):
    rng = _rng(seed)
    x = rng.standard_normal((n, d))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.3 * rng.standard_normal(n)
    return x, y, rng.standard_normal((100, d))


def test_nystroem_with_all_rows_as_landmarks_is_exact():
    n, ridge = 200, 1e-3
    x, y, xt = _problem(n, 5, seed=7)
    exact = KernelRidgeSweep("rbf", ridge=ridge, n_landmarks=n, rng=_rng()).fit_predict(x, y, xt)
    assert exact.solver == "exact"
    bw = exact.bandwidth

    def kern(a, b):
        return rbf_kernel(a, b, bw)

    state = _NystroemState(x, y, kern, bw)
    assert state.rank == n  # no eigenvalue dropped, so the feature map spans the whole RKHS
    state.update(x, y)
    coef, intercept = state.solve(ridge)
    nystroem = _predict(xt, state.landmarks, coef, intercept, kern)
    # Same minimiser in two parametrisations; the difference is rounding amplified by
    # cond(K + n ridge I) <~ 1/(n ridge) ~ 5.
    assert_allclose(nystroem, exact.predictions, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kernel", ["rbf", "poly"])
def test_nystroem_matches_dense_feature_space_ridge(kernel):
    # Landmarks unrepresentative of the later rows (shifted inputs, offset labels) make the
    # feature means far from the landmark means, so the algebraic centring and the intercept
    # are really exercised; several chunks of rows exercise the streaming sums.
    rng = _rng(12)
    n, m, d, ridge = 9000, 60, 4, 1e-3
    x = rng.standard_normal((n, d))
    x[m:, 0] += 1.5
    y = np.sin(x[:, 0]) + x[:, 1] + 2.0
    y[m:] += 1.0
    xt = rng.standard_normal((50, d))
    kw = {"degree": 3} if kernel == "poly" else {"bandwidth": 2.0}
    fit = KernelRidgeSweep(kernel, ridge=ridge, n_landmarks=m, rng=rng, **kw).fit_predict(x, y, xt)
    assert fit.solver == "nystroem"

    def kern(a, b):
        return poly_kernel(a, b, 3) if kernel == "poly" else rbf_kernel(a, b, 2.0)

    s, u = np.linalg.eigh(kern(x[:m], x[:m]))
    keep = s > 1e-10 * s.max()
    proj = u[:, keep] / np.sqrt(s[keep])
    phi, phi_t = kern(x, x[:m]) @ proj, kern(xt, x[:m]) @ proj
    r = phi.shape[1]
    # Normal equations of min ||phi b + c 1 - y||^2 + n ridge ||b||^2 over (b, c).
    design = np.column_stack([phi, np.ones(n)])
    system = design.T @ design
    system[np.arange(r), np.arange(r)] += n * ridge
    sol = np.linalg.solve(system, design.T @ y)
    expected = phi_t @ sol[:r] + sol[r]
    assert_allclose(fit.predictions, expected, rtol=1e-8, atol=1e-8)


def test_nystroem_with_slightly_fewer_landmarks_is_close_to_exact():
    n, ridge = 200, 1e-3
    x, y, xt = _problem(n, 5, seed=7)
    exact = KernelRidgeSweep("rbf", ridge=ridge, n_landmarks=n, rng=_rng()).fit_predict(x, y, xt)
    approx = KernelRidgeSweep("rbf", ridge=ridge, n_landmarks=n - 5, rng=_rng()).fit_predict(
        x, y, xt
    )
    assert (approx.solver, approx.n_landmarks, approx.n_train_used) == ("nystroem", n - 5, n)
    # The 5 non-landmark rows still enter the loss; only the parts of their kernel sections
    # outside the span of the other 195 are lost, which moves predictions by O(k/n) of their
    # spread at most (observed ~1e-3). 1e-2 relative to the spread catches a wrong intercept
    # or wrong feature map, which move them by O(1).
    spread = exact.predictions - exact.predictions.mean()
    err = np.linalg.norm(approx.predictions - exact.predictions) / np.linalg.norm(spread)
    assert err < 1e-2
    assert err > 0  # it really was a different (approximate) solve


# --- incremental reuse ------------------------------------------------------------------------


def _stream(n=8000, d=10, seed=8):
    rng = _rng(seed)
    x = rng.standard_normal((n, d))
    y = np.tanh(x[:, 0] + x[:, 1]) + 0.2 * rng.standard_normal(n)
    return x, y, rng.standard_normal((200, d))


@pytest.mark.parametrize("kernel", ["rbf", pytest.param("poly", marks=pytest.mark.slow)])
def test_incremental_matches_from_scratch(kernel):
    x, y, xt = _stream()
    kw = {"degree": 2} if kernel == "poly" else {}
    grown = KernelRidgeSweep(kernel, ridge=1e-3, n_landmarks=500, rng=_rng(), **kw)
    first = grown.fit_predict(x[:3000], y[:3000], xt)
    second = grown.fit_predict(x, y, xt)
    fresh_model = KernelRidgeSweep(kernel, ridge=1e-3, n_landmarks=500, rng=_rng(), **kw)
    fresh = fresh_model.fit_predict(x, y, xt)
    assert grown._state is not None and fresh_model._state is not None
    # Only the 5000 new rows were streamed on the second call.
    assert grown._state.rows_processed == 8000
    assert fresh_model._state.rows_processed == 8000
    assert second.bandwidth == fresh.bandwidth
    assert (second.solver, second.n_train_used, second.n_landmarks) == ("nystroem", 8000, 500)
    assert _rel_diff(second.predictions, fresh.predictions) < 1e-10
    # Sanity that the second call is not just the first one again.
    assert _rel_diff(first.predictions, fresh.predictions) > 1e-6


def test_same_prefix_again_reuses_and_is_deterministic():
    x, y, xt = _stream(n=2000)
    model = KernelRidgeSweep("rbf", ridge=1e-3, n_landmarks=200, rng=_rng())
    a = model.fit_predict(x, y, xt)
    b = model.fit_predict(x, y, xt)
    assert model._state.rows_processed == 2000
    assert_array_equal(a.predictions, b.predictions)
    c = KernelRidgeSweep("rbf", ridge=1e-3, n_landmarks=200, rng=_rng(99)).fit_predict(x, y, xt)
    assert_array_equal(a.predictions, c.predictions)


# Smaller than the equality test above (these only check the restart decision), but still
# more rows than one streaming block so reuse would span several blocks.
_N_FIRST, _N_SECOND, _M = 2000, 5000, 200


def _restart_cases():
    x, y, _ = _stream(n=_N_SECOND)
    x_last = x.copy()
    x_last[_N_FIRST - 1] += 1.0  # the previous last row changed: not the same stream
    x_land = x.copy()
    x_land[10] += 1.0  # a landmark changed
    y_land = y.copy()
    y_land[10] += 1.0  # a landmark label changed
    return {
        "last_row": (x_last, y),
        "landmark_row": (x_land, y),
        "landmark_label": (x, y_land),
        "shorter": (x[: _N_FIRST - 500], y[: _N_FIRST - 500]),
    }


def _fresh_rbf(x, y, xt):
    return KernelRidgeSweep("rbf", ridge=1e-3, n_landmarks=_M, rng=_rng()).fit_predict(x, y, xt)


@pytest.mark.parametrize("case", ["last_row", "landmark_row", "landmark_label", "shorter"])
def test_incremental_restarts_when_stream_differs(case):
    x, y, xt = _stream(n=_N_SECOND)
    x2, y2 = _restart_cases()[case]
    model = KernelRidgeSweep("rbf", ridge=1e-3, n_landmarks=_M, rng=_rng())
    model.fit_predict(x[:_N_FIRST], y[:_N_FIRST], xt)
    got = model.fit_predict(x2, y2, xt)
    assert model._state.rows_processed == x2.shape[0]  # started over
    assert_array_equal(got.predictions, _fresh_rbf(x2, y2, xt).predictions)


def test_incremental_restarts_when_median_bandwidth_changes():
    # At n = 300 the median heuristic sees 300 rows, at n = 5000 it sees 1000: the kernel
    # differs, so the sums cannot be reused and the result must not depend on history.
    x, y, xt = _stream(n=_N_SECOND)
    model = KernelRidgeSweep("rbf", ridge=1e-3, n_landmarks=_M, rng=_rng())
    early = model.fit_predict(x[:300], y[:300], xt)
    late = model.fit_predict(x, y, xt)
    assert early.solver == "nystroem"
    assert early.bandwidth != late.bandwidth
    assert model._state.rows_processed == _N_SECOND
    assert_array_equal(late.predictions, _fresh_rbf(x, y, xt).predictions)


def test_non_incremental_keeps_no_state():
    x, y, xt = _stream(n=2000)
    model = KernelRidgeSweep("rbf", ridge=1e-3, n_landmarks=300, incremental=False, rng=_rng())
    fit = model.fit_predict(x, y, xt)
    assert fit.solver == "nystroem"
    assert model._state is None


# --- learning sanity --------------------------------------------------------------------------


def test_rbf_learns_smooth_low_dimensional_target():
    rng = _rng(9)
    d = 3
    x = rng.standard_normal((2000, d))
    xt = rng.standard_normal((1000, d))

    def target(z):
        return np.sin(z[:, 0]) + 0.5 * z[:, 1]

    model = KernelRidgeSweep("rbf", ridge=1e-4, n_landmarks=500, rng=rng)
    fit = model.fit_predict(x, target(x), xt)
    assert fit.solver == "nystroem"
    assert _normalised_mse(fit.predictions, target(xt)) < 0.05


def test_poly2_learns_product_target():
    rng = _rng(10)
    d = 5
    x = rng.standard_normal((2000, d))
    xt = rng.standard_normal((1000, d))
    model = KernelRidgeSweep("poly", ridge=1e-6, n_landmarks=300, degree=2, rng=rng)
    fit = model.fit_predict(x, x[:, 0] * x[:, 1], xt)
    assert fit.solver == "nystroem" and fit.bandwidth is None
    assert _normalised_mse(fit.predictions, xt[:, 0] * xt[:, 1]) < 0.05
    # Degree 1 cannot represent x0 x1: guards against a test that passes for any kernel.
    lin = KernelRidgeSweep("poly", ridge=1e-6, n_landmarks=300, degree=1, rng=rng)
    assert (
        _normalised_mse(lin.fit_predict(x, x[:, 0] * x[:, 1], xt).predictions, xt[:, 0] * xt[:, 1])
        > 0.5
    )


# --- argument validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "kwargs", "match"),
    [
        ("laplace", {}, "kernel"),
        ("rbf", {"ridge": 0.0}, "ridge"),
        ("rbf", {"n_landmarks": 0}, "n_landmarks"),
        ("rbf", {"degree": 2}, "degree"),
        ("rbf", {"bandwidth": -1.0}, "bandwidth"),
        ("poly", {}, "degree"),
        ("poly", {"degree": 2, "bandwidth": 1.0}, "bandwidth"),
    ],
)
def test_constructor_validation(kernel, kwargs, match):
    args = {"ridge": 1e-3, "n_landmarks": 10, "rng": _rng()} | kwargs
    with pytest.raises(ValueError, match=match):
        KernelRidgeSweep(kernel, **args)


def test_fit_predict_validation():
    model = KernelRidgeSweep("rbf", ridge=1e-3, n_landmarks=10, rng=_rng())
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="y_train"):
        model.fit_predict(x, np.zeros(4), x)
    with pytest.raises(ValueError, match="width"):
        model.fit_predict(x, np.zeros(5), np.zeros((3, 3)))
    x_nan = _rng().standard_normal((5, 2))
    x_nan[1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        model.fit_predict(x_nan, np.zeros(5), x)


# --- scale ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_scale_100k_rows_nystroem():
    rng = _rng(11)
    n, d, m = 100_000, 60, 1000
    x = rng.standard_normal((n, d))
    w = rng.standard_normal(d) / math.sqrt(d)
    y = np.tanh(2.0 * x @ w) + 0.1 * rng.standard_normal(n)
    xt = rng.standard_normal((1000, d))
    model = KernelRidgeSweep("rbf", ridge=1e-4, n_landmarks=m, rng=rng)
    fit = model.fit_predict(x, y, xt)
    assert fit.n_train_used == n
    assert fit.solver == "nystroem" and fit.n_landmarks == m
    assert np.all(np.isfinite(fit.predictions))
    # Better than predicting the mean: the fit used the labels, not just the intercept.
    assert _normalised_mse(fit.predictions, np.tanh(2.0 * xt @ w)) < 0.9
