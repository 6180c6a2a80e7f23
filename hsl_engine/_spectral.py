"""The layer-wise spectral method (docs/model.md section 2) and the metrics of section 3."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device

from ._backend import Backend, numpy_backend, single_threaded_blas, to_host
from ._data import SeedData, project
from ._eigen import EigResult, block_krylov_top, dense_top
from ._errors import ConvergenceError, ConvergenceWarning
from ._estimate import (
    HIDDEN_CACHE_BYTES,
    HIDDEN_CACHE_STREAMED_BYTES,
    choose_solver,
    pass_width,
)
from ._operator import DenseAccumulator, MomentOperator
from ._spec import ExperimentSpec

EXTRA_EIGENVALUES = 10
# Ritz vectors kept beyond the reported ones, so the reported top d1 + 10 are the true ones
GUARD_VECTORS = 4


@dataclass(frozen=True)
class FirstLayer:
    """The learned first layer at one sample size.

    Attributes
    ----------
    directions : array, shape (D, d1)
        Orthonormal top-d1 eigenvectors of C_hat by |eigenvalue| (an array of the backend
        that computed them, on its device).
    eigenvalues : ndarray, shape (d1 + 10,)
        Signed top eigenvalues by magnitude (fewer if D is smaller).
    passes : int
        Operator applications of the eigensolve (1 for the dense solver).
    converged : bool
    solver : str
        ``"dense"`` or ``"krylov"``.
    flops : float
        Floating-point operations spent on the moment operator.
    vectors : int
        Vectors the operator was applied to (0 for the dense solver).
    """

    directions: Any
    eigenvalues: np.ndarray
    passes: int
    converged: bool
    solver: str
    flops: float
    vectors: int = 0


def label_stats(samples, backend: Backend | None = None) -> tuple[float, float]:
    """Mean and standard deviation of a sample source's labels in one pass over its chunks
    (per-chunk moments merged in chunk order), std floored to 1 when it is 0.
    With a backend, the chunks (regenerated ones included) are read in its threads."""

    def moments(c: int) -> tuple[int, float, float]:
        y = samples.block(c)[1]
        xp = array_namespace(y)
        mu = float(xp.mean(y))
        return y.shape[0], mu, float(xp.sum((y - mu) ** 2))

    count_ = samples.n_chunks()
    parts = backend.map_ordered(moments, count_) if backend else map(moments, range(count_))
    return merged_mean_std(parts)


def merged_mean_std(parts) -> tuple[float, float]:
    """Mean and std from per-chunk ``(count, mean, sum of squared deviations)``, merged in
    order (Chan, Golub and LeVeque); a std of 0 (or non-finite) is floored to 1."""
    count, mean, m2 = 0, 0.0, 0.0
    for k, mu, ss in parts:
        delta = mu - mean
        total = count + k
        mean += delta * k / total
        m2 += ss + delta * delta * count * k / total
        count = total
    std = math.sqrt(m2 / count) if count else 0.0
    return mean, std if std > 0 and math.isfinite(std) else 1.0


def label_transform(samples, activation: str, backend: Backend | None = None):
    """``(shift, scale)`` with ``(y - shift) * scale`` the centred (id) or standardised
    (nonlinear g) labels of these samples, from their own statistics."""
    mean, std = label_stats(samples, backend)
    return mean, (1.0 if activation == "id" else 1.0 / std)


@dataclass(frozen=True)
class LabelMap:
    """The first layer's label preprocessing ``T(y)`` for one set of n samples.

    ``t = (y - shift) * scale``, then, with ``bounds = (lo, hi)``, ``clip(t, lo, hi) -
    offset``; ``offset`` is the mean of the clipped values over the same samples, so ``sum T
    = 0`` (which the moment operator's ``-I`` term needs). The keyword arguments of
    `MomentOperator` (`kwargs`).
    """

    shift: float
    scale: float
    bounds: tuple[float, float] | None = None
    offset: float = 0.0

    def kwargs(self) -> dict:
        return {
            "shift": self.shift,
            "scale": self.scale,
            "bounds": self.bounds,
            "offset": self.offset,
        }


def label_map(
    samples, activation: str, backend: Backend | None = None, clip: float | None = None
) -> LabelMap:
    """The label preprocessing of the method for these samples.

    Without ``clip``: `label_transform`'s centred (id) or standardised labels, the paper's
    method. With ``clip`` (the method's ``label_clip``, an extension: docs/theory.md section
    10): the same labels clipped at ``+-clip`` standard deviations of y, ``bounds = +-clip sd
    scale``, and re-centred; ``sd`` (of the raw labels) and the clipped mean come from the
    same n samples, in two passes over their chunks, merged in chunk order (stored or
    regenerated samples, any backend, give the same numbers up to the backends' rounding).
    """
    mean, std = label_stats(samples, backend)
    scale = 1.0 if activation == "id" else 1.0 / std
    if clip is None:
        return LabelMap(mean, scale)
    bound = float(clip) * std * scale
    lo, hi = -bound, bound

    def clipped_sum(c: int) -> float:
        y = samples.block(c)[1]
        xp = array_namespace(y)
        return float(xp.sum(xp.clip((y - mean) * scale, lo, hi)))

    count = samples.n_chunks()
    sums = backend.map_ordered(clipped_sum, count) if backend else map(clipped_sum, range(count))
    total = 0.0
    for part in sums:  # in chunk order: the same sum whatever the thread count
        total += part
    return LabelMap(mean, scale, (lo, hi), total / samples.n)


class FirstLayerSolver:
    """Step 1-2 for one seed, warm-started across increasing sample sizes.

    Solvers (``solver.eigensolver``):

    * ``krylov``: the matrix-free block Krylov iteration of `hsl_engine._eigen`, warm-started
      from the previous n.
    * ``dense``: ``C_hat`` accumulated densely over the nested samples of the sweep (each
      sample enters once, for all n; see `DenseAccumulator`), then its top eigenpairs. With a
      ``label_clip`` the matrix is built from all n samples at each n (the clipped labels
      change with the statistics of n).
    * ``auto``: dense when its D x D matrices are small and the whole sweep costs less so
      (``4 n_max D^2`` flops against the Krylov estimate), else krylov. See `choose_solver`.
    """

    def __init__(
        self,
        spec: ExperimentSpec,
        backend: Backend,
        *,
        rng: np.random.Generator,
        full_spectrum: bool = False,
        label_clip: float | None = None,
    ):
        self.spec = spec
        self.full_spectrum = full_spectrum
        self.label_clip = label_clip
        self.backend = backend
        self.rng = rng
        self.d1 = spec.model.hidden_dim
        self.dim = spec.model.feature_dim
        self.k_values = min(self.d1 + EXTRA_EIGENVALUES, self.dim)
        self.block = min(self.k_values + GUARD_VECTORS, self.dim)
        self.solver = choose_solver(spec)
        # the dense solver accumulates raw sums over the nested samples, which only a shift
        # and a scale can be applied to afterwards: a clip depends on every sample's label
        # and on the statistics of all n, so with one the matrix is built anew at each n
        self.incremental = label_clip is None
        self._warm: np.ndarray | None = None
        self._dense: DenseAccumulator | None = None

    def fit(self, samples) -> FirstLayer:
        """Top-d1 directions of C_hat for the samples of a `SampleView` (or `ArraySamples`)."""
        m = self.spec.model
        labels = label_map(samples, m.activation, self.backend, self.label_clip)
        op = MomentOperator(
            samples,
            q=m.q,
            features=m.features,
            backend=self.backend,
            dtype=np.dtype(self.spec.solver.dtype),
            **labels.kwargs(),
        )
        if self.solver == "dense":
            if not self.incremental:
                matrix = op.dense()
            else:
                if self._dense is None:
                    self._dense = DenseAccumulator(self.dim)
                matrix = self._dense.moment(op)
            res = dense_top(
                matrix,
                self.k_values,
                self.block,
                v0=self._warm,
                rng=self.rng,
                backend=self.backend,
                all_values=self.full_spectrum,
            )
        else:
            res = self._krylov(op)
        self._warm = res.vectors
        return FirstLayer(
            directions=res.vectors[:, : self.d1],
            eigenvalues=res.values,
            passes=res.passes,
            converged=res.converged,
            solver=self.solver,
            flops=op.flops,
            vectors=op.vectors,
        )

    def _krylov(self, op: MomentOperator) -> EigResult:
        try:
            return block_krylov_top(
                op,
                self.d1,
                self.k_values,
                block=self.block,
                tol=self.spec.tol,
                max_passes=self.spec.solver.max_passes,
                rng=self.rng,
                v0=self._warm,
                expand=pass_width(self.spec, self.backend.device),
            )
        except ConvergenceError as exc:
            warnings.warn(
                f"{exc}; using the partial result (raise solver.max_passes or solver.tol)",
                ConvergenceWarning,
                stacklevel=3,
            )
            return exc.result


@dataclass(frozen=True)
class SpectralFit:
    """A fitted two-layer predictor and its test metrics."""

    mse: float
    cos2: np.ndarray  # (d1,)
    first: FirstLayer
    n_train_used: int


def hidden_features(spec: ExperimentSpec, inputs, directions):
    """``h_hat = A_hat F(x)`` for learned directions (D, d1); shape (n, d1), in the
    namespace of the inputs (the directions must live on the same device)."""
    xp = array_namespace(inputs)
    directions = xp.astype(directions, inputs.dtype, copy=False)
    if spec.model.features == "gaussian":
        return inputs @ directions
    return project(inputs, directions.T, spec.model.q)


def heldout_features(spec: ExperimentSpec, inputs, directions):
    """`hidden_features` of the test set with single-threaded BLAS: like every chunk of
    training samples, its rounding then does not depend on how many cores the machine has
    (same spec, same engine version and device: the same numbers)."""
    with single_threaded_blas():
        return hidden_features(spec, inputs, directions)


def quadratic_form(h, a2):
    """``h^T A2 h - tr A2`` per row, shape (n,)."""
    xp = array_namespace(h)
    a2 = xp.asarray(a2, dtype=h.dtype, device=device(h))
    return xp.sum((h @ a2) * h, axis=1) - xp.sum(xp.linalg.diagonal(a2))


class HiddenChunks:
    """``h_hat = A_hat F(x)`` and labels of a sample source, chunk by chunk: kept in memory
    when they fit ``cache_bytes`` (8 d1 bytes a sample), recomputed at each pass otherwise.

    Either way the chunks are computed by the backend's `Backend.map_ordered` (in threads,
    with single-threaded BLAS), so kept and recomputed chunks are the same numbers: a float32
    GEMM's rounding depends on how many threads BLAS splits it over, and a stored run (which
    keeps them) and a streamed one (which recomputes them beyond `HIDDEN_CACHE_STREAMED_BYTES`)
    must agree bit for bit."""

    def __init__(
        self,
        spec: ExperimentSpec,
        samples,
        directions,
        backend: Backend | None = None,
        cache_bytes: float | None = None,
    ):
        self.spec, self.samples, self.directions = spec, samples, directions
        self.backend = backend or numpy_backend()
        self.n = samples.n
        self._cache = None
        if cache_bytes is None:
            stored = getattr(samples, "stored", True)
            cache_bytes = HIDDEN_CACHE_BYTES if stored else HIDDEN_CACHE_STREAMED_BYTES
        if self.n * (directions.shape[1] + 1) * 8 <= cache_bytes:
            self._cache = self.backend.map_ordered(self._compute, samples.n_chunks())

    @property
    def kept(self) -> bool:
        """Whether the chunks are kept in memory (else recomputed at each pass)."""
        return self._cache is not None

    def _compute(self, c: int):
        # the projection's GEMMs in the solver's type (as the first layer's); h itself, and
        # every sum over samples made from it, in float64
        x, y = self.samples.block(c)
        xp = array_namespace(x)
        x = xp.astype(x, getattr(xp, self.spec.solver.dtype), copy=False)
        return xp.astype(hidden_features(self.spec, x, self.directions), xp.float64), y

    def __iter__(self):
        if self._cache is not None:
            yield from self._cache
            return
        count = self.samples.n_chunks()
        window = 2 * max(1, self.backend.threads)  # chunks computed ahead of the reader
        for start in range(0, count, window):
            todo = min(window, count - start)
            yield from self.backend.map_ordered(lambda i, s=start: self._compute(s + i), todo)


class HiddenView:
    """``h_hat`` of a `SampleView` as a lazily computed (n, d1) array for the kernel
    baselines: slices ``view[a:b]`` compute only those rows."""

    def __init__(self, spec: ExperimentSpec, samples, directions):
        self.spec, self.samples, self.directions = spec, samples, directions
        self.shape = (samples.n, directions.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, slice):
            i = int(key) % self.shape[0]
            return self[i : i + 1][0]
        a, b, _ = key.indices(self.shape[0])
        x, _ = self.samples.read(a, b)
        return hidden_features(self.spec, x, self.directions)


def second_layer_stream(chunks: HiddenChunks) -> np.ndarray:
    """``A2_hat = (1/n) sum y_c (h h^T - I)``, shape (d1, d1), with centred y, from per-chunk
    sums: ``(S_yhh - ybar S_hh) / n`` (the ``-I`` term vanishes for centred y)."""
    s_yhh = s_hh = s_y = None
    for h, y in chunks:
        xp = array_namespace(h)
        parts = ((h.T * y) @ h, h.T @ h, xp.sum(y))
        if s_yhh is None:
            s_yhh, s_hh, s_y = parts
        else:
            s_yhh, s_hh, s_y = s_yhh + parts[0], s_hh + parts[1], s_y + parts[2]
    n = chunks.n
    a2 = to_host(s_yhh - (s_y / n) * s_hh) / n
    return (a2 + a2.T) / 2


class Readout:
    """Ridge polynomial fit of y on the standardised h2_hat (affine when degree is 1).

    For degree > 1 the standardised input is winsorised at the 0.5 % and 99.5 % quantiles of
    the first `QUANTILE_SAMPLES` training samples, in the fit and in prediction: h2_hat is
    heavy-tailed (Hermite features), and a degree-5 polynomial pulled through a few extreme
    points, or evaluated past them, diverges. The fit streams: moments of t in one pass, the
    normal equations in a second, so its memory does not grow with n.
    """

    WINSOR = (0.005, 0.995)
    QUANTILE_SAMPLES = 1 << 17

    def __init__(self, degree: int, ridge: float):
        self.degree = degree
        self.ridge = ridge

    def fit(self, t: np.ndarray, y: np.ndarray) -> Readout:
        return self.fit_chunks(lambda: iter([(t, y)]))

    def fit_chunks(self, chunks) -> Readout:
        """Fit from ``chunks()``, a callable returning an iterator of ``(t, y)`` arrays (it is
        called twice: one pass for the moments of t, one for the normal equations)."""
        parts, head, count = [], [], 0
        for t, _ in chunks():
            xp = array_namespace(t)
            mu = float(xp.mean(t))
            parts.append((t.shape[0], mu, float(xp.sum((t - mu) ** 2))))
            if count < self.QUANTILE_SAMPLES:
                head.append(to_host(t[: self.QUANTILE_SAMPLES - count]))
            count += t.shape[0]
        self.t_mean, self.t_std = merged_mean_std(parts)
        if self.degree > 1:
            z = (np.concatenate(head) - self.t_mean) / self.t_std
            lo, hi = np.quantile(z, self.WINSOR)
            self.z_range = (float(lo), float(hi))
        else:
            self.z_range = (-np.inf, np.inf)
        p = self.degree + 1
        gram, rhs = np.zeros((p, p)), np.zeros(p)
        for t, y in chunks():
            phi = self._design(t)
            gram += to_host(phi.T @ phi)
            rhs += to_host(phi.T @ y)
        penalty = self.ridge * count * np.eye(p)
        penalty[0, 0] = 0.0  # the intercept is not penalised
        self.coef = np.linalg.lstsq(gram + penalty, rhs, rcond=None)[0]
        return self

    def predict(self, t):
        xp = array_namespace(t)
        return self._design(t) @ xp.asarray(self.coef, dtype=t.dtype, device=device(t))

    def _design(self, t):
        """Columns ``z**0 .. z**degree`` (a Vandermonde matrix, powers by running product)."""
        xp = array_namespace(t)
        z = (t - self.t_mean) / self.t_std
        lo, hi = self.z_range
        if math.isfinite(lo) or math.isfinite(hi):
            z = xp.clip(z, lo, hi)
        cols = [xp.ones_like(z)]
        for _ in range(self.degree):
            cols.append(cols[-1] * z)
        return xp.stack(cols, axis=1)


def normalised_mse(pred, y) -> float:
    """Test MSE divided by the test labels' variance."""
    xp = array_namespace(y)
    var = float(xp.var(y))
    return float(xp.mean((pred - y) ** 2)) / var if var > 0 else math.nan


