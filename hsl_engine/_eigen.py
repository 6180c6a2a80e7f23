"""Top eigenpairs by absolute value: a restarted block Krylov method and a dense reference.

The moment matrix has spikes of both signs, so "top" means largest ``|theta|``. The iterative
method is a block Krylov (block Davidson with identity preconditioner) iteration: each pass
applies the operator to the residuals of the unconverged Ritz vectors, orthogonalised against
the basis, followed by Rayleigh-Ritz over the whole basis. Because ``C Q`` is kept for every
basis vector, Ritz vectors, residuals and thick restarts cost no extra operator applications.
Converged vectors stop generating new directions ("soft locking"), so later passes get cheaper.
The iteration is warm-started from the previous sample size of the same seed.

Convergence test: ``||C u_i - theta_i u_i|| <= tol * |theta_1|`` for the wanted vectors, and
``<= max(tol, 1e-2) * |theta_1|`` for the extra eigenvalues that are only reported (an
eigenvalue's error is bounded by its residual norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ._errors import ConvergenceError

EXTRA_VALUE_TOL = 1e-2
DEFAULT_EXPAND = 4
DEFAULT_MAX_BASIS = 360


@dataclass(frozen=True)
class EigResult:
    """Top eigenpairs of a symmetric operator by absolute eigenvalue.

    Attributes
    ----------
    values : ndarray, shape (k_values,)
        Signed eigenvalues, ordered by decreasing absolute value.
    vectors : ndarray, shape (D, k_block)
        Orthonormal Ritz vectors, same order (at least ``k_vectors`` columns).
    residuals : ndarray, shape (k_values,)
        Residual norms ``||C u - theta u||``.
    passes : int
        Block operator applications.
    converged : bool
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    passes: int
    converged: bool


def _by_magnitude(theta: np.ndarray) -> np.ndarray:
    # stable order: |theta| descending, ties broken by sign then index
    return np.lexsort((-theta, -np.abs(theta)))


def dense_top(c: np.ndarray, k_values: int, k_block: int) -> EigResult:
    """Reference: full ``eigh`` of the dense matrix, top ``max(k_values, k_block)`` by |theta|."""
    theta, u = scipy.linalg.eigh(c)
    order = _by_magnitude(theta)
    k = max(k_values, k_block)
    vals = theta[order[:k]]
    vecs = u[:, order[:k]]
    res = np.linalg.norm(c @ vecs - vecs * vals, axis=0)
    return EigResult(vals[:k_values], vecs[:, :k_block], res[:k_values], 1, True)


def _orthonormalise(z: np.ndarray, basis: np.ndarray | None, drop: float) -> np.ndarray:
    """Columns of z made orthonormal and orthogonal to ``basis`` (two passes of CGS)."""
    for _ in range(2):
        if basis is not None and basis.shape[1]:
            z = z - basis @ (basis.T @ z)
    norms = np.linalg.norm(z, axis=0)
    keep = norms > drop * max(1.0, float(norms.max(initial=0.0)))
    z = z[:, keep]
    if z.shape[1] == 0:
        return z
    qmat, r = np.linalg.qr(z)
    # drop directions that QR finds (numerically) dependent
    good = np.abs(np.diag(r)) > drop * np.abs(np.diag(r)).max(initial=1.0)
    qmat = qmat[:, good]
    if basis is not None and basis.shape[1]:
        qmat = qmat - basis @ (basis.T @ qmat)
        qmat, _ = np.linalg.qr(qmat)
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
    v0: np.ndarray | None = None,
    max_basis: int | None = None,
    expand: int | None = None,
) -> EigResult:
    """Top eigenpairs by |theta| of a symmetric operator given by ``op.matmat``.

    Parameters
    ----------
    op : object with ``shape`` (D, D), ``dtype`` and ``matmat(v: (D, k)) -> (D, k)``
    k_vectors : int
        Eigenvectors wanted to tolerance ``tol``.
    k_values : int
        Eigenvalues reported (>= k_vectors), to tolerance ``max(tol, 1e-2)``.
    block : int
        Ritz vectors kept and refined (>= k_values).
    tol : float
        Relative residual tolerance.
    max_passes : int
        Most operator applications.
    rng : numpy.random.Generator
        Fills the start block where ``v0`` has fewer than ``block`` columns.
    v0 : ndarray, shape (D, j), optional
        Warm start (e.g. the Ritz vectors of the previous sample size).
    max_basis : int, optional
        Basis size that triggers a thick restart (default 360, less for very large D).
    expand : int, optional
        Residuals added to the basis per pass (default 4): the strongest unconverged pairs.

    Raises
    ------
    ConvergenceError
        After ``max_passes`` applications; ``.result`` holds the best `EigResult`.
    """
    dim = op.shape[0]
    dtype = np.dtype(op.dtype)
    block = min(max(block, k_values), dim)
    if max_basis is None:
        # a long basis avoids restarts, which slow convergence in the clustered bulk;
        # keep basis and images within ~256 MB each
        max_basis = min(DEFAULT_MAX_BASIS, max(2 * block, (256 * 2**20) // (8 * dim)))
    max_basis = min(dim, max(max_basis, block + 1))
    expand = max(1, min(expand or DEFAULT_EXPAND, block))
    eps = float(np.finfo(dtype).eps)
    start = rng.standard_normal((dim, block))
    if v0 is not None and v0.shape[1]:
        j = min(v0.shape[1], block)
        start[:, :j] = v0[:, :j]
    basis = _orthonormalise(start.astype(np.float64), None, eps)
    images = np.empty((dim, 0))
    h = np.empty((0, 0))
    new = basis
    passes = 0
    while True:
        w_new = np.asarray(op.matmat(new.astype(dtype)), np.float64)
        passes += 1
        # grow the projected matrix H = Q^T C Q by the new block's row and column only
        cross = basis[:, : images.shape[1]].T @ w_new
        corner = new.T @ w_new
        h = np.block([[h, cross], [cross.T, (corner + corner.T) / 2]])
        images = np.concatenate([images, w_new], axis=1)
        theta, y = np.linalg.eigh(h)
        order = _by_magnitude(theta)[:block]
        theta, y = theta[order], y[:, order]
        ritz = basis @ y
        cu = images @ y
        resid = cu - ritz * theta
        rnorm = np.linalg.norm(resid, axis=0)
        scale = max(abs(float(theta[0])), np.finfo(np.float64).tiny)
        limits = np.full(block, np.inf)
        limits[:k_values] = max(tol, EXTRA_VALUE_TOL) * scale
        limits[:k_vectors] = tol * scale
        pending = rnorm > limits
        converged = not pending[:k_values].any()
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
        grow = resid[:, np.flatnonzero(pending)[:expand]]
        if basis.shape[1] + grow.shape[1] > max_basis:
            # thick restart on the current Ritz block; C u is known, so no pass is spent
            basis, images, h = ritz, cu, np.diag(theta)
        new = _orthonormalise(grow, basis, 100 * eps)
        if new.shape[1] == 0:  # the residuals lie in the basis: numerically exact already
            return EigResult(theta[:k_values], ritz, rnorm[:k_values], passes, True)
        basis = np.concatenate([basis, new], axis=1)
