"""The moment operator ``C_hat = (1/n) sum_mu y_mu (F_mu F_mu^T - I_D)`` (MODEL.md section 2).

Applied to blocks of vectors without ever forming the D x D matrix:

* q = 2, Hermite inputs: on symmetric d x d matrices,
  ``C_hat[V] = (1/n) sum y (x^T V x - tr V)/sqrt 2 * (x x^T - I)/sqrt 2``, two GEMMs per chunk
  with inner dimensions d and n, never building F.
* q = 3 (Hermite) and Gaussian-equivalent inputs: ``C_hat v = (1/n) F^T (y * F v)``, with F
  lifted chunk by chunk (q = 3) or the stored Gaussian features.

Labels must be centred (``sum y = 0``), which makes the ``-I`` term vanish in the second form;
the first form keeps its trace correction, which does not vanish.
"""

from __future__ import annotations

from ._backend import Backend
from ._features import feature_dim, lift, sym_to_vec, vec_to_sym

# Samples per chunk: small enough that the per-chunk intermediates (chunk x k x d) stay in
# cache (~2 MB), large enough that GEMMs run near peak (measured on 2 cores, d = 60: 256
# samples best for k = 18 vectors, 512-1024 for k = 4).
CHUNK_BYTES = 2 * 2**20
CHUNK_LIFT = 512


def q2_chunk(k: int, d: int) -> int:
    return int(min(1024, max(256, CHUNK_BYTES // (8 * k * d))))


class MomentOperator:
    """``C_hat`` as a linear operator on R^D (feature coordinates of `hsl_engine._features`).

    Parameters
    ----------
    inputs : ndarray, shape (n, d) for Hermite features or (n, D) for Gaussian ones
    labels : ndarray, shape (n,)
        Centred labels.
    q : {2, 3}
    features : {"hermite", "gaussian"}
    backend : Backend
    """

    def __init__(self, inputs, labels, *, q: int, features: str, backend: Backend):
        self.backend = backend
        self.inputs = inputs
        self.labels = labels
        self.q = q
        self.features = features
        self.n = inputs.shape[0]
        self.d = inputs.shape[1] if features == "hermite" else None
        self.dim = feature_dim(self.d, q) if features == "hermite" else inputs.shape[1]
        self.dtype = inputs.dtype
        self.passes = 0  # block applications so far
        self.flops = 0.0  # floating-point operations of those applications

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def flops_per_vector(self) -> float:
        """Multiply-adds x 2 per applied vector: two GEMMs over all samples."""
        if self.features == "hermite" and self.q == 2:
            return 4.0 * self.n * self.d * self.d
        return 4.0 * self.n * self.dim

    def matmat(self, v):
        """``C_hat @ v`` for v of shape (D, k); returns shape (D, k)."""
        k = v.shape[1]
        self.passes += 1
        self.flops += self.flops_per_vector() * k
        if self.features == "hermite" and self.q == 2:
            return self._matmat_q2(v)
        return self._matmat_explicit(v)

    # -- q = 2 on matrices --------------------------------------------------------------------
    def _matmat_q2(self, v):
        xp = self.backend.xp
        d, k = self.d, v.shape[1]
        g = vec_to_sym(xp.asarray(v.T, dtype=self.dtype), d)  # (k, d, d)
        gcat = xp.reshape(xp.permute_dims(g, (1, 0, 2)), (d, k * d))
        trace = xp.linalg.trace(g)
        x, y = self.inputs, self.labels

        def chunk(s: int, e: int):
            xb = x[s:e, :]
            m = e - s
            xg = xp.reshape(xb @ gcat, (m, k, d))
            quad = (xg @ xb[:, :, None])[:, :, 0]  # x^T G_j x, (m, k)
            w = (y[s:e, None] * 0.5) * (quad - trace[None, :])
            weighted = xp.reshape(xb[:, None, :] * w[:, :, None], (m, k * d))
            return (xp.matrix_transpose(xb) @ weighted, xp.sum(w, axis=0))

        parts = self.backend.map_reduce(chunk, self.n, q2_chunk(k, d))
        acc = sum(p[0] for p in parts)
        wsum = sum(p[1] for p in parts)
        out = xp.permute_dims(xp.reshape(acc, (d, k, d)), (1, 0, 2))
        out = out - wsum[:, None, None] * xp.eye(d, dtype=self.dtype)[None, :, :]
        return xp.matrix_transpose(sym_to_vec(out)) / self.n

    # -- explicit features, chunk by chunk ------------------------------------------------------
    def _features(self, s: int, e: int):
        block = self.inputs[s:e, :]
        return block if self.features == "gaussian" else lift(block, self.q)

    def _matmat_explicit(self, v):
        xp = self.backend.xp
        v = xp.asarray(v, dtype=self.dtype)
        y = self.labels

        def chunk(s: int, e: int):
            f = self._features(s, e)
            return (xp.matrix_transpose(f) @ ((f @ v) * y[s:e, None]),)

        parts = self.backend.map_reduce(chunk, self.n, CHUNK_LIFT)
        return sum(p[0] for p in parts) / self.n

    # -- dense ----------------------------------------------------------------------------------
    def dense(self):
        """The D x D matrix, built from explicit features (small D only)."""
        xp = self.backend.xp
        y = self.labels

        def chunk(s: int, e: int):
            f = self._features(s, e)
            return (xp.matrix_transpose(f) @ (f * y[s:e, None]),)

        parts = self.backend.map_reduce(chunk, self.n, CHUNK_LIFT)
        self.flops += 2.0 * self.n * self.dim * self.dim
        c = sum(p[0] for p in parts) / self.n
        # the -I term: (1/n) sum y * I vanishes for centred labels; keep it for exactness
        c = c - xp.mean(y) * xp.eye(self.dim, dtype=c.dtype)
        return (c + xp.matrix_transpose(c)) / 2


def dense_cost(n: int, dim: int) -> float:
    """Flops of building C_hat densely and diagonalising it."""
    return 2.0 * n * dim * dim + 10.0 * dim**3


def krylov_cost(
    n: int, d: int, dim: int, q: int, features: str, block: int, passes: float = 12.0
) -> float:
    """Flops of a warm-started block Krylov solve (``passes`` block applications)."""
    per_vector = 4.0 * n * d * d if (features == "hermite" and q == 2) else 4.0 * n * dim
    return passes * block * per_vector


def prefer_dense(n: int, d: int, dim: int, q: int, features: str, block: int) -> bool:
    """The ``auto`` rule: dense when it is cheaper and its D x D matrix is small (<= 0.5 GB)."""
    if dim * dim * 8 > 0.5 * 2**30:
        return False
    return dense_cost(n, dim) < krylov_cost(n, d, dim, q, features, block)
