import numpy as np
import pytest
from numpy.testing import assert_allclose

import hsl_engine as he
from hsl_engine import _eigen
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


def signed_reference(a, k):
    theta = np.linalg.eigvalsh(a)
    return theta[np.argsort(-np.abs(theta), kind="stable")][:k]


@pytest.mark.parametrize("seed", range(6))
def test_reported_values_are_true_at_every_rank_with_both_signs_at_the_edge(seed):
    # A symmetric Wigner bulk (edges +-1): the reported list ends inside it, where values of
    # both signs alternate in magnitude, so an eigenvalue the basis has not found yet would
    # put a value of the wrong sign at some rank. The guard rule must refine the guards until
    # no such eigenvalue can hide; in-bulk values may then differ from the true ones at their
    # rank by their residual (BULK_TOL) plus what a guard may still move (GUARD_SLACK).
    rng = np.random.default_rng(100 + seed)
    a = spiked(rng, 600, [4.0, -3.5, 2.5, -2.0])
    k_values = 16
    ref = signed_reference(a, k_values)
    res = block_krylov_top(
        Dense(a), 4, k_values, block=k_values + 4, tol=1e-6, max_passes=500,
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    assert res.converged
    assert np.all(np.sign(res.values) == np.sign(ref)), (res.values, ref)
    bound = (_eigen.BULK_TOL + _eigen.GUARD_SLACK) * abs(ref[0])
    assert np.max(np.abs(res.values - ref)) <= bound, (res.values - ref) / abs(ref[0])


def test_guard_rule_refines_a_guard_that_could_bring_a_sign_error_or_pass_a_separated_value():
    def pending(theta, guard_residual, k, separated_at=()):
        rnorm = np.r_[np.zeros(k), guard_residual]
        separated = np.zeros(len(theta), dtype=bool)
        separated[list(separated_at)] = True
        return _eigen._guards_pending(np.asarray(theta), rnorm, k, 5e-3, separated)

    top = [1.0, 0.5, -0.31, 0.305, 0.3]  # reported; 1.0 and 0.5 stand apart
    # a guard of the same sign just below the bulk values: it may enter within the slack
    assert not pending(top + [0.298], 3e-3, 5, [0, 1]).any()
    # with a larger residual it could pass all three bulk values: 0.31 - 0.3 = 1e-2 > slack
    # at the rank it leaves (and 0.31 -> -0.31 would change sign)
    assert pending(top + [0.298], 1.5e-2, 5, [0, 1]).all()
    # a guard of the other sign that could reach the list: its eigenvalue would take a rank
    # held by a positive value (a sign error)
    assert pending(top + [-0.298], 3e-3, 5, [0, 1]).all()
    # out of reach of the smallest reported magnitude: never refined
    assert not pending(top + [-0.298], 1e-3, 5, [0, 1]).any()
    # a list ending in a separated value (reported to relative 1e-5): a guard that could
    # reach it is refined, however little it could move it
    assert pending([1.0, 0.5, 0.3, 0.25], 0.051, 3, [0, 1, 2]).all()
    assert not pending([1.0, 0.5, 0.3, 0.25], 0.049, 3, [0, 1, 2]).any()


def test_warm_start_on_exact_eigenvectors_still_fills_the_reported_list():
    # The first pass is only as wide as the wanted vectors; when the warm start spans an
    # invariant subspace exactly (its residuals vanish) the iteration must still find the
    # other reported eigenvalues rather than stop with the wanted ones.
    rng = np.random.default_rng(3)
    a = spiked(rng, 300, [5.0, -4.0, 3.0])
    theta, u = np.linalg.eigh(a)
    order = np.argsort(-np.abs(theta), kind="stable")
    res = block_krylov_top(
        Dense(a), 3, 10, block=12, tol=1e-8, max_passes=500, rng=np.random.default_rng(0),
        v0=u[:, order[:3]],
    )  # fmt: skip
    assert res.converged and res.values.shape == (10,)
    assert_allclose(res.values[:3], theta[order[:3]], rtol=1e-10)
    assert np.max(np.abs(res.values - theta[order[:10]])) <= 1.5e-2 * 5.0


@pytest.mark.parametrize("seed", range(4))
def test_wanted_vectors_deep_in_the_bulk_follow_their_gap_not_theta_1(seed):
    # One spike 100x the bulk edge: tol |theta_1| is then comparable to the spacing of the
    # bulk values, and a residual that small leaves a wanted vector inside the bulk mixed
    # with its unwanted neighbours (without the gap rule the distance below was 0.016-0.031
    # on these seeds). The gap rule (r <= WANTED_ANGLE x gap to the unwanted values) keeps
    # the wanted eigenspace close to the dense one (0.002-0.003).
    rng = np.random.default_rng(200 + seed)
    a = spiked(rng, 400, [100.0])
    theta, u = np.linalg.eigh(a)
    order = np.argsort(-np.abs(theta), kind="stable")
    res = block_krylov_top(
        Dense(a), 4, 10, block=14, tol=1e-4, max_passes=500, rng=np.random.default_rng(seed)
    )
    assert res.converged
    ref = u[:, order[:4]]
    assert subspace_distance(res.vectors[:, :4], ref) <= 5e-3