def overlaps(teacher_directions: np.ndarray, learned) -> np.ndarray:
    """``cos2[i] = ||U_hat^T A_i||^2``; teacher (d1, D), learned (D, k) orthonormal columns
    (any backend: brought to the host)."""
    m = teacher_directions @ to_host(learned)
    return np.sum(m * m, axis=1)


class LayerwiseSpectral:
    """The layer-wise spectral method for one seed, over increasing n."""

    def __init__(
        self,
        spec: ExperimentSpec,
        method,
        data: SeedData,
        backend: Backend,
        *,
        rng: np.random.Generator,
    ):
        self.spec = spec
        self.method = method
        self.data = data
        self.first = FirstLayerSolver(
            spec,
            backend,
            rng=rng,
            full_spectrum=method.spectrum == "full",
            label_clip=method.label_clip,
        )
        degree = method.readout_degree
        if degree is None:
            degree = 1 if spec.model.activation == "id" else 5
        self.degree = degree

    def second_batch(self, n: int):
        """The samples of step 3 (A2): a fresh batch with sample_split, else the training
        ones."""
        stream = self.data.second if self.method.sample_split else self.data.train
        return stream.view(n)

    def readout_batch(self, n: int):
        """The samples of step 4 (the readout).

        With sample_split, samples n..2n-1 of the second stream: fresh, independent of both
        the first layer (training stream) and A2 (the second stream's first n), so the readout
        is not fitted on the samples that chose A2 (which inflates its slope and gave test
        MSE above 1 before anything is learned). Without it, the training samples.
        """
        return readout_samples(self.data, n, self.method.sample_split)

    def fit(self, n: int) -> SpectralFit:
        first = self.first.fit(self.data.train.view(n))
        backend = self.first.backend
        chunks = HiddenChunks(self.spec, self.second_batch(n), first.directions, backend)
        a2 = second_layer_stream(chunks)
        if self.method.sample_split:
            readout_chunks = HiddenChunks(
                self.spec, self.readout_batch(n), first.directions, backend
            )
        else:
            readout_chunks = chunks
        if readout_chunks.kept:
            # the readout reads its inputs twice (moments, then normal equations): where the
            # hidden features are kept, so are their quadratic forms (n numbers against n d1)
            kept = [(quadratic_form(h, a2), y) for h, y in readout_chunks]
            pairs = lambda: iter(kept)  # noqa: E731
        else:
            pairs = lambda: ((quadratic_form(h, a2), y) for h, y in readout_chunks)  # noqa: E731
        if self.method.readout == "rescale":
            readout: Readout | RescaleReadout = RescaleReadout(
                self.spec.model.activation
            ).fit_chunks(pairs)
        else:
            readout = Readout(self.degree, self.method.readout_ridge).fit_chunks(pairs)
        h_test = heldout_features(self.spec, self.data.test_inputs, first.directions)
        pred = readout.predict(quadratic_form(h_test, a2))
        used = 3 * n if self.method.sample_split else n
        return SpectralFit(
            mse=normalised_mse(pred, self.data.test_labels),
            cos2=overlaps(self.data.teacher.directions, first.directions),
            first=first,
            n_train_used=used,
        )


