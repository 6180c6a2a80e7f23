"""The moment operator ``C_hat = (1/n) sum_mu y_mu (F_mu F_mu^T - I_D)`` (docs/model.md section 2).

Applied to blocks of vectors without ever forming the D x D matrix, one chunk of samples at a
time (stored, or regenerated from the chunk-keyed stream: see `hsl_engine._data`):

* q = 2, Hermite inputs, NumPy backend (``form="lifted"``): ``C_hat v = (1/n) sum y (F . v) F``
  with F formed in vector registers inside the explicit-SIMD pass `hsl_engine._simd`
  (engine 0.9.0), 4 D flops per row and vector: about half the work of the matrix form at
  D = d (d + 1)/2. The vectors go into the pass's cyclic layout and the sums come back.
* q = 2, Hermite inputs, PyTorch backend (``form="matrix"``, the paper's form, also
  selectable on NumPy): on symmetric d x d matrices,
  ``C_hat[V] = (1/n) sum y (x^T V x - tr V)/sqrt 2 * (x x^T - I)/sqrt 2``, two GEMMs per chunk
  with inner dimensions d and n, never building F: 4 d^2 flops per row and vector, in large
  kernels that suit a GPU.
* q = 3 (Hermite) and Gaussian-equivalent inputs: ``C_hat v = (1/n) F^T (y * F v)``, with F
  lifted chunk by chunk (q = 3) or the Gaussian features themselves.

The GEMMs run in the solver's dtype (float32 halves the time and the stored bytes); every
partial sum over at most ~1000 samples is accumulated in float64, and chunks are added in
chunk order, so the result is the same whatever the thread count or the storage.

Labels must be centred (``sum y = 0``), which makes the ``-I`` term vanish in the second form;
the first form keeps its trace correction, which does not vanish.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._backend import Backend, single_threaded_blas
from ._compiled import weigh_rows
from ._features import feature_dim, lift, sym_to_vec, vec_to_sym
from ._simd import lifted_pass

# Rows per GEMM block inside a chunk: the (rows, k d) buffer of ``x G_j`` about 512 KiB, so
# it stays in L2 between its GEMM, the compiled row pass and the second GEMM. Measured on one
# core, d = 60, engine 0.7.0 (GFLOP/s at 128 / 256 / 512 / 1024 rows): float64 k = 4 48.6 /
# 50.3 / 49.7 / 44.9, k = 8 54.6 / 53.6 / 50.5 / 48.7; float32 k = 4 90.9 / 104.7 / 108.9 /
# 107.4, k = 8 98.1 / 108.0 / 111.4 / 100.3 (the earlier 2 MiB rule took 1024 rows at k = 4).
CHUNK_BYTES = 2**19
CHUNK_LIFT = 512
ARRAY_ROWS = 4096  # chunk rows when the operator is given plain arrays


def q2_chunk(k: int, d: int, itemsize: int) -> int:
    return int(min(1024, max(256, CHUNK_BYTES // (itemsize * k * d))))


class ArraySamples:
    """Plain arrays (NumPy or PyTorch) behind the chunk interface of
    `hsl_engine._data.SampleView`."""

    def __init__(self, inputs, labels, rows: int = ARRAY_ROWS):
        self.inputs, self._labels = inputs, labels
        self.n = inputs.shape[0]
        self.shape = tuple(inputs.shape)
        self.dtype = np.dtype(str(inputs.dtype).removeprefix("torch."))
        self.rows = rows

    def n_chunks(self) -> int:
        return -(-self.n // self.rows)

    def block(self, c: int):
        s = c * self.rows
        return self.inputs[s : s + self.rows], self._labels[s : s + self.rows]


def as_samples(inputs, labels=None):
    """A chunked sample source: a `SampleView` as it is, or arrays wrapped."""
    if hasattr(inputs, "block"):
        return inputs
    return ArraySamples(inputs, labels)


class MomentOperator:
    """``C_hat`` as a linear operator on R^D (feature coordinates of `hsl_engine._features`).

    Parameters
    ----------
    inputs : ndarray, shape (n, d) (Hermite) or (n, D) (Gaussian), or a `SampleView`
    labels : ndarray, shape (n,), optional
        With arrays: the labels. A view brings its own.
    q : {2, 3}
    features : {"hermite", "gaussian"}
    backend : Backend
    dtype : numpy dtype, optional
        Type of the GEMMs (default: the inputs' type). Sums are float64.
    shift, scale : float
        The operator uses ``(y - shift) * scale``: centred (and standardised) labels.
    bounds : (float, float), optional
        Clip those to ``[lo, hi]`` and subtract ``offset``, the clipped labels' mean (the
        method's ``label_clip``, `hsl_engine._spectral.label_map`): the labels stay centred.
    offset : float
    form : {"auto", "lifted", "matrix"}
        How q = 2 Hermite passes run: ``lifted`` (compiled, NumPy backend only), ``matrix``
        (d x d matrices, any backend), ``auto`` (lifted on NumPy, matrix on PyTorch). The
        two agree to rounding; other features ignore it.
    """

    def __init__(
        self,
        inputs,
        labels=None,
        *,
        q: int,
        features: str,
        backend: Backend,
        dtype=None,
        shift: float = 0.0,
        scale: float = 1.0,
        bounds: tuple[float, float] | None = None,
        offset: float = 0.0,
        form: str = "auto",
    ):
        self.backend = backend
        if labels is not None and not hasattr(inputs, "block"):
            inputs, labels = backend.asarray(inputs), backend.asarray(labels)
        self.samples = as_samples(inputs, labels)
        self.q = q
        self.features = features
        self.n = self.samples.n
        width = self.samples.shape[1]
        self.d = width if features == "hermite" else None
        self.dim = feature_dim(width, q) if features == "hermite" else width
        self.dtype = np.dtype(dtype if dtype is not None else self.samples.dtype)
        self._dt = backend.dtype(self.dtype)  # the GEMMs' type in the backend's terms
        self._f64 = backend.dtype(np.float64)
        self.shift, self.scale = float(shift), float(scale)
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        self.offset = float(offset)
        if form not in ("auto", "lifted", "matrix"):
            raise ValueError(f"form must be 'auto', 'lifted' or 'matrix', not {form!r}")
        if form == "lifted" and backend.is_torch:
            raise ValueError("form='lifted' runs on the NumPy backend only")
        self.form = ("matrix" if backend.is_torch else "lifted") if form == "auto" else form
        # each chunk's inputs and transformed labels (`labels`, in the pass's type), kept
        # between passes where the samples are stored anyway and the inputs need no
        # conversion: n more numbers, against ~70-85 us a chunk and pass to transform them again
        keep = getattr(self.samples, "stored", True) and self.samples.dtype == self.dtype
        self._kept: dict[int, tuple[Any, Any]] | None = {} if keep else None
        self.passes = 0  # block applications so far
        self.vectors = 0  # vectors applied so far (sum of block widths)
        self.flops = 0.0  # floating-point operations of those applications

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def flops_per_vector(self) -> float:
        """Multiply-adds x 2 per applied vector: two products over all samples (on D lifted
        coordinates, or on d x d matrices in the matrix form)."""
        if self.q == 2 and self.features == "hermite" and self.form == "lifted":
            return 4.0 * self.n * self.dim
        return flops_per_vector(self.n, self.d or 0, self.dim, self.q, self.features)

    def labels(self, y):
        """The labels the operator uses, ``T(y)``, in float64 (see the parameters)."""
        t = (y - self.shift) * self.scale
        if self.bounds is None:
            return t
        return self.backend.xp.clip(t, *self.bounds) - self.offset

    def _chunk(self, c: int):
        kept = self._kept.get(c) if self._kept is not None else None
        if kept is not None:
            return kept
        xp = self.backend.xp
        x, y = self.samples.block(c)
        pair = xp.astype(x, self._dt, copy=False), xp.astype(self.labels(y), self._dt, copy=False)
        if self._kept is not None:
            self._kept[c] = pair
        return pair

    def matmat(self, v):
        """``C_hat @ v`` for v of shape (D, k) (a backend array, or NumPy); returns a float64
        backend array of shape (D, k)."""
        k = v.shape[1]
        self.passes += 1
        self.vectors += k
        self.flops += self.flops_per_vector() * k
        v = self.backend.asarray(v, np.float64)
        if self.features == "hermite" and self.q == 2:
            return self._matmat_lifted(v) if self.form == "lifted" else self._matmat_q2(v)
        return self._matmat_explicit(v)

    # -- q = 2 on lifted coordinates (compiled, NumPy) ------------------------------------------
    def _matmat_lifted(self, v):
        k = v.shape[1]
        kernel = lifted_pass(self.d, self.dtype)
        vc = kernel.vectors(v.T)
        free: list[np.ndarray] = []  # sums already added, to reuse (a fresh 64-byte aligned
        # array per chunk cost ~60 us in page faults at d = 60)

        items = _lifted_items(self.samples.n_chunks(), k, self.backend.threads)

        def chunk(i: int):
            c, part = items[i]
            x, y = self._chunk(c)
            try:
                out = free.pop()
                out.fill(0)
            except IndexError:
                out = kernel.sums(vc)
            x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
            if part is None:
                kernel(x, y, vc, out)
            else:  # some of the vectors; the other rows of out stay zero
                kernel(x, y, vc[part], out[part])
            return (out,)

        acc = self.backend.ordered_sum(
            chunk, len(items), release=lambda part: free.append(part[0])
        )[0]
        return kernel.coordinates(acc)[:k].T / self.n

    # -- q = 2 on matrices --------------------------------------------------------------------
    def _matmat_q2(self, v):
        xp, f64 = self.backend.xp, self._f64
        d, k = self.d, v.shape[1]
        g = vec_to_sym(v.T, d)  # (k, d, d)
        gcat = xp.astype(xp.reshape(xp.permute_dims(g, (1, 0, 2)), (d, k * d)), self._dt)
        trace = xp.astype(xp.sum(xp.linalg.diagonal(g), axis=-1), self._dt)
        rows = self._rows(q2_chunk(k, d, self.dtype.itemsize), k * d)

        def chunk(c: int):
            x, y = self._chunk(c)
            if not self.backend.is_torch:
                return _q2_chunk_numpy(x, y, gcat, trace, rows)
            acc = self.backend.zeros((d, k * d))
            wsum = self.backend.zeros((k,))
            for s in range(0, x.shape[0], rows):
                xb, yb = x[s : s + rows], y[s : s + rows]
                m = xb.shape[0]
                xg = xp.reshape(xb @ gcat, (m, k, d))
                quad = xp.matmul(xg, xb[:, :, None])[:, :, 0]  # x^T G_j x, (m, k)
                w = (yb[:, None] * 0.5) * (quad - trace[None, :])
                weighted = xp.reshape(xb[:, None, :] * w[:, :, None], (m, k * d))
                acc += xb.T @ weighted  # float64 sums of float32 products
                wsum += xp.sum(w, axis=0, dtype=f64)
            return acc, wsum

        acc, wsum = self.backend.ordered_sum(chunk, self.samples.n_chunks())
        out = xp.permute_dims(xp.reshape(acc, (d, k, d)), (1, 0, 2))
        out = out - wsum[:, None, None] * self.backend.eye(d)[None, :, :]
        out = (out + xp.permute_dims(out, (0, 2, 1))) / 2  # symmetric up to rounding
        return sym_to_vec(out).T / self.n

    def _rows(self, cpu_rows: int, width: int) -> int:
        """Rows per GEMM inside a chunk: cache-sized on the CPU (NumPy), whole chunks up to
        ~128 MB of intermediates with PyTorch (few, large kernels on a GPU)."""
        if not self.backend.is_torch:
            return cpu_rows
        return int(max(cpu_rows, (128 * 2**20) // (4 * max(1, width))))

    # -- explicit features, chunk by chunk ------------------------------------------------------
    def _features(self, x):
        return x if self.features == "gaussian" else lift(x, self.q)

    def _matmat_explicit(self, v):
        xp = self.backend.xp
        vv = xp.astype(v, self._dt, copy=False)
        rows = self._rows(CHUNK_LIFT, self.dim)

        def chunk(c: int):
            x, y = self._chunk(c)
            acc = self.backend.zeros(tuple(v.shape))
            for s in range(0, x.shape[0], rows):
                f = self._features(x[s : s + rows])
                acc += f.T @ ((f @ vv) * y[s : s + rows, None])
            return (acc,)

        return self.backend.ordered_sum(chunk, self.samples.n_chunks())[0] / self.n

    # -- dense ----------------------------------------------------------------------------------
    def chunk_moments(self, c: int, stop: int | None = None, *, raw: bool = False):
        """``(sum y F F^T,)`` over chunk c (its first ``stop`` rows), float64, shape (D, D).

        With ``raw``, ``y`` are the untransformed labels and ``sum F F^T`` comes second:
        the sums `DenseAccumulator` keeps so that any later centring can be applied.
        """
        xp = self.backend.xp
        x, y = self.samples.block(c)
        if stop is not None:
            x, y = x[:stop], y[:stop]
        x = xp.astype(x, self._dt, copy=False)
        if raw and self.bounds is not None:
            raise ValueError("raw sums cannot carry clipped labels (see DenseAccumulator)")
        y = xp.astype(y if raw else self.labels(y), self._dt, copy=False)
        s_y = self.backend.zeros((self.dim, self.dim))
        s_1 = self.backend.zeros((self.dim, self.dim)) if raw else None
        rows = self._rows(CHUNK_LIFT, self.dim)
        for s in range(0, x.shape[0], rows):
            f = self._features(x[s : s + rows])
            s_y += f.T @ (f * y[s : s + rows, None])
            if raw:
                s_1 += f.T @ f
        return (s_y, s_1) if raw else (s_y,)

    def dense(self):
        """The D x D matrix, built from explicit features chunk by chunk (small D only)."""
        self.flops += 2.0 * self.n * self.dim * self.dim
        total = self.backend.ordered_sum(self.chunk_moments, self.samples.n_chunks())[0]
        # the -I term: (1/n) sum y * I vanishes for centred labels
        c = total / self.n
        return (c + c.T) / 2


class DenseAccumulator:
    """``C_hat`` over the nested prefixes of one stream, for a sweep of growing n.

    Centring (and standardising) the labels depends on n, so the raw sums ``S_y = sum y F F^T``
    and ``S_1 = sum F F^T`` are kept, and ``C_hat = scale (S_y - shift S_1) / n`` (the ``-I``
    term vanishes for centred labels). That is two GEMMs per sample, once per sample for the
    whole sweep. Clipped labels (``bounds``) cannot be recovered from such sums: an operator
    with them builds its matrix from all n samples instead (`MomentOperator.dense`).
    Complete chunks are added once, in chunk order; a partial last chunk is added to a copy,
    so the matrix at n does not depend on which smaller n came before.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.s_y = self.s_1 = None  # backend arrays, allocated at the first moment
        self.chunks_done = 0

    def moment(self, op: MomentOperator) -> np.ndarray:
        rows = op.samples.rows
        complete = op.n // rows
        if self.s_y is None:
            shape = (self.dim, self.dim)
            self.s_y, self.s_1 = op.backend.zeros(shape), op.backend.zeros(shape)
        if complete < self.chunks_done:
            raise ValueError("DenseAccumulator needs non-decreasing n")
        if complete > self.chunks_done:
            first = self.chunks_done
            # chunk by chunk onto the running sums (copies: a chunk that raises leaves them
            # as they were), so the sums at n are rounded alike whichever smaller n came
            # before: a run resumed at some n gives an uninterrupted run's points bit for bit
            self.s_y, self.s_1 = op.backend.ordered_sum(
                lambda i: op.chunk_moments(first + i, raw=True),
                complete - first,
                initial=(self.s_y + 0.0, self.s_1 + 0.0),
            )
            op.flops += 4.0 * (complete - first) * rows * self.dim**2
            self.chunks_done = complete
        s_y, s_1 = self.s_y, self.s_1
        tail = op.n - complete * rows
        if tail:
            with single_threaded_blas():  # as the chunks above: rounding whatever the cores
                t_y, t_1 = op.chunk_moments(complete, tail, raw=True)
            s_y, s_1 = s_y + t_y, s_1 + t_1
            op.flops += 4.0 * tail * self.dim**2
        c = (s_y - op.shift * s_1) * (op.scale / op.n)
        return (c + c.T) / 2


def _lifted_items(count: int, k: int, threads: int) -> list[tuple[int, slice | None]]:
    """The work items of a lifted pass over ``count`` chunks on ``k`` vectors: every chunk on
    all vectors, but with several threads the last ``threads`` chunks each split into
    ``threads`` parts of the vectors, so that the threads finish together. (A pass of 53
    chunks on 2 threads, n = 216000, d = 60, 4 vectors: one thread's kernel time was 2.9 ms
    shorter than the other's in a 52 ms pass; the split made the bench's largest point
    1.02-1.07x faster in alternating processes.)

    The sums do not change: each vector's sums over a chunk are the same whatever vectors it
    is computed with (`hsl_engine._simd`), a part's item leaves the other vectors' rows at
    zero, and adding an exact zero changes no sum (the float64 sums start from +0, so none
    is -0)."""
    size = -(-k // max(threads, 1))
    parts = [slice(j, min(j + size, k)) for j in range(0, k, size)]
    tail = min(count, threads) if len(parts) > 1 else 0
    items: list[tuple[int, slice | None]] = [(c, None) for c in range(count - tail)]
    items += [(c, part) for c in range(count - tail, count) for part in parts]
    return items


def _q2_chunk_numpy(x, y, gcat, trace, rows: int):
    """One chunk of the q = 2 pass on the CPU: ``(sum w x x^T, sum w)`` in float64, with
    ``w_j = y (x^T G_j x - tr G_j) / 2`` per row.

    The same arithmetic as the generic lines of `MomentOperator._matmat_q2`, shaped for one
    CPU core: per block of rows, one GEMM writes ``x G_j`` into a buffer, the compiled
    `hsl_engine._compiled.weigh_rows` overwrites it with the weighted rows, and a second
    GEMM adds ``x^T`` times them into a float64 sum (in float32 the products are summed over
    at most ~1000 rows inside the GEMM).
    """
    d = x.shape[1]
    k = gcat.shape[1] // d
    acc = np.zeros((d, k * d))
    wsum = np.zeros(k)
    height = min(rows, x.shape[0])
    buf = np.empty((height, k * d), x.dtype)
    for s in range(0, x.shape[0], rows):
        xb, yb = x[s : s + rows], y[s : s + rows]
        m = xb.shape[0]
        xg = np.matmul(xb, gcat, out=buf[:m])
        weigh_rows(xg.reshape(m, k, d), xb, yb, trace, wsum)
        acc += xb.T @ buf[:m]
    return acc, wsum


def flops_per_vector(n: float, d: float, dim: float, q: int, features: str) -> float:
    """Flops of applying C_hat to one vector: two products over all n samples, for q = 2
    Hermite counted in the matrix form (4 n d^2), the unit of the cost model's work
    (`hsl_engine._estimate`) whichever form runs; `MomentOperator.flops_per_vector` counts
    what its form does."""
    if features == "hermite" and q == 2:
        return 4.0 * n * d * d
    return 4.0 * n * dim
