"""Top eigenpairs by absolute value: a restarted block Krylov method and a dense reference.

The moment matrix has spikes of both signs, so "top" means largest ``|theta|``. The iterative
method is a block Krylov (block Davidson with identity preconditioner) iteration: each pass
applies the operator to the residuals of the unconverged Ritz vectors, orthogonalised against
the basis, followed by Rayleigh-Ritz over the whole basis. Because ``C Q`` is kept for every
basis vector, Ritz vectors, residuals and thick restarts cost no extra operator applications.
Converged vectors stop generating new directions ("soft locking"), so later passes get cheaper.
The iteration is warm-started from the previous sample size of the same seed.

Each pass applies the operator to ``expand`` vectors at once: 4 on the CPU (`CPU_EXPAND`)
while the sweep's samples fit the default sample budget, 8 (`DEFAULT_EXPAND`) beyond it, where
every pass regenerates them, and on a GPU (`hsl_engine._estimate.pass_width`: the spec and
the kind of device decide, never the memory a run may keep, so stored and regenerated samples
give the same numbers). The first pass takes the warm
start's leading ``max(k_vectors, expand)`` vectors (the previous n's wanted ones) rather than
its whole Ritz block: between two n of the fig2-cpu sweep the previous top 18 eigenvectors
hold only 22-49 % (mean over the new top 18) of the new ones, so the other 18 vectors of a
full-block start bought little (849 vectors over the sweep against 980). Narrower passes
need fewer vectors, and on the CPU a pass of 4 costs only a little more per vector than one
of 8 (measured in CPU time on one core, q = 2, n = 216000, float32, engine 0.6.0's operator:
1.07x per vector at 4, 1.05x at 6, 1.29x at 2). Over the 9-point fig2-cpu sweep 4 wide
takes 930 vectors against 1069 at 8, 946 at 3 and 924 at 2, and 4 % less CPU time than 8
(2 and 3 take more: more passes, each with its fixed cost). A GPU wants wide passes.

Convergence test (see `block_krylov_top`): the wanted vectors to ``tol``, and tighter (down to
``tol / 10``) where their residual over the gap to the nearest unwanted value exceeds 1e-2;
the reported eigenvalues that stand apart from the rest to relative 1e-5 through the
quadratic bound ``r^2 / gap``; reported eigenvalues inside the noise bulk to 1e-2 (what the
spectrum plot needs); and 4 unreported guard vectors on each side beyond them, so the reported
ones are the true top ones rather than a Ritz value that stands in for an eigenvalue not yet
found. A guard is refined only while the eigenvalue it may still become could pass a
separated value or one of the other sign, or change the reported list by more than
`GUARD_SLACK` = 5e-3 |theta_1| at some rank (`_guards_pending`): inside the bulk, where
consecutive values lie closer than that, a guard whose Ritz value sits just below the smallest
reported one no longer costs passes until its residual is below the distance between them
(817 vectors over the sweep against 849). The gap rule for the wanted vectors costs 5 vectors
on the sweep (822); it is there for wanted values deep in the bulk far below ``|theta_1|``
(q = 3, n ~ 2-4 D), where ``tol |theta_1|`` alone left the first layer mixed with unwanted
neighbours: with the narrower start, test MSE 1.4e-3 off the dense ``eigh``'s (the limit is
1e-3; the solver before was at 1.0e-3 there) and cos2 6.2e-4 off; with the rule 6e-5 and
1.5e-4.

The dense algebra of a pass (the eigendecomposition of the projected matrix, the products
with the basis, the orthonormalisation) runs with one BLAS thread: its matrices are at most
D x 360, and threaded BLAS on them spent more time than it saved (on a busy 2-core machine,
2-9 s against 0.2 s in a replay of the 21 passes of the largest fig2-cpu point).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from ._backend import Backend, numpy_backend, single_threaded_blas
from ._errors import ConvergenceError

NUMPY = numpy_backend()

# Relative accuracy of the reported eigenvalues that stand apart from the rest
VALUE_TOL = 1e-5
# Relative residual of reported eigenvalues inside the noise bulk (what the spectrum plot
# needs), and the gap to the nearest other Ritz value, relative to |theta_1|, below which an
# eigenvalue counts as in the bulk
BULK_TOL = 1e-2
SEPARATION = 1e-2
# How far (relative to |theta_1|) an eigenvalue the basis may still be missing could move the
# reported list at any rank before a guard vector is refined further (half of BULK_TOL, so a
# reported in-bulk value stays within 1.5 BULK_TOL of the true one at its rank)
GUARD_SLACK = 5e-3
# A wanted vector's residual over its gap to the nearest unwanted Ritz value (a bound on the
# sine of its angle to the wanted eigenspace) is held below this, down to a residual of
# WANTED_FLOOR tol |theta_1|: where the wanted values sit in the bulk far below |theta_1|, a
# residual of tol |theta_1| alone left a wanted vector mixed with its unwanted neighbours
WANTED_ANGLE = 1e-2
WANTED_FLOOR = 0.1
DEFAULT_EXPAND = 8
# Pass width on the CPU (NumPy, and PyTorch on the CPU, which must agree with it) for sweeps
# whose samples fit the default budget: 4 vectors a pass need 13 % fewer vectors over the
# fig2-cpu sweep (930 against 1069) at 7 % more CPU time per vector (q = 2, n = 216000,
# float32), 4 % less CPU time in all. Measured again with engine 0.7.0's compiled operator
# (the bench's fig2-cpu sweep, best of two, load ~0.6): widths 2 / 3 / 4 / 6 / 8 took 5.84 /
# 5.36 / 5.11 / 5.28 / 5.56 s for 924 / 946 / 930 / 1008 / 1069 vectors. Where passes
# regenerate the samples, and on a GPU, wide passes win: DEFAULT_EXPAND (see
# `hsl_engine._estimate.pass_width`).
CPU_EXPAND = 4
DEFAULT_MAX_BASIS = 360


@dataclass(frozen=True)
class EigResult:
    """Top eigenpairs of a symmetric operator by absolute eigenvalue.

    Attributes
    ----------
    values : ndarray, shape (k_values,)
        Signed eigenvalues, ordered by decreasing absolute value.
    vectors : array, shape (D, k_block)
        Orthonormal Ritz vectors, same order (at least ``k_vectors`` columns), an array of
        the backend that computed them.
    residuals : ndarray, shape (k_values,)
        Residual norms ``||C u - theta u||``.
    passes : int
        Block operator applications.
    converged : bool
    """

    values: np.ndarray
    vectors: Any
    residuals: np.ndarray
    passes: int
    converged: bool


def _by_magnitude(theta: np.ndarray) -> np.ndarray:
    # stable order: |theta| descending, ties broken by sign then index
    return np.lexsort((-theta, -np.abs(theta)))


# Below this D the dense solver calls a full eigh; above it, ARPACK's Lanczos on the dense
# matrix (its matrix-vector product is cheap, 2 D^2 flops) for the top eigenpairs only.
FULL_EIGH_DIM = 800


def dense_top(
    c,
    k_values: int,
    k_block: int,
    *,
    v0=None,
    rng: np.random.Generator | None = None,
    backend: Backend | None = None,
    all_values: bool = False,
) -> EigResult:
    """Top ``max(k_values, k_block)`` eigenpairs by |theta| of a dense symmetric matrix.

    With ``all_values`` a full eigendecomposition is made and ``values`` holds every
    eigenvalue by decreasing magnitude (``residuals`` still the top ``k_values``).

    NumPy: a full ``eigh`` when D <= `FULL_EIGH_DIM`, else ARPACK (``eigsh``, largest
    magnitude) to machine precision, started from the warm vectors ``v0`` (summed) or from
    ``rng``; it falls back to ``eigh`` if ARPACK does not converge. PyTorch: a full ``eigh``
    on the device. The vectors come back as arrays of the backend.
    """
    be = backend or NUMPY
    xp = be.xp
    dim = c.shape[0]
    k = min(max(k_values, k_block), dim)
    # NumPy: single-threaded LAPACK and BLAS, which round alike on any number of cores (a
    # threaded eigh does not; it costs 1.2x at D = 1830 on 2 cores). PyTorch: on its device.
    with contextlib.nullcontext() if be.is_torch else single_threaded_blas():
        if be.is_torch:
            theta_d, u = xp.linalg.eigh(c)
            theta = be.to_numpy(theta_d)
        else:
            theta, u = _host_top(c, k, v0, rng, all_values)
        everything = _by_magnitude(theta)
        vals = theta[everything[:k]]
        vecs = xp.take(u, be.asarray(everything[:k]), axis=1)
        res = be.to_numpy(
            xp.linalg.vector_norm(c @ vecs - vecs * be.asarray(vals)[None, :], axis=0)
        )
    values = np.asarray(theta)[everything] if all_values else vals[:k_values]
    return EigResult(values, vecs[:, :k_block], res[:k_values], 1, True)


def _host_top(c: np.ndarray, k: int, v0, rng, all_values: bool):
    """``eigh`` of a NumPy matrix, or ARPACK's top ``k`` by magnitude for large ``D`` (see
    `dense_top`); eigenvalues ascending or in ARPACK's order, with their vectors."""
    dim = c.shape[0]
    if dim > FULL_EIGH_DIM and k < dim // 4 and not all_values:
        if v0 is not None and v0.shape[1]:
            start = np.asarray(v0).sum(axis=1)
        else:
            start = (rng or np.random.default_rng(0)).standard_normal(dim)
        try:
            return scipy.sparse.linalg.eigsh(
                c, k=k, which="LM", v0=start, ncv=min(dim, max(2 * k + 1, 80)), tol=0.0
            )
        except scipy.sparse.linalg.ArpackNoConvergence:
            pass
    return scipy.linalg.eigh(c)


