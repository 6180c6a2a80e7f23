"""The layer-wise spectral method (MODEL.md section 2) and the metrics of section 3."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ._backend import Backend
from ._data import SeedData, project, standardise
from ._eigen import EigResult, block_krylov_top, dense_top
from ._errors import ConvergenceError, ConvergenceWarning
from ._operator import MomentOperator, prefer_dense
from ._spec import ExperimentSpec

EXTRA_EIGENVALUES = 10


@dataclass(frozen=True)
class FirstLayer:
    """The learned first layer at one sample size.

    Attributes
    ----------
    directions : ndarray, shape (D, d1)
        Orthonormal top-d1 eigenvectors of C_hat by |eigenvalue|.
    eigenvalues : ndarray, shape (d1 + 10,)
        Signed top eigenvalues by magnitude (fewer if D is smaller).
    passes : int
        Operator applications of the eigensolve (1 for the dense solver).
    converged : bool
    solver : str
        ``"dense"`` or ``"krylov"``.
    flops : float
        Floating-point operations spent on the moment operator.
    """

    directions: np.ndarray
    eigenvalues: np.ndarray
    passes: int
    converged: bool
    solver: str
    flops: float


def transformed_labels(y: np.ndarray, activation: str) -> np.ndarray:
    """Centred labels (id) or standardised labels (nonlinear g), from these samples' own stats."""
    mean, std = standardise(y)
    if activation == "id":
        return y - mean
    return (y - mean) / std


class FirstLayerSolver:
    """Step 1-2 for one seed, warm-started across increasing sample sizes."""

    def __init__(self, spec: ExperimentSpec, backend: Backend, *, rng: np.random.Generator):
        self.spec = spec
        self.backend = backend
        self.rng = rng
        self.d1 = spec.model.hidden_dim
        self.dim = spec.model.feature_dim
        self.k_values = min(self.d1 + EXTRA_EIGENVALUES, self.dim)
        self.block = self.k_values
        self._warm: np.ndarray | None = None

    def solver_for(self, n: int) -> str:
        choice = self.spec.solver.eigensolver
        if choice != "auto":
            return choice
        m = self.spec.model
        small = self.dim <= 4 * self.block
        return (
            "dense"
            if small or prefer_dense(n, m.d, self.dim, m.q, m.features, self.block)
            else "krylov"
        )

    def fit(self, inputs: np.ndarray, labels: np.ndarray) -> FirstLayer:
        m = self.spec.model
        dtype = np.dtype(self.spec.solver.dtype)
        y = transformed_labels(labels, m.activation)
        y = y - y.mean()
        op = MomentOperator(
            np.ascontiguousarray(inputs, dtype=dtype),
            np.ascontiguousarray(y, dtype=dtype),
            q=m.q,
            features=m.features,
            backend=self.backend,
        )
        solver = self.solver_for(inputs.shape[0])
        if solver == "dense":
            res = dense_top(np.asarray(op.dense(), np.float64), self.k_values, self.block)
        else:
            res = self._krylov(op)
        self._warm = res.vectors
        return FirstLayer(
            directions=np.ascontiguousarray(res.vectors[:, : self.d1]),
            eigenvalues=res.values,
            passes=res.passes,
            converged=res.converged,
            solver=solver,
            flops=op.flops,
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


def hidden_features(spec: ExperimentSpec, inputs: np.ndarray, directions: np.ndarray):
    """``h_hat = A_hat F(x)`` for learned directions (D, d1); shape (n, d1)."""
    if spec.model.features == "gaussian":
        return inputs @ directions
    return project(inputs, directions.T, spec.model.q)


def second_layer(h: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``A2_hat = (1/n) sum y_c (h h^T - I)``, shape (d1, d1), with centred y."""
    yc = y - y.mean()
    a2 = (h.T * yc) @ h / h.shape[0]
    return (a2 + a2.T) / 2  # the -I term vanishes for centred y


def quadratic_form(h: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """``h^T A2 h - tr A2`` per row, shape (n,)."""
    return np.einsum("ni,ij,nj->n", h, a2, h, optimize=True) - np.trace(a2)


class Readout:
    """Ridge polynomial fit of y on the standardised h2_hat (affine when degree is 1).

    For degree > 1 the standardised input is winsorised at the training 0.5 % and 99.5 %
    quantiles, in the fit and in prediction: h2_hat is heavy-tailed (Hermite features), and a
    degree-5 polynomial pulled through a few extreme points, or evaluated past them, diverges.
    """

    WINSOR = (0.005, 0.995)

    def __init__(self, degree: int, ridge: float):
        self.degree = degree
        self.ridge = ridge

    def fit(self, t: np.ndarray, y: np.ndarray) -> Readout:
        self.t_mean, self.t_std = standardise(t)
        z = (t - self.t_mean) / self.t_std
        if self.degree > 1:
            lo, hi = np.quantile(z, self.WINSOR)
            self.z_range = (float(lo), float(hi))
        else:
            self.z_range = (-np.inf, np.inf)
        phi = self._design(t)
        gram = phi.T @ phi
        penalty = self.ridge * t.shape[0] * np.eye(self.degree + 1)
        penalty[0, 0] = 0.0  # the intercept is not penalised
        self.coef = np.linalg.lstsq(gram + penalty, phi.T @ y, rcond=None)[0]
        return self

    def predict(self, t: np.ndarray) -> np.ndarray:
        return self._design(t) @ self.coef

    def _design(self, t: np.ndarray) -> np.ndarray:
        z = np.clip((t - self.t_mean) / self.t_std, *self.z_range)
        return np.vander(z, self.degree + 1, increasing=True)


def normalised_mse(pred: np.ndarray, y: np.ndarray) -> float:
    """Test MSE divided by the test labels' variance."""
    var = float(np.var(y))
    return float(np.mean((pred - y) ** 2) / var) if var > 0 else math.nan


def overlaps(teacher_directions: np.ndarray, learned: np.ndarray) -> np.ndarray:
    """``cos2[i] = ||U_hat^T A_i||^2``; teacher (d1, D), learned (D, k) orthonormal columns."""
    m = teacher_directions @ learned
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
        self.first = FirstLayerSolver(spec, backend, rng=rng)
        degree = method.readout_degree
        if degree is None:
            degree = 1 if spec.model.activation == "id" else 5
        self.degree = degree

    def second_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        stream = self.data.second if self.method.sample_split else self.data.train
        return stream.take(n)

    def fit(self, n: int) -> SpectralFit:
        x, y = self.data.train.take(n)
        first = self.first.fit(x, y)
        x2, y2 = self.second_batch(n)
        h = hidden_features(self.spec, x2, first.directions)
        a2 = second_layer(h, y2)
        readout = Readout(self.degree, self.method.readout_ridge).fit(quadratic_form(h, a2), y2)
        h_test = hidden_features(self.spec, self.data.test_inputs, first.directions)
        pred = readout.predict(quadratic_form(h_test, a2))
        used = 2 * n if self.method.sample_split else n
        return SpectralFit(
            mse=normalised_mse(pred, self.data.test_labels),
            cos2=overlaps(self.data.teacher.directions, first.directions),
            first=first,
            n_train_used=used,
        )
