import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

import hsl_engine as he
from hsl_engine._data import project


@pytest.mark.parametrize(("d", "q"), [(5, 2), (4, 3), (7, 2), (3, 3)])
def test_feature_dim_matches_lift(d, q):
    x = np.zeros((2, d))
    assert he.lift(x, q).shape == (2, math.comb(d + q - 1, q)) == (2, he.feature_dim(d, q))


def test_q2_entries_by_hand():
    x = np.array([[1.0, 2.0, -3.0]])
    f = he.lift(x, 2)[0]
    # order: (0,0) (0,1) (0,2) (1,1) (1,2) (2,2)
    s2 = math.sqrt(2)
    assert_allclose(f, [0.0, 2.0, -3.0, 3 / s2, -6.0, 8 / s2], rtol=1e-15)


def test_q3_entries_by_hand():
    x = np.array([[2.0, -1.0]])
    f = he.lift(x, 3)[0]
    # order: (0,0,0) (0,0,1) (0,1,1) (1,1,1)
    s2, s6 = math.sqrt(2), math.sqrt(6)
    expected = [(8 - 6) / s6, (4 - 1) * -1 / s2, (1 - 1) * 2 / s2, (-1 + 3) / s6]
    assert_allclose(f, expected, rtol=1e-15, atol=1e-15)


def test_sym_vec_isometry_and_quadratic_form(seed):
    rng = np.random.default_rng(seed)
    d = 6
    g = rng.standard_normal((3, d, d))
    g = (g + g.transpose(0, 2, 1)) / 2
    v = he.sym_to_vec(g)
    assert_allclose(he.vec_to_sym(v, d), g, rtol=1e-14, atol=1e-14)
    assert_allclose(np.linalg.norm(v, axis=1), np.linalg.norm(g, axis=(1, 2)), rtol=1e-13)
    x = rng.standard_normal((10, d))
    direct = (np.einsum("ni,kij,nj->nk", x, g, x) - np.trace(g, axis1=1, axis2=2)) / math.sqrt(2)
    assert_allclose(he.lift(x, 2) @ v.T, direct, rtol=1e-12, atol=1e-12)
    assert_allclose(project(x, v, 2), direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "d", "k"), [(1, 1, 1), (2500, 7, 3), (700, 33, 11)])
def test_compiled_projection_matches_the_lift(seed, dtype, n, d, k):
    # project's q = 2 rows pass (compiled on the CPU) over odd sizes, several of its 2048-row
    # blocks, and a strided view of the inputs
    rng = np.random.default_rng(seed)
    wide = rng.standard_normal((n, 2 * d))
    x = wide[:, ::2]  # a strided view
    if dtype == np.float32:
        x = x.astype(np.float32)
    v = rng.standard_normal((k, he.feature_dim(d, 2)))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    got = project(x, v, 2)
    ref = he.lift(np.asarray(x, np.float64), 2) @ v.T
    assert got.dtype == dtype and got.shape == (n, k)
    tol = 1e-12 if dtype == np.float64 else 3e-5 * d
    assert_allclose(got, ref, rtol=0, atol=tol * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize(("d", "q"), [(4, 2), (3, 3)])
def test_features_are_orthonormal_statistically(seed, d, q):
    # E[F F^T] = I. With n samples each entry of the empirical second moment has standard
    # deviation sqrt(Var(F_a F_b)/n) <= sqrt(E[F^4]/n) ~ sqrt(15/n) for these degrees, so
    # 6 sigma with n = 400k is ~0.04: a wrong normalisation (e.g. sqrt(3) instead of sqrt(6))
    # is off by 0.5 or more.
    rng = np.random.default_rng(seed)
    n = 400_000
    f = he.lift(rng.standard_normal((n, d)), q)
    second = f.T @ f / n
    assert_allclose(second, np.eye(f.shape[1]), atol=6 * math.sqrt(15 / n))
    assert_allclose(f.mean(axis=0), 0.0, atol=6 * math.sqrt(1 / n))
