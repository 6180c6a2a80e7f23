"""Top eigenpairs by absolute value: a restarted block Krylov method and a dense reference.

The moment matrix has spikes of both signs, so "top" means largest ``|theta|``. The iterative
method is a block Krylov (block Davidson with identity preconditioner) iteration: each pass
applies the operator to the residuals of the unconverged Ritz vectors, orthogonalised against
the basis, followed by Rayleigh-Ritz over the whole basis. Because ``C Q`` is kept for every
basis vector, Ritz vectors, residuals and thick restarts cost no extra operator applications.
Converged vectors stop generating new directions ("soft locking"), so later passes get cheaper.
The iteration is warm-started from the previous sample size of the same seed.

Each pass applies the operator to ``expand`` = 8 vectors at once: on 2 cores a q = 2 pass of
8 vectors runs at ~60 % of the float32 GEMM peak, one of 4 at ~45 %, which outweighs the ~10 %
more vectors the wider expansion needs (measured on the fig2-cpu sweep).

Convergence test (see `block_krylov_top`): the wanted vectors to ``tol``; the reported
eigenvalues that stand apart from the rest to relative 1e-5 through the quadratic bound
``r^2 / gap``; reported eigenvalues inside the noise bulk to 1e-2 (what the spectrum plot
needs); and 4 unreported guard vectors beyond them, so the reported ones are the true top
ones rather than a Ritz value that stands in for an eigenvalue not yet found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from ._backend import Backend, numpy_backend
from ._errors import ConvergenceError

NUMPY = numpy_backend()

# Relative accuracy of the reported eigenvalues that stand apart from the rest
VALUE_TOL = 1e-5
# Relative residual of reported eigenvalues inside the noise bulk (what the spectrum plot
# needs), and the gap to the nearest other Ritz value, relative to |theta_1|, below which an
# eigenvalue counts as in the bulk
BULK_TOL = 1e-2
SEPARATION = 1e-2
DEFAULT_EXPAND = 8
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
    theta = u = None
    if be.is_torch:
        theta_d, u = xp.linalg.eigh(c)
        theta = be.to_numpy(theta_d)
    elif dim > FULL_EIGH_DIM and k < dim // 4 and not all_values:
        if v0 is not None and v0.shape[1]:
            start = np.asarray(v0).sum(axis=1)
        else:
            start = (rng or np.random.default_rng(0)).standard_normal(dim)
        try:
            theta, u = scipy.sparse.linalg.eigsh(
                c, k=k, which="LM", v0=start, ncv=min(dim, max(2 * k + 1, 80)), tol=0.0
            )
        except scipy.sparse.linalg.ArpackNoConvergence:
            theta = None
    if theta is None:
        theta, u = scipy.linalg.eigh(c)
    everything = _by_magnitude(theta)
    order = everything[:k]
    vals = theta[order]
    vecs = xp.take(u, be.asarray(order), axis=1)
    res = be.to_numpy(xp.linalg.vector_norm(c @ vecs - vecs * be.asarray(vals)[None, :], axis=0))
    values = np.asarray(theta)[everything] if all_values else vals[:k_values]
    return EigResult(values, vecs[:, :k_block], res[:k_values], 1, True)


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

    * the ``k_vectors`` wanted vectors: ``r_i <= tol |theta_1|``;
    * the reported eigenvalues (``k_values``): separated ones (``gap_i > SEPARATION
      |theta_1|``) to relative accuracy ``value_tol`` through the bound
      ``|theta_i - lambda_i| <= r_i^2 / gap_i``; the others, inside the noise bulk where only
      the spectrum plot uses them, to ``r_i <= bulk_tol |theta_1|``;
    * ``block - k_values`` guard vectors on each side of the spectrum (the next Ritz values
      of each sign): one is refined while ``|theta_g| + r_g`` reaches the smallest reported
      magnitude, so an eigenvalue the basis has not resolved yet cannot hide behind the
      reported ones (Ritz values under-estimate the magnitudes at both ends).

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
        Fills the start block where ``v0`` has fewer than ``block`` columns.
    v0 : array, shape (D, j), optional
        Warm start (e.g. the Ritz vectors of the previous sample size).
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
    start = rng.standard_normal((dim, block))
    if v0 is not None and v0.shape[1]:
        j = min(v0.shape[1], block)
        start[:, :j] = be.to_numpy(v0[:, :j])
    basis = _orthonormalise(be.asarray(start), None, eps, xp)
    images = be.zeros((dim, 0))
    h = np.empty((0, 0))
    new = basis
    passes = 0
    while True:
        w_new = be.asarray(op.matmat(new), np.float64)
        passes += 1
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
        # a guard whose Ritz value could still grow past the smallest reported one (Ritz
        # values under-estimate the magnitudes at each end of the spectrum) is refined too
        cutoff = abs(float(theta[k_values - 1])) if theta.shape[0] >= k_values else 0.0
        pending[k_values:] = np.abs(theta[k_values:]) + rnorm[k_values:] >= cutoff
        converged = not pending.any()
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
        grow = xp.take(resid, be.asarray(np.flatnonzero(pending)[:expand]), axis=1)
        if basis.shape[1] + grow.shape[1] > max_basis:
            # thick restart on the current Ritz block; C u is known, so no pass is spent
            basis, images, h = ritz, cu, np.diag(theta)
        new = _orthonormalise(grow, basis, 100 * eps, xp)
        if new.shape[1] == 0:  # the residuals lie in the basis: numerically exact already
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


def _pending(theta, rnorm, scale, k_vectors, k_values, tol, value_tol, bulk_tol) -> np.ndarray:
    """Which of the first ``k_values`` Ritz pairs are not converged (see `block_krylov_top`)."""
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
    pending[:k_vectors] |= rnorm[:k_vectors] > tol * scale
    pending[k_values:] = False
    return pending
