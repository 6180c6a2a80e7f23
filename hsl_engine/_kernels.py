"""Kernel ridge regression baselines fitted on nested training prefixes.

The experiment sweeps the sample size n upwards, and for one seed the training set at size n
is the first n rows of one fixed stream. :class:`KernelRidgeSweep` solves kernel ridge
regression (KRR) with an unpenalised intercept exactly while n is at most ``n_landmarks``, and
with a Nystroem approximation on the first ``n_landmarks`` rows beyond that. In the Nystroem
regime the sufficient statistics of the ridge problem are sums over rows, so when successive
calls pass growing prefixes of the same stream only the new rows are processed.

Backends: one code path for NumPy and PyTorch (CPU or CUDA), written against the array
namespace of the test inputs (array-api-compat). Training rows (arrays or lazy views of a
sample stream) are brought block by block into that namespace and onto that device, and
predictions come back in it. The hot work runs there: kernel blocks, the Nystroem sums
``Phi^T Phi``, ``Phi^T y``, ``Phi^T 1`` over row blocks, and the predictions over test blocks.

On the CPU (NumPy) the products run in fixed tiles with single-threaded BLAS, shared out to
chunk threads, so the numbers are the same on any number of cores (see `_TILE_ROWS`).

The small dense linear algebra runs on the host with SciPy, on both backends: the
eigendecomposition of the (m, m) landmark kernel, the Cholesky solve of the (r, r) Nystroem
normal equations (r <= m) and, in the exact regime (n <= m), the Cholesky solve of the
(n, n) kernel system. These matrices are at most ``n_landmarks`` wide, so one copy to the host
and an O(m^3) LAPACK call are small next to the O(n m (d + m)) streaming; and the same LAPACK
routines on both backends make the same decisions (which eigen-directions fall below the
cut-off, whether a factorisation fails), so the backends differ by rounding in the device
GEMMs only, and the NumPy path is the very computation it was before the port. The
median-heuristic bandwidth is computed on the host too (``pdist`` on at most 1000 rows), from
the same rows on both backends.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat.numpy as np_xp
import numpy as np
import scipy.linalg
from array_api_compat import array_namespace, device, is_array_api_obj, is_numpy_namespace
from scipy.spatial.distance import pdist

from hsl_engine._backend import numpy_backend, single_threaded_blas, to_host
from hsl_engine._errors import EngineError

__all__ = [
    "KernelFit",
    "KernelRidgeSweep",
    "median_bandwidth",
    "poly_kernel",
    "rbf_kernel",
]

# Rows per block when streaming over training or test points: bounds the working memory to
# O(_CHUNK_ROWS * m + m^2) floats while keeping each GEMM large enough to run near peak.
_CHUNK_ROWS = 4096

# Nystroem drops eigen-directions of K_LL below this fraction of its largest eigenvalue; they
# carry rounding noise amplified by s^-1/2 rather than signal.
_EIG_RTOL = 1e-10

# Rows used by the median heuristic: a fixed prefix keeps the bandwidth deterministic and
# identical across sample sizes once n exceeds it.
_BANDWIDTH_SAMPLES = 1000

KERNELS = ("rbf", "poly")

# On the CPU (NumPy) every product runs in fixed tiles, each with single-threaded BLAS in a
# chunk thread (`Backend.map_ordered`), and the small LAPACK calls run single-threaded: a
# threaded GEMM or factorisation rounds differently with another number of threads, and the
# same spec must give the same numbers on any machine. Kernel rows are cut into row tiles;
# the Nystroem Gram matrix into column panels. The tiles do not depend on the thread count.
_TILE_ROWS = 512
_PANEL_COLS = 128

Array = Any  # a NumPy array or a PyTorch tensor
KernelFn = Callable[[Array, Array], Array]


def rbf_kernel(a: Array, b: Array, bandwidth: float) -> Array:
    """Gaussian kernel ``exp(-||a_i - b_j||^2 / (2 bandwidth^2))``.

    Squared distances come from the GEMM expansion ``|a|^2 + |b|^2 - 2 a.b``, whose rounding
    can make them slightly negative; those are clipped to 0.

    Parameters
    ----------
    a : array, shape (n_a, d)
        NumPy or PyTorch; the result is in its namespace and on its device.
    b : array, shape (n_b, d)
    bandwidth : float
        Length scale, > 0.

    Returns
    -------
    array, shape (n_a, n_b)
    """
    xp, dev = _namespace_of(a)
    a, b = _float64(xp, a, dev), _float64(xp, b, dev)
    _check_pair(a, b)
    if not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    sq_a = xp.einsum("ij,ij->i", a, a)
    sq_b = xp.einsum("ij,ij->i", b, b)
    # In-place updates keep the peak memory at one (n_a, n_b) array.
    out = a @ b.T
    out *= -2.0
    out += sq_a[:, None]
    out += sq_b[None, :]
    _clip_negative_(out)
    out *= -0.5 / (bandwidth * bandwidth)
    _exp_(out)
    return out


def poly_kernel(a: Array, b: Array, degree: int) -> Array:
    """Polynomial kernel ``(1 + <a_i, b_j> / width) ** degree`` with ``width = a.shape[1]``.

    Dividing by the width keeps the inner product O(1) for standard normal inputs, so the
    kernel does not blow up with the input dimension.

    Parameters
    ----------
    a : array, shape (n_a, width)
        NumPy or PyTorch; the result is in its namespace and on its device.
    b : array, shape (n_b, width)
    degree : int
        Polynomial degree, >= 1.

    Returns
    -------
    array, shape (n_a, n_b)
    """
    xp, dev = _namespace_of(a)
    a, b = _float64(xp, a, dev), _float64(xp, b, dev)
    _check_pair(a, b)
    degree = _check_degree(degree)
    out = a @ b.T
    out *= 1.0 / a.shape[1]
    out += 1.0
    if degree > 1:
        _pow_(out, degree)
    return out


def median_bandwidth(x: Array, *, max_samples: int = 1000) -> float:
    """Median heuristic for the RBF bandwidth.

    The median Euclidean distance over all pairs ``i < j`` (the diagonal excluded) among the
    first ``min(n, max_samples)`` rows. Deterministic: no subsampling at random. Computed on
    the host (SciPy), so NumPy and PyTorch inputs holding the same rows give the same value.

    Parameters
    ----------
    x : array, shape (n, d)
        NumPy or PyTorch (copied to the host).
    max_samples : int, optional
        At most this many leading rows are used, so the cost is O(max_samples^2 d).

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If fewer than two rows are available.
    EngineError
        If the median distance is not positive and finite (e.g. most rows coincide).
    """
    x = np.asarray(to_host(x), dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D, got shape {x.shape}")
    if max_samples < 2:
        raise ValueError(f"max_samples must be >= 2, got {max_samples}")
    k = min(x.shape[0], max_samples)
    if k < 2:
        raise ValueError(f"median_bandwidth needs at least 2 rows, got {x.shape[0]}")
    value = float(np.median(pdist(x[:k], metric="euclidean")))
    if not (math.isfinite(value) and value > 0):
        raise EngineError(
            f"median pairwise distance among the first {k} rows is {value}; "
            "cannot use it as an RBF bandwidth"
        )
    return value


@dataclass(frozen=True)
class KernelFit:
    """Result of one :meth:`KernelRidgeSweep.fit_predict` call.

    Attributes
    ----------
    predictions : array, shape (n_test,)
        Predictions in the units of ``y_train``, intercept included; in the namespace and on
        the device of ``x_test``.
    n_train_used : int
        Training samples whose labels entered the fit; always all n rows.
    n_landmarks : int
        Landmarks used: ``n_train_used`` for an exact solve, ``m`` for Nystroem.
    solver : str
        ``"exact"`` or ``"nystroem"``.
    bandwidth : float or None
        The RBF bandwidth actually used; None for the polynomial kernel.
    """

    predictions: Array
    n_train_used: int
    n_landmarks: int
    solver: str
    bandwidth: float | None


class KernelRidgeSweep:
    """Kernel ridge regression with an unpenalised intercept, fitted on growing prefixes.

    Minimises ``(1/n) sum_mu (f(x_mu) - y_mu)^2 + ridge * ||h||_H^2`` over ``f = c + h`` with
    ``c`` a constant that is not penalised and ``h`` in the RKHS of the kernel.

    * ``n <= n_landmarks``: exact solve. With ``A = K + n ridge I`` the minimiser is
      ``h = sum_i alpha_i k(., x_i)`` where ``A alpha + c 1 = y`` and ``1^T alpha = 0``, i.e.
      ``c = 1^T A^-1 y / 1^T A^-1 1`` and ``alpha = A^-1 (y - c 1)`` (two Cholesky solves).
      Cost O(n^3) time and O(n^2) memory.
    * ``n > n_landmarks``: Nystroem. The landmarks are the first ``m = n_landmarks`` training
      rows (deterministic; the stream is i.i.d., and a fixed prefix keeps the landmarks
      identical across n). With ``K_LL = U diag(s) U^T``, eigenvalues below
      ``1e-10 * max(s)`` are dropped and the features are ``Phi = K(x, L) U_r diag(s_r^-1/2)``.
      Ridge regression with an unpenalised intercept is then solved in feature space from
      the sums ``Phi^T Phi``, ``Phi^T y``, ``Phi^T 1``, ``sum y`` and ``n``, centred
      algebraically so the intercept is exact. Rows are streamed in blocks, so memory is
      O(block * m + m^2) and time O(n m (d + m) + m^3).

    With ``incremental=True``, a Nystroem call whose training set extends the previous
    Nystroem call's (same landmark rows and labels, same width, same bandwidth, at least as
    many rows, and the same row and label at the previous last position) only processes the
    new rows. Labels of rows already processed are *assumed* unchanged; only the landmark
    labels and the last label are checked. Any mismatch starts the sums over. The result
    equals a from-scratch fit up to floating-point summation order.

    The computation runs in the array namespace and on the device of ``x_test`` (NumPy or
    PyTorch); see the module docstring for what runs on the host.

    Parameters
    ----------
    kernel : {"rbf", "poly"}
    ridge : float
        Ridge strength, > 0 (the penalty is ``ridge * ||h||^2`` against a mean squared error).
    n_landmarks : int
        Nystroem rank m, >= 1; fits on at most this many rows are exact.
    bandwidth : float or None, optional
        RBF length scale; None uses :func:`median_bandwidth` on the first 1000 training rows
        of each call. Only valid with ``kernel="rbf"``.
    degree : int or None, optional
        Polynomial degree; required for, and only valid with, ``kernel="poly"``.
    incremental : bool, optional
        Reuse sums across calls on growing prefixes of one stream. Use False when the inputs
        change with n (e.g. learned features), which skips the checks and stored state.
    rng : numpy.random.Generator
        Reserved for randomised choices (a NumPy generator on every backend, so all backends
        would choose alike); the current landmark rule is deterministic and does not draw
        from it. Results are bitwise deterministic for the same sequence of calls, on any
        number of cores (NumPy: see `_TILE_ROWS`).
    threads : int, optional
        Chunk threads of the NumPy path (default: the cores available).
    """

    def __init__(
        self,
        kernel: str,
        *,
        ridge: float,
        n_landmarks: int,
        bandwidth: float | None = None,
        degree: int | None = None,
        incremental: bool = True,
        rng: np.random.Generator,
        threads: int | None = None,
    ):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        ridge = float(ridge)
        if not (math.isfinite(ridge) and ridge > 0):
            raise ValueError(f"ridge must be a positive finite number, got {ridge!r}")
        if isinstance(n_landmarks, bool) or int(n_landmarks) != n_landmarks or n_landmarks < 1:
            raise ValueError(f"n_landmarks must be an integer >= 1, got {n_landmarks!r}")
        if kernel == "rbf":
            if degree is not None:
                raise ValueError("degree is only valid with kernel='poly'")
            if bandwidth is not None:
                bandwidth = float(bandwidth)
                if not (math.isfinite(bandwidth) and bandwidth > 0):
                    raise ValueError(f"bandwidth must be positive and finite, got {bandwidth!r}")
        else:
            if bandwidth is not None:
                raise ValueError("bandwidth is only valid with kernel='rbf'")
            if degree is None:
                raise ValueError("kernel='poly' requires degree")
            degree = _check_degree(degree)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.kernel = kernel
        self.ridge = ridge
        self.n_landmarks = int(n_landmarks)
        self.bandwidth = bandwidth
        self.degree = degree
        self.incremental = bool(incremental)
        self._rng = rng
        self._tiles = _Tiles(threads)
        self._state: _NystroemState | None = None

    def fit_predict(self, x_train, y_train, x_test) -> KernelFit:
        """Fit on all of ``(x_train, y_train)`` and predict at ``x_test``.

        Parameters
        ----------
        x_train : array, shape (n, d), or a lazy view of that shape with row slicing
        y_train : array, shape (n,), or a lazy view with slicing
        x_test : array, shape (n_test, d)
            NumPy or PyTorch: the fit runs, and the predictions come back, in its namespace
            and on its device; training rows are brought there.

        Returns
        -------
        KernelFit

        Raises
        ------
        ValueError
            On inconsistent shapes or non-finite inputs.
        EngineError
            If a Cholesky factorisation or the kernel eigendecomposition fails.
        """
        if is_numpy_namespace(_namespace_of(x_test)[0]):
            # reads of lazy views of learned features project them: single-threaded BLAS
            # there too (the tiled products run in chunk threads under the same limit)
            with single_threaded_blas():
                return self._fit_predict(x_train, y_train, x_test)
        return self._fit_predict(x_train, y_train, x_test)

    def _fit_predict(self, x_train, y_train, x_test) -> KernelFit:
        n = x_train.shape[0]
        if not is_array_api_obj(x_train) and n <= self.n_landmarks:
            x_train, y_train = x_train[0:n], y_train[0:n]  # a lazy view: small, materialise
        if is_array_api_obj(x_train):
            x_train, y_train, x_test = _check_data(x_train, y_train, x_test)
        else:
            # a lazy view of generated samples (`hsl_engine._data.SampleView`): rows are read
            # block by block below and never materialised together
            x_test = _check_data(x_train[0:1], y_train[0:1], x_test)[2]
        bandwidth = self._bandwidth_for(x_train)
        kernel_fn = self._kernel_fn(bandwidth)
        xp, dev = _namespace_of(x_test)
        tiles = self._tiles if is_numpy_namespace(xp) else None

        if n <= self.n_landmarks:
            predictions = _exact_fit_predict(x_train, y_train, x_test, kernel_fn, self.ridge, tiles)
            return KernelFit(predictions, n, n, "exact", bandwidth)

        m = self.n_landmarks
        state = self._state if self.incremental else None
        if state is None or not state.extends(x_train, y_train, bandwidth, xp, dev):
            landmarks, y_landmarks = _float64(xp, x_train[:m], dev), _float64(xp, y_train[:m], dev)
            # (copies them)
            state = _NystroemState(landmarks, y_landmarks, kernel_fn, bandwidth, tiles)
        state.update(x_train, y_train)
        coef, intercept = state.solve(self.ridge)
        if self.incremental:
            self._state = state
        predictions = _predict(x_test, state.landmarks, coef, intercept, kernel_fn, tiles)
        return KernelFit(predictions, n, m, "nystroem", bandwidth)

    def _bandwidth_for(self, x_train) -> float | None:
        if self.kernel != "rbf":
            return None
        if self.bandwidth is not None:
            return self.bandwidth
        # Recomputed every call (cheap: at most 1000 rows) so the result depends only on the
        # data passed, never on the call history; the incremental check compares it exactly.
        return median_bandwidth(x_train[:_BANDWIDTH_SAMPLES], max_samples=_BANDWIDTH_SAMPLES)

    def _kernel_fn(self, bandwidth: float | None) -> KernelFn:
        if self.kernel == "rbf":
            assert bandwidth is not None
            return lambda a, b: rbf_kernel(a, b, bandwidth)
        degree = self.degree
        assert degree is not None
        return lambda a, b: poly_kernel(a, b, degree)


class _NystroemState:
    """Nystroem feature map on fixed landmarks plus the ridge sufficient statistics.

    Features are shifted by ``mu0`` (their mean over the landmark rows) and labels by ``y0``
    (the landmark label mean) before accumulation. The intercept absorbs any constant shift,
    so this changes nothing mathematically, but it keeps ``sum Phi`` small and so avoids the
    cancellation in ``Phi^T Phi - (Phi^T 1)(1^T Phi)/n`` when a feature has a large mean.

    The sums live in the namespace and on the device of ``landmarks``; the eigendecomposition
    and the solve run on the host (see the module docstring).

    Parameters
    ----------
    landmarks : array, shape (m, d)
        NumPy or PyTorch; rows passed to `update` are brought to its namespace and device.
    y_landmarks : array, shape (m,)
    kernel_fn : callable
        ``kernel_fn(a, b)`` returns the kernel matrix of shape ``(len(a), len(b))``.
    bandwidth : float or None
        Stored only to tell whether a later call uses the same kernel.
    tiles : _Tiles, optional
        The NumPy path's tiled products (None with PyTorch).
    """

    def __init__(
        self,
        landmarks: Array,
        y_landmarks: Array,
        kernel_fn: KernelFn,
        bandwidth: float | None,
        tiles: _Tiles | None = None,
    ):
        xp, dev = self.xp, self.device = _namespace_of(landmarks)
        self.landmarks = _float64(xp, landmarks, dev, copy=True)
        self.y_landmarks = _float64(xp, y_landmarks, dev, copy=True)
        self.kernel_fn = kernel_fn
        self.bandwidth = bandwidth
        self.tiles = tiles

        lm = self.landmarks
        k_ll = to_host(_kernel_rows(kernel_fn, lm, lm, tiles))
        # Symmetrise: the GEMM expansion is symmetric only up to rounding.
        k_ll = 0.5 * (k_ll + k_ll.T)
        try:
            with single_threaded_blas():
                s, u = scipy.linalg.eigh(k_ll, check_finite=False)
        except (np.linalg.LinAlgError, ValueError) as exc:
            raise EngineError(f"eigendecomposition of the landmark kernel failed: {exc}") from exc
        s_max = float(s[-1]) if s.size else 0.0
        if not (math.isfinite(s_max) and s_max > 0):
            raise EngineError(f"landmark kernel matrix has no positive eigenvalue (max {s_max})")
        keep = s > _EIG_RTOL * s_max
        s_kept = s[keep]
        u_kept = u[:, keep]
        self.rank = int(s_kept.size)
        # W maps kernel rows to features: Phi = K(x, L) W, shape (m, r). Host copies for the
        # solve, device copies for the streaming (the same arrays with NumPy).
        self._proj_host = np.ascontiguousarray(u_kept / np.sqrt(s_kept))
        # Phi(L) = K_LL W = U_r diag(s_r^1/2), so its row mean needs no extra GEMM.
        self._mu0_host = (u_kept * np.sqrt(s_kept)).mean(axis=0)
        self.proj = _float64(xp, self._proj_host, dev)
        self.mu0 = _float64(xp, self._mu0_host, dev)
        self.y0 = float(xp.mean(self.y_landmarks))

        r = self.rank
        self.gram = xp.zeros((r, r), dtype=xp.float64, device=dev)
        self.phi_y = xp.zeros((r,), dtype=xp.float64, device=dev)
        self.phi_sum = xp.zeros((r,), dtype=xp.float64, device=dev)
        self.y_sum: Any = 0.0  # a float, or a 0-d array of the namespace (no device sync)
        self.n_done = 0
        self.rows_processed = 0  # total rows ever streamed; lets tests see reuse happen
        self.last_row: Array | None = None
        self.last_y: Any = 0.0

    def extends(self, x, y, bandwidth: float | None, xp=None, dev=None) -> bool:
        """Whether ``(x, y)`` plausibly extends the rows already accumulated.

        Parameters
        ----------
        x : array, shape (n, d), or a lazy view
        y : array, shape (n,), or a lazy view
        bandwidth : float or None
        xp, dev : optional
            The namespace and device the caller computes in; a state kept in another one
            does not extend.

        Returns
        -------
        bool
        """
        m, d = self.landmarks.shape
        n_old = self.n_done
        if x.shape[1] != d or x.shape[0] < max(n_old, m) or n_old == 0:
            return False
        if bandwidth != self.bandwidth:
            return False
        if xp is not None and (xp is not self.xp or dev != self.device):
            return False
        if not (self._equal(x[:m], self.landmarks) and self._equal(y[:m], self.y_landmarks)):
            return False
        return self._equal(x[n_old - 1], self.last_row) and float(y[n_old - 1]) == float(
            self.last_y
        )

    def _equal(self, a, b) -> bool:
        """``numpy.array_equal`` in the state's namespace (``a`` brought there)."""
        a = _float64(self.xp, a, self.device)
        return tuple(a.shape) == tuple(b.shape) and bool(self.xp.all(a == b))

    def update(self, x, y) -> None:
        """Accumulate rows ``n_done..n-1`` of ``(x, y)``.

        Parameters
        ----------
        x : array, shape (n, d), or a lazy view
        y : array, shape (n,), or a lazy view
        """
        xp, dev = self.xp, self.device
        n = x.shape[0]
        for start in range(self.n_done, n, _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, n)
            # one read of a lazy view per block, brought to the state's device
            xb, yb = _float64(xp, x[start:stop], dev), _float64(xp, y[start:stop], dev)
            y_c = yb - self.y0
            # NumPy computes ``phi.T @ phi`` as a SYRK (half the flops of a GEMM); the tiled
            # path keeps that saving with panels of the upper triangle only, and `solve`
            # reads the upper triangle.
            if self.tiles is None:
                phi = self.kernel_fn(xb, self.landmarks) @ self.proj
                phi -= self.mu0
                self.gram += phi.T @ phi
                self.phi_y += y_c @ phi
            else:
                phi = self.tiles.rows(
                    lambda a, b, xb=xb: (
                        self.kernel_fn(xb[a:b], self.landmarks) @ self.proj - self.mu0
                    ),
                    stop - start,
                    self.rank,
                )

                # column panels of the Gram's upper part (rows 0..b-1), all computed before
                # any is added: a block that raises leaves the sums as they were
                panels = self.tiles.each(
                    lambda a, b, phi=phi: phi[:, :b].T @ phi[:, a:b], self.rank, _PANEL_COLS
                )
                for a, b, part in panels:
                    self.gram[:b, a:b] += part
                self.phi_y += y_c @ phi  # single-threaded BLAS: see `fit_predict`
            self.phi_sum += xp.sum(phi, axis=0)
            self.y_sum = self.y_sum + xp.sum(y_c)
            # Bookkeeping per block keeps the state consistent (sums cover exactly rows
            # 0..n_done-1) even if a later block raises, e.g. on memory exhaustion.
            self.rows_processed += stop - start
            self.n_done = stop
            self.last_row = _float64(xp, xb[-1], dev, copy=True)
            self.last_y = _float64(xp, yb[-1], dev, copy=True)

    def solve(self, ridge: float) -> tuple[Array, float]:
        """Ridge solution in feature space, mapped back to kernel coefficients.

        The (r, r) system is solved on the host; the coefficients go back to the device.

        Parameters
        ----------
        ridge : float

        Returns
        -------
        coef : array, shape (m,)
            Predictions are ``K(x, L) @ coef + intercept``; in the state's namespace.
        intercept : float
        """
        n = self.n_done
        gram, phi_y, phi_sum = to_host(self.gram), to_host(self.phi_y), to_host(self.phi_sum)
        gram = np.triu(gram) + np.triu(gram, 1).T  # the tiled path sums the upper part only
        mean_phi = phi_sum / n
        mean_y = float(self.y_sum) / n
        a = gram - n * np.outer(mean_phi, mean_phi)
        a[np.diag_indices_from(a)] += n * ridge
        b = phi_y - n * mean_phi * mean_y
        with single_threaded_blas():
            beta = _cholesky_solve(a, b, lower=False, what="Nystroem normal equations")
            intercept = self.y0 + mean_y - float(mean_phi @ beta) - float(self._mu0_host @ beta)
            coef = self._proj_host @ beta
        return _float64(self.xp, coef, self.device), intercept