class _Tail:
    """Samples n0..n-1 of a `SampleView` as a sample source (``n``, ``n_chunks``, ``block``,
    ``stored``) for `HiddenChunks`: the chunk-aligned blocks of the view, cut at n0."""

    def __init__(self, view, start: int):
        self.view, self.start = view, int(start)
        self.n = view.n - self.start
        self.stored = view.stored
        self._first = self.start // view.rows

    def n_chunks(self) -> int:
        return self.view.n_chunks() - self._first

    def block(self, c: int):
        x, y = self.view.block(c + self._first)
        cut = self.start - (c + self._first) * self.view.rows
        return (x[cut:], y[cut:]) if cut > 0 else (x, y)


class RescaleReadout:
    """The paper's readout: ``g(t)`` with ``t = (h2_hat - mean) / std`` over the readout
    samples (no parameter fitted on the labels). The in-sample affine fit is dominated by a
    few extreme samples without a sample split (at n = 77610, 10 samples carry 91 % of
    var(h2_hat)); this readout only fixes the scale of h2_hat."""

    def __init__(self, activation_name: str):
        self.activation = activation_name

    def fit_chunks(self, chunks) -> RescaleReadout:
        parts = []
        for t, _ in chunks():
            xp = array_namespace(t)
            mu = float(xp.mean(t))
            parts.append((t.shape[0], mu, float(xp.sum((t - mu) ** 2))))
        self.t_mean, self.t_std = merged_mean_std(parts)
        return self

    def predict(self, t):
        from ._data import activation

        return activation(self.activation, (t - self.t_mean) / self.t_std)


def readout_samples(data, n: int, sample_split: bool):
    """The readout's samples at size n (`LayerwiseSpectral.readout_batch`): with a sample
    split, samples n..2n-1 of the second stream; without, the n training samples."""
    if not sample_split:
        return data.train.view(n)
    return _Tail(data.second.view(2 * n), n)
