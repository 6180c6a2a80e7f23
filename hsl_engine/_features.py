"""The degree-q Hermite (Wiener chaos) feature lift and its coordinates.

Coordinates of R^D are indexed by multisets ``a_1 <= ... <= a_q`` of input indices in
lexicographic order; coordinate ``alpha`` is ``prod_a He_{k_a}(x_a) / sqrt(k_a!)`` where
``k_a`` is the multiplicity of ``a``. For q = 2 this is the upper triangle of a symmetric
matrix in row-major order, with ``F_aa = (x_a^2 - 1)/sqrt 2`` and ``F_ab = x_a x_b``.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
from array_api_compat import array_namespace, device

SQRT2 = math.sqrt(2.0)


def feature_dim(d: int, q: int) -> int:
    """D = C(d + q - 1, q), the dimension of the degree-q chaos of d inputs."""
    return math.comb(d + q - 1, q)


@lru_cache(maxsize=16)
def _factor_index(d: int, q: int) -> np.ndarray:
    """For each coordinate, q flat indices into the table ``He_k(x_a)/sqrt(k!)``.

    The table has shape ``(n, (q + 1) * d)`` with entry ``k * d + a``; unused factors point at
    ``He_0 = 1``. Returns an int array of shape ``(D, q)``.
    """
    rows = []
    for combo in itertools.combinations_with_replacement(range(d), q):
        counts: dict[int, int] = {}
        for a in combo:
            counts[a] = counts.get(a, 0) + 1
        factors = [k * d + a for a, k in counts.items()]
        factors += [0] * (q - len(factors))  # column 0 of block k = 0 is He_0 = 1
        rows.append(factors)
    out = np.asarray(rows, dtype=np.intp)
    out.setflags(write=False)
    return out


def _hermite_table(x):
    """``He_k(x)/sqrt(k!)`` for k = 0..3, as an array of shape (n, 4 * d)."""
    xp = array_namespace(x)
    x2 = x * x
    return xp.concat(
        [xp.ones_like(x), x, (x2 - 1.0) / SQRT2, x * (x2 - 3.0) / math.sqrt(6.0)], axis=1
    )


def lift(x, q: int):
    """The explicit feature map F(x).

    Parameters
    ----------
    x : array, shape (n, d)
    q : {2, 3}

    Returns
    -------
    F : array, shape (n, D)
        Orthonormal degree-q Hermite features (unit variance, uncorrelated for x ~ N(0, I)).
    """
    xp = array_namespace(x)
    d = x.shape[1]
    table = _hermite_table(x)[:, : (q + 1) * d]
    idx = _factor_index(d, q)
    out = xp.take(table, _index(xp, x, idx[:, 0]), axis=1)
    for j in range(1, q):
        out = out * xp.take(table, _index(xp, x, idx[:, j]), axis=1)
    return out


def _index(xp, like, idx: np.ndarray):
    """An integer index array on the device of ``like``."""
    return xp.asarray(np.array(idx), device=device(like))  # a copy: tensors must be writable


@lru_cache(maxsize=16)
def _triu(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = np.triu_indices(d)
    scale = np.where(rows == cols, 1.0, SQRT2)
    for a in (rows, cols, scale):
        a.setflags(write=False)
    return rows, cols, scale


def sym_to_vec(g):
    """Symmetric matrices ``(..., d, d)`` to q = 2 coordinates ``(..., D)``.

    The map is an isometry (Frobenius norm to Euclidean norm) and
    ``<vec(G), F(x)> = (x^T G x - tr G) / sqrt 2``.
    """
    xp = array_namespace(g)
    d = g.shape[-1]
    rows, cols, scale = _triu(d)
    flat = xp.reshape(g, (*g.shape[:-2], d * d))
    out = xp.take(flat, _index(xp, g, rows * d + cols), axis=-1)
    return out * xp.asarray(np.array(scale), dtype=g.dtype, device=device(g))


def vec_to_sym(v, d: int):
    """Inverse of `sym_to_vec`: ``(..., D)`` to symmetric ``(..., d, d)``."""
    xp = array_namespace(v)
    rows, cols, scale = _triu(d)
    half = v / xp.asarray(np.array(scale), dtype=v.dtype, device=device(v))
    lead = v.shape[:-1]
    flat = xp.zeros((*lead, d * d), dtype=v.dtype, device=device(v))
    # scatter the upper triangle, then mirror it
    flat = _scatter(flat, _index(xp, v, rows * d + cols), half)
    g = xp.reshape(flat, (*lead, d, d))
    diag = xp.reshape(xp.eye(d, dtype=v.dtype, device=device(v)), (1,) * len(lead) + (d, d))
    return g + xp.matrix_transpose(g) - g * diag


def _scatter(flat, index: np.ndarray, values):
    # The array API has no scatter yet; NumPy and PyTorch support index assignment.
    flat[..., index] = values
    return flat