def _orthonormalise(z, basis, drop: float, xp):
    """Columns of z made orthonormal and orthogonal to ``basis`` (two passes of CGS)."""
    for _ in range(2):
        if basis is not None and basis.shape[1]:
            z = z - basis @ (basis.T @ z)
    if z.shape[1] == 0:
        return z
    norms = xp.linalg.vector_norm(z, axis=0)
    keep = norms > drop * max(1.0, float(xp.max(norms)))
    z = z[:, keep]
    if z.shape[1] == 0:
        return z
    qmat, r = xp.linalg.qr(z)
    # drop directions that QR finds (numerically) dependent
    dr = xp.abs(xp.linalg.diagonal(r))
    qmat = qmat[:, dr > drop * max(1.0, float(xp.max(dr)))]
    if basis is not None and basis.shape[1]:
        qmat = qmat - basis @ (basis.T @ qmat)
        qmat, _ = xp.linalg.qr(qmat)
    return qmat


def block_krylov_top(
    op,
    k_vectors: int,
    k_values: int,
    *,
    block: int,
    tol: float,
    max_passes: int,
    rng: np.random.Generator,
    v0=None,
    max_basis: int | None = None,
    expand: int | None = None,
    value_tol: float = VALUE_TOL,
    bulk_tol: float = BULK_TOL,
    backend: Backend | None = None,
) -> EigResult:
    """Top eigenpairs by |theta| of a symmetric operator given by ``op.matmat``.

    Convergence, with ``r_i = ||C u_i - theta_i u_i||`` and ``gap_i`` the distance from
    ``theta_i`` to the nearest other Ritz value of the block:

    * the ``k_vectors`` wanted vectors: ``r_i <= tol |theta_1|``, and ``r_i <= WANTED_ANGLE
      gap_i'`` (``gap_i'`` the distance to the nearest unwanted Ritz value; a sine-theta
      bound) down to ``r_i <= WANTED_FLOOR tol |theta_1|``;
    * the reported eigenvalues (``k_values``): separated ones (``gap_i > SEPARATION
      |theta_1|``) to relative accuracy ``value_tol`` through the bound
      ``|theta_i - lambda_i| <= r_i^2 / gap_i``; the others, inside the noise bulk where only
      the spectrum plot uses them, to ``r_i <= bulk_tol |theta_1|``;
    * ``block - k_values`` guard vectors on each side of the spectrum (the next Ritz values
      of each sign): one is refined while ``|theta_g| + r_g`` reaches the smallest reported
      magnitude and an eigenvalue there could pass a separated or opposite-sign reported
      value, or move the list by more than ``GUARD_SLACK |theta_1|`` at some rank
      (`_guards_pending`), so an eigenvalue the basis has not resolved yet cannot hide
      behind the reported ones (Ritz values under-estimate the magnitudes at both ends);
    * and the basis holds at least ``block`` vectors (the first pass is ``max(k_vectors,
      expand)`` wide).

    The basis, its images, Ritz vectors and residuals are arrays of the backend (on its
    device); only the small projected matrix ``H = Q^T C Q`` and its eigendecomposition live
    on the host, in float64.

    Parameters
    ----------
    op : object with ``shape`` (D, D) and ``matmat(v: (D, k)) -> (D, k)``, and optionally
        ``backend`` (the array backend of its vectors; NumPy otherwise)
    k_vectors : int
        Eigenvectors wanted to tolerance ``tol``.
    k_values : int
        Eigenvalues reported (>= k_vectors).
    block : int
        ``k_values`` plus the guard vectors per side (the Ritz block has up to
        ``2 block - k_values`` vectors).
    tol : float
        Relative residual tolerance of the wanted vectors.
    max_passes : int
        Most operator applications.
    rng : numpy.random.Generator
        Fills the start block where ``v0`` has fewer columns than it.
    v0 : array, shape (D, j), optional
        Warm start (e.g. the Ritz vectors of the previous sample size, wanted ones first):
        its first ``max(k_vectors, expand)`` columns start the basis.
    max_basis : int, optional
        Basis size that triggers a thick restart.
    expand : int, optional
        Residuals added to the basis per pass: those of the strongest unconverged pairs.
    backend : Backend, optional
        Overrides ``op.backend``.

    Raises
    ------
    ConvergenceError
        After ``max_passes`` applications; ``.result`` holds the best `EigResult`.
    """
    be = backend or getattr(op, "backend", None) or NUMPY
    xp = be.xp
    dim = op.shape[0]
    k_values = min(k_values, dim)
    guard = max(0, block - k_values)  # guard vectors on each side of the spectrum
    block = min(k_values + 2 * guard, dim)
    if max_basis is None:
        # keep basis and images within ~256 MB each
        max_basis = min(DEFAULT_MAX_BASIS, max(2 * block, (256 * 2**20) // (8 * dim)))
    max_basis = min(dim, max(max_basis, block + 1))
    expand = max(1, min(expand or DEFAULT_EXPAND, block))
    eps = float(np.finfo(np.float64).eps)
    # the first pass is as wide as the later ones: the warm start's leading (wanted) vectors
    width = min(block, max(k_vectors, expand))
    start = rng.standard_normal((dim, width))
    if v0 is not None and v0.shape[1]:
        j = min(v0.shape[1], width)
        start[:, :j] = be.to_numpy(v0[:, :j])
    basis = _orthonormalise(be.asarray(start), None, eps, xp)
    images = be.zeros((dim, 0))
    h = np.empty((0, 0))
    new = basis
    passes = 0
    while True:
        w_new = be.asarray(op.matmat(new), np.float64)
        passes += 1
        # The dense algebra of a pass works on matrices of at most D x (basis size): with
        # one BLAS thread it takes ~10 ms a pass; threaded BLAS on such small products and
        # on the eigh of H costs more than it gains (several times more on a busy machine).
        with single_threaded_blas():
            # grow the projected matrix H = Q^T C Q by the new block's row and column only
            cross = be.to_numpy(basis[:, : images.shape[1]].T @ w_new)
            corner = be.to_numpy(new.T @ w_new)
            h = np.block([[h, cross], [cross.T, (corner + corner.T) / 2]])
            images = xp.concat([images, w_new], axis=1)
            theta, y = np.linalg.eigh(h)
            order = _select(theta, k_values, guard)
            theta, y = theta[order], np.ascontiguousarray(y[:, order])
            y_d = be.asarray(y)
            ritz = basis @ y_d
            cu = images @ y_d
            resid = cu - ritz * be.asarray(theta)[None, :]
            rnorm = be.to_numpy(xp.linalg.vector_norm(resid, axis=0))
            scale = max(abs(float(theta[0])), np.finfo(np.float64).tiny)
            pending = _pending(theta, rnorm, scale, k_vectors, k_values, tol, value_tol, bulk_tol)
            # not converged before the basis can hold the Ritz block (the first pass is narrower)
            converged = not pending.any() and basis.shape[1] >= block
            result = EigResult(theta[:k_values], ritz, rnorm[:k_values], passes, converged)
            if converged:
                return result
            if passes >= max_passes:
                raise ConvergenceError(
                    f"block Krylov stopped after {passes} passes; largest relative residual "
                    f"{float(np.max(rnorm[:k_values] / scale)):.2e} > tol {tol:.1e}",
                    result,
                )
            # Expand with the residuals of the strongest few unconverged pairs: per applied
            # vector, a narrow expansion raises the Krylov degree faster than a wide block.
            # (Every pair pending only while the Ritz block is still being filled.)
            take = np.flatnonzero(pending) if pending.any() else np.arange(theta.shape[0])
            grow = xp.take(resid, be.asarray(take[:expand]), axis=1)
            if basis.shape[1] + grow.shape[1] > max_basis:
                # thick restart on the current Ritz block; C u is known, so no pass is spent
                basis, images, h = ritz, cu, np.diag(theta)
            new = _orthonormalise(grow, basis, 100 * eps, xp)
            if new.shape[1] == 0:
                if basis.shape[1] < block:  # the start block spans an invariant subspace
                    new = _orthonormalise(
                        be.asarray(rng.standard_normal((dim, expand))), basis, 100 * eps, xp
                    )
                if new.shape[1] == 0:  # the residuals lie in the basis: exact already
                    return EigResult(theta[:k_values], ritz, rnorm[:k_values], passes, True)
            basis = xp.concat([basis, new], axis=1)


def _select(theta: np.ndarray, k_values: int, guard: int) -> np.ndarray:
    """Indices of the Ritz block: the top ``k_values`` by |theta|, then the ``guard``
    largest-magnitude ones of each sign among the rest (the reported eigenvalues' nearest
    competitors sit at either end of the spectrum)."""
    order = _by_magnitude(theta)
    top, rest = order[:k_values], order[k_values:]
    positive = rest[theta[rest] > 0][:guard]
    negative = rest[theta[rest] <= 0][:guard]
    guards = np.concatenate([positive, negative])
    guards = guards[np.argsort(-np.abs(theta[guards]), kind="stable")]
    return np.concatenate([top, guards]).astype(np.intp)


def _guards_pending(
    theta: np.ndarray, rnorm: np.ndarray, k_values: int, slack: float, separated: np.ndarray
) -> np.ndarray:
    """Which guard pairs (those after the first ``k_values``) are still refined.

    Ritz values under-estimate the magnitudes at each end of the spectrum, so the eigenvalue
    near guard g may lie as far out as ``m = |theta_g| + r_g``. If ``m`` reaches the smallest
    reported magnitude, that eigenvalue (of the guard's sign) could belong among the reported
    ones; inserting it anywhere its magnitude allows changes the reported list at the ranks
    it passes: by ``m - |theta_j|`` at most where it lands, and by the step between
    consecutive reported values below it. The guard is refined while it could pass a
    ``separated`` value (reported to relative `VALUE_TOL`) or while that change could
    exceed ``slack``: always when it could pass a value of the other sign (a sign error),
    only to within ``slack`` inside the noise bulk, where consecutive values are closer.
    """
    guards = theta[k_values:]
    pending = np.zeros(guards.shape[0], dtype=bool)
    if guards.shape[0] == 0 or theta.shape[0] < k_values:
        return pending
    top = theta[:k_values]
    mags = np.abs(top)
    reach = np.abs(guards) + rnorm[k_values:]
    for i in np.flatnonzero(reach >= mags[-1]):
        sign = 1.0 if guards[i] > 0 else -1.0
        first = min(int(np.sum(mags >= reach[i])), k_values - 1)  # highest rank it can take
        passed = top[first:]
        if separated[first:k_values].any():
            pending[i] = True
            continue
        change = max(
            abs(sign * reach[i] - passed[0]),  # where it lands, at its largest
            float(np.max(np.abs(sign * np.abs(passed) - passed))),  # a value of other sign
            float(np.max(np.abs(np.diff(passed)), initial=0.0)),  # the shifted values below
        )
        pending[i] = change > slack
    return pending


def _pending(theta, rnorm, scale, k_vectors, k_values, tol, value_tol, bulk_tol) -> np.ndarray:
    """Which Ritz pairs are not converged: the first ``k_values`` (see `block_krylov_top`),
    then the guards (`_guards_pending`)."""
    k = theta.shape[0]
    gap = np.full(k, np.inf)
    if k > 1:
        diff = np.abs(theta[:, None] - theta[None, :])
        np.fill_diagonal(diff, np.inf)
        gap = diff.min(axis=1)
    separated = gap > SEPARATION * scale
    value_ok = np.where(
        separated,
        np.minimum(rnorm, rnorm**2 / np.maximum(gap, 1e-300)) <= value_tol * np.abs(theta),
        rnorm <= bulk_tol * scale,
    )
    pending = ~value_ok
    wanted_tol = np.full(min(k, k_vectors), tol * scale)
    if k > k_vectors:
        # the gap of each wanted value to the unwanted ones (r / gap bounds its sine-theta)
        out = np.abs(theta[:k_vectors, None] - theta[None, k_vectors:]).min(axis=1)
        wanted_tol = np.clip(WANTED_ANGLE * out, WANTED_FLOOR * tol * scale, tol * scale)
    pending[:k_vectors] |= rnorm[:k_vectors] > wanted_tol
    pending[k_values:] = _guards_pending(theta, rnorm, k_values, GUARD_SLACK * scale, separated)
    return pending