def _exact_fit_predict(
    x: Array, y: Array, x_test: Array, kernel_fn: KernelFn, ridge: float, tiles: _Tiles | None
) -> Array:
    """Exact KRR with an unpenalised intercept; see :class:`KernelRidgeSweep`.

    The kernel matrix and the predictions are computed on the device of ``x``; the (n, n)
    Cholesky solve (n <= n_landmarks) on the host.

    Parameters
    ----------
    x : array, shape (n, d)
    y : array, shape (n,)
    x_test : array, shape (n_test, d)
    kernel_fn : callable
    ridge : float
    tiles : _Tiles or None
        The NumPy path's tiled products (None with PyTorch).

    Returns
    -------
    array, shape (n_test,), in the namespace of ``x_test``
    """
    n = x.shape[0]
    a = to_host(_kernel_rows(kernel_fn, x, x, tiles))
    a[np.diag_indices_from(a)] += n * ridge
    y = to_host(y)
    y_mean = float(y.mean())
    # Centring first only improves rounding: the intercept formula is shift-equivariant.
    rhs = np.column_stack([y - y_mean, np.ones(n)])
    with single_threaded_blas():
        z = _cholesky_solve(a, rhs, lower=True, what="exact kernel ridge system")
    shift = z[:, 0].sum() / z[:, 1].sum()
    alpha = z[:, 0] - shift * z[:, 1]
    xp, dev = _namespace_of(x)
    return _predict(x_test, x, _float64(xp, alpha, dev), y_mean + shift, kernel_fn, tiles)


