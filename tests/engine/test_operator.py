import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

import hsl_engine as he
from hsl_engine._compiled import weigh_rows
from hsl_engine._operator import MomentOperator


def explicit_moment(inputs, y, q, features):
    f = he.lift(inputs, q) if features == "hermite" else inputs
    n, dim = f.shape
    return sum(y[m] * (np.outer(f[m], f[m]) - np.eye(dim)) for m in range(n)) / n


@pytest.mark.parametrize(
    ("q", "d", "features"), [(2, 6, "hermite"), (3, 4, "hermite"), (2, 5, "gaussian")]
)
@pytest.mark.parametrize("threads", [1, 2])
def test_matrix_free_equals_dense_from_explicit_features(seed, q, d, features, threads):
    rng = np.random.default_rng(seed)
    n = 700  # more than one chunk of the q = 2 path (256) and of the lift path (512)
    dim = math.comb(d + q - 1, q)
    inputs = rng.standard_normal((n, d if features == "hermite" else dim))
    y = rng.standard_normal(n)
    y -= y.mean()
    op = MomentOperator(
        inputs, y, q=q, features=features, backend=he.get_backend("cpu", threads=threads)
    )
    reference = explicit_moment(inputs, y, q, features)
    v = rng.standard_normal((dim, 5))
    assert_allclose(op.matmat(v), reference @ v, rtol=1e-11, atol=1e-12)
    assert_allclose(op.dense(), reference, rtol=1e-11, atol=1e-12)
    assert op.passes == 1


def test_q2_trace_term_matters_even_for_centred_labels(seed):
    # The identity component of (x x^T - I) does not cancel in the matrix form; dropping it
    # would shift every result by a multiple of I. Check against an identity input.
    rng = np.random.default_rng(seed)
    d, n = 5, 300
    x = rng.standard_normal((n, d))
    y = rng.standard_normal(n)
    y -= y.mean()
    op = MomentOperator(x, y, q=2, features="hermite", backend=he.get_backend("cpu"))
    eye = he.sym_to_vec(np.eye(d)[None])[0]
    ref = explicit_moment(x, y, 2, "hermite") @ eye
    assert_allclose(op.matmat(eye[:, None])[:, 0], ref, rtol=1e-11, atol=1e-12)


def test_float32_operator_is_close_to_float64(seed):
    rng = np.random.default_rng(seed)
    d, n = 8, 2000
    x = rng.standard_normal((n, d))
    y = rng.standard_normal(n)
    y -= y.mean()
    be = he.get_backend("cpu")
    v = rng.standard_normal((he.feature_dim(d, 2), 3))
    r64 = MomentOperator(x, y, q=2, features="hermite", backend=be).matmat(v)
    r32 = MomentOperator(
        x.astype(np.float32), y.astype(np.float32), q=2, features="hermite", backend=be
    ).matmat(v.astype(np.float32))
    # float32 GEMMs, float64 sums: the result is float64 and carries only the float32
    # rounding of inputs and products (~1e-7 relative), not of a float32 sum over n samples
    assert r32.dtype == np.float64
    assert_allclose(r32, r64, rtol=0, atol=2e-6 * np.abs(r64).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("m", "k", "d"), [(1, 1, 1), (37, 3, 7), (300, 4, 60), (129, 8, 17)])
def test_compiled_row_step_matches_its_formula(seed, dtype, m, k, d):
    # The Numba step of the CPU q = 2 pass (odd sizes: the vectorised loops' remainders)
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((m, d)).astype(dtype)
    g = rng.standard_normal((k, d, d))
    g = (g + g.transpose(0, 2, 1)).astype(dtype)
    yb = rng.standard_normal(m).astype(dtype)
    trace = np.trace(g, axis1=1, axis2=2).astype(dtype)
    xg = np.einsum("jab,ib->ija", g, xb)  # G_j x_i
    x64, xg64 = xb.astype(np.float64), xg.astype(np.float64)
    w = 0.5 * yb[:, None] * (np.einsum("ija,ia->ij", xg64, x64) - trace[None, :])
    wsum = np.full(k, 1.5)
    got = np.ascontiguousarray(xg)
    weigh_rows(got, xb, yb, trace, wsum)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    scale = np.abs(w).max()
    assert got.dtype == dtype
    assert_allclose(got, w[:, :, None] * x64[:, None, :], rtol=0, atol=tol * scale * 4)
    assert_allclose(wsum, 1.5 + w.sum(axis=0), rtol=0, atol=tol * scale * m)


def test_a_nan_sample_shows_in_the_operator():
    # a bad sample poisons the result instead of vanishing in the compiled step
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    y = rng.standard_normal(500).astype(np.float32)
    x[321, 2] = np.nan
    op = MomentOperator(x, y, q=2, features="hermite", backend=he.get_backend("cpu"))
    out = op.matmat(rng.standard_normal((he.feature_dim(6, 2), 4)))
    assert np.isnan(out).all()


def test_cuda_is_a_clear_error():
    with pytest.raises(he.DeviceError, match="cuda"):
        he.get_backend("cuda")
