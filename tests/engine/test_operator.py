import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

import hsl_engine as he
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


def test_cuda_is_a_clear_error():
    with pytest.raises(he.DeviceError, match="cuda"):
        he.get_backend("cuda")