def _kernel_rows(kernel_fn: KernelFn, a: Array, b: Array, tiles: _Tiles | None) -> Array:
    """``kernel_fn(a, b)``: in row tiles of ``a`` on the NumPy path."""
    if tiles is None:
        return kernel_fn(a, b)
    return tiles.rows(lambda i, j: kernel_fn(a[i:j], b), a.shape[0], b.shape[0])


def _cholesky_solve(a: np.ndarray, b: np.ndarray, *, lower: bool, what: str) -> np.ndarray:
    try:
        factor = scipy.linalg.cho_factor(a, lower=lower, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError as exc:
        raise EngineError(
            f"Cholesky factorisation of the {what} failed ({exc}); the matrix is not "
            "numerically positive definite - increase ridge"
        ) from exc
    out = scipy.linalg.cho_solve(factor, b, check_finite=False)
    if not np.all(np.isfinite(out)):
        raise EngineError(f"solving the {what} produced non-finite values")
    return out


def _predict(
    x_test: Array,
    centers: Array,
    coef: Array,
    intercept: float,
    kernel_fn: KernelFn,
    tiles: _Tiles | None = None,
) -> Array:
    """``K(x_test, centers) @ coef + intercept`` in row blocks, shape (n_test,), in the
    namespace and on the device of ``x_test`` (in tiles on the NumPy path)."""
    if tiles is not None:
        out = tiles.rows(lambda a, b: kernel_fn(x_test[a:b], centers) @ coef, x_test.shape[0], None)
        out += intercept
        return out
    xp, dev = _namespace_of(x_test)
    out = xp.empty((x_test.shape[0],), dtype=xp.float64, device=dev)
    for start in range(0, x_test.shape[0], _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, x_test.shape[0])
        out[start:stop] = kernel_fn(x_test[start:stop], centers) @ coef
    out += intercept
    return out


class _Tiles:
    """Products of the NumPy path in fixed tiles, run in ``threads`` chunk threads with
    single-threaded BLAS (see `_TILE_ROWS`)."""

    def __init__(self, threads: int | None):
        self.backend = numpy_backend(threads)

    def each(self, fn: Callable[[int, int], Any], n: int, step: int) -> list[tuple[int, int, Any]]:
        """``(a, b, fn(a, b))`` for the tiles ``[a, b)`` of ``range(n)``, in order."""
        bounds = [(a, min(a + step, n)) for a in range(0, n, step)]
        done = self.backend.map_ordered(lambda i: fn(*bounds[i]), len(bounds))
        return [(a, b, out) for (a, b), out in zip(bounds, done)]

    def rows(self, fn: Callable[[int, int], np.ndarray], n: int, width: int | None) -> np.ndarray:
        """``fn(a, b)`` of shape (b - a, width), or (b - a,) for ``width`` None, for the row
        tiles of ``range(n)``, stacked."""
        out = np.empty((n,) if width is None else (n, width))

        def tile(a: int, b: int) -> None:  # each tile writes its own rows
            out[a:b] = fn(a, b)

        self.each(tile, n, _TILE_ROWS)
        return out


# --- arrays of either backend -----------------------------------------------------------------
# Private stand-ins for what `hsl_engine._backend.Backend` does, keyed by an array's namespace
# rather than by a backend object (the kernels take bare arrays and lazy views).


def _namespace_of(a) -> tuple[Any, Any]:
    """The array-api-compat namespace and device of ``a`` (NumPy's for non-arrays)."""
    if is_array_api_obj(a):
        return array_namespace(a), device(a)
    return np_xp, "cpu"


def _float64(xp, a, dev, *, copy: bool = False):
    """``a`` (NumPy, PyTorch, a lazy-view slice or a list) as a float64 array of namespace
    ``xp`` on device ``dev``; no copy unless needed or asked. NumPy arrays come back
    C-contiguous, as the NumPy path always had them (BLAS rounding can depend on layout)."""
    if is_numpy_namespace(xp):
        a = to_host(a)
        if copy:
            return np.array(a, dtype=np.float64, order="C")
        return np.ascontiguousarray(a, dtype=np.float64)
    import torch

    if not isinstance(a, torch.Tensor):
        a = np.asarray(a)
        if not a.flags.writeable:  # PyTorch wants writable memory to share
            a = a.copy()
        a = torch.as_tensor(a)
    return a.to(device=dev, dtype=torch.float64, copy=copy)


def _clip_negative_(a) -> None:
    """``a = max(a, 0)`` in place."""
    if isinstance(a, np.ndarray):
        np.maximum(a, 0.0, out=a)
    else:
        a.clamp_(min=0.0)


def _exp_(a) -> None:
    """``a = exp(a)`` in place."""
    if isinstance(a, np.ndarray):
        np.exp(a, out=a)
    else:
        a.exp_()


def _pow_(a, degree: int) -> None:
    """``a = a ** degree`` in place."""
    if isinstance(a, np.ndarray):
        np.power(a, degree, out=a)
    else:
        a.pow_(degree)


def _check_pair(a: Array, b: Array) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(
            f"kernel inputs must be 2-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kernel inputs have different widths: {a.shape[1]} and {b.shape[1]}")
    if a.shape[1] == 0:
        raise ValueError("kernel inputs must have at least one column")


def _check_degree(degree: int) -> int:
    if isinstance(degree, bool) or int(degree) != degree or degree < 1:
        raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
    return int(degree)


def _check_data(x_train, y_train, x_test) -> tuple[Array, Array, Array]:
    """The three as float64 arrays in the namespace and on the device of ``x_test``,
    checked for shapes and finiteness."""
    xp, dev = _namespace_of(x_test)
    x_train = _float64(xp, x_train, dev)
    y_train = _float64(xp, y_train, dev)
    x_test = _float64(xp, x_test, dev)
    if x_train.ndim != 2 or x_test.ndim != 2:
        raise ValueError(
            "x_train and x_test must be 2-D, got shapes "
            f"{tuple(x_train.shape)} and {tuple(x_test.shape)}"
        )
    if x_train.shape[1] != x_test.shape[1] or x_train.shape[1] == 0:
        raise ValueError(
            f"x_train and x_test need the same positive width, got {x_train.shape[1]} "
            f"and {x_test.shape[1]}"
        )
    if tuple(y_train.shape) != (x_train.shape[0],):
        raise ValueError(
            f"y_train must have shape ({x_train.shape[0]},), got {tuple(y_train.shape)}"
        )
    if x_train.shape[0] < 1:
        raise ValueError("x_train has no rows")
    for name, arr in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test)):
        if not bool(xp.all(xp.isfinite(arr))):
            raise ValueError(f"{name} contains non-finite values")
    return x_train, y_train, x_test
