import numpy as np
import pytest
from numpy.testing import assert_allclose

import hsl_engine as he
from hsl_engine._eigen import block_krylov_top, dense_top


class Dense:
    """A dense symmetric matrix as an operator, counting applications."""

    def __init__(self, a):
        self.a = a
        self.shape = a.shape
        self.dtype = a.dtype
        self.vectors = 0

    def matmat(self, v):
        self.vectors += v.shape[1]
        return self.a @ v


def spiked(rng, dim, spikes):
    """Wigner bulk (edge ~ +-1) plus rank-one spikes of both signs."""
    g = rng.standard_normal((dim, dim))
    a = (g + g.T) / np.sqrt(8 * dim)
    u, _ = np.linalg.qr(rng.standard_normal((dim, len(spikes))))
    return a + (u * spikes) @ u.T


def subspace_distance(u, v):
    return np.linalg.norm(u @ (u.T @ v) - v, 2)


def test_block_krylov_matches_eigh_on_spiked_matrix(seed):
    rng = np.random.default_rng(seed)
    a = spiked(rng, 400, [6.0, -5.0, 4.0, -3.0, 2.5])
    ref = dense_top(a, 15, 15)
    res = block_krylov_top(
        Dense(a), 5, 15, block=15, tol=1e-9, max_passes=500, rng=np.random.default_rng(seed + 7)
    )
    assert res.converged
    assert_allclose(res.values[:5], ref.values[:5], rtol=1e-12)
    # reported extra eigenvalues carry error <= their residual (<= 1e-2 * |theta_1|)
    # (compared as magnitudes: near the bulk edge +-0.96 pairs may swap order within it)
    assert_allclose(np.abs(res.values), np.abs(ref.values), atol=1e-2 * 6.0)
    assert np.all(np.diff(np.abs(res.values)) <= 1e-12)  # ordered by magnitude
    assert subspace_distance(res.vectors[:, :5], ref.vectors[:, :5]) < 1e-7
    assert np.all(res.residuals[:5] <= 1e-9 * 6.0 * 1.0001)


def test_warm_start_saves_work(seed):
    rng = np.random.default_rng(seed)
    a = spiked(rng, 500, [5.0, -4.0, 3.0])
    b = a + 0.02 * spiked(rng, 500, [])  # a nearby matrix: the next n of a sweep
    first = block_krylov_top(
        Dense(a), 3, 8, block=8, tol=1e-8, max_passes=500, rng=np.random.default_rng(1)
    )
    cold_op, warm_op = Dense(b), Dense(b)
    cold = block_krylov_top(
        cold_op, 3, 8, block=8, tol=1e-8, max_passes=500, rng=np.random.default_rng(2)
    )
    warm = block_krylov_top(
        warm_op,
        3,
        8,
        block=8,
        tol=1e-8,
        max_passes=500,
        rng=np.random.default_rng(2),
        v0=first.vectors,
    )
    assert_allclose(warm.values[:3], cold.values[:3], rtol=1e-10)
    assert warm_op.vectors < cold_op.vectors


def test_non_convergence_raises_with_partial_result(seed):
    rng = np.random.default_rng(seed)
    a = spiked(rng, 300, [3.0])
    with pytest.raises(he.ConvergenceError) as info:
        block_krylov_top(
            Dense(a), 4, 6, block=6, tol=1e-12, max_passes=2, rng=np.random.default_rng(0)
        )
    partial = info.value.result
    assert partial.passes == 2 and not partial.converged
    assert partial.values.shape == (6,)
    # Ritz values lie inside the spectrum (Cauchy interlacing)
    assert np.abs(partial.values).max() <= np.abs(np.linalg.eigvalsh(a)).max() + 1e-12


def test_tiny_dimension_is_exact():
    a = np.diag([3.0, -2.0, 1.0, 0.5])
    res = block_krylov_top(
        Dense(a), 2, 4, block=4, tol=1e-12, max_passes=10, rng=np.random.default_rng(0)
    )
    assert_allclose(res.values, [3.0, -2.0, 1.0, 0.5], atol=1e-12)
