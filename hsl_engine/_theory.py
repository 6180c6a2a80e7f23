"""Asymptotic theory overlays (docs/model.md section 4): spikes, onsets, cos2 tails, MSE, exponents.

These are the large-n/D predictions of first-order perturbation theory for the spectral
estimator ``C_hat = (1/n) sum y (z z^T - I)`` (Gaussian-equivalent mode), corrected per
direction:

* the spike of ``E[C_hat]`` along ``A_i`` is ``s_i = E[y (h_i^2 - 1)]``, computed for the
  actual label law (``sqrt2 lambda_i`` for g = id; for nonlinear g it has a second-order term
  in ``lambda_i^2`` whose sign does not follow ``lambda_i``, so a direction can cancel);
* the noise bulk has radius ``2 sqrt(D E[y^2] / n)`` and a direction's BBP onset is
  ``n_onset_i = D E[y^2] / s_i^2``;
* the noise coupling ``A_i`` to the rest has variance ``E[y^2 h_i^2] / n``, so the eigenvector
  tail is ``1 - cos2_i = (n_onset_i / n) E[y^2 h_i^2] / E[y^2]`` (``(n_i/n)(1 + 4 lambda_i^2)``
  for g = id without noise) and ``n_half_i = 2 n_onset_i E[y^2 h_i^2] / E[y^2]``;
* label noise enters ``E[y^2]`` and ``E[y^2 h_i^2]``.

The label moments are exact for ``id`` and computed for nonlinear g by Gauss-Hermite quadrature
over ``h_i`` and a fixed-seed Monte Carlo sample of the other directions' contribution to h2.
They depend on the signs of the weights (for nonlinear g), so predictions are made per sign
pattern (the teachers of the experiment's seeds, see `teacher_signs`) and averaged.

With true Hermite features (``features = "hermite"``) the same formulas are used with the
variance of h2 raised to ``1 + 12/d`` (the fourth cumulant of a Hermite feature), which moves
the spikes and the bulk edge of g = id. At d <~ 100 recovery lags further behind these curves
(single samples with |y| of 5-16 sigma give rank-one noise outliers above the Gaussian bulk):
the finite-size effect of the lift that no Gaussian-equivalent theory has. The exact
proportional-regime (finite n/D) theory for Gaussian mode lives apart (``theory.finite_size``
of the results document).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ._data import activation, power_law_weights
from ._spec import ModelSpec

# Monte Carlo samples of the other directions' part of h2, and Gauss-Hermite nodes over h_i
MOMENT_SAMPLES = 1 << 12
QUADRATURE_NODES = 24
# directions past this index (weights below 1/16 of unit norm) use the second-order Taylor
# form of the spike instead of the quadrature (cost: MOMENT_SAMPLES * QUADRATURE_NODES each)
QUADRATURE_DIRECTIONS = 256
# teachers whose signs are redrawn (dim * d1 normals each) only below this many draws
SIGN_DRAW_LIMIT = 20_000_000
SIGN_PATTERNS = 10


@lru_cache(maxsize=8)
def nu1(name: str) -> float:
    """``E[g'(Z)] / std(g(Z))`` for Z ~ N(0, 1), by Gauss-Hermite quadrature (exact for id)."""
    if name == "id":
        return 1.0
    nodes, w = np.polynomial.hermite_e.hermegauss(160)
    w = w / w.sum()
    g = activation(name, nodes)
    # E[g'(Z)] = E[Z g(Z)] (Stein), which avoids differentiating g
    slope = float(np.sum(w * nodes * g))
    mean = float(np.sum(w * g))
    std = math.sqrt(float(np.sum(w * (g - mean) ** 2)))
    return slope / std


def h2_variance(model: ModelSpec) -> float:
    """Variance of h2: 1 with Gaussian features, ``1 + 12/d`` with the Hermite lift (q = 2;
    ``1 + 12 sum lambda_i^2 tr(G_i^4)`` with ``tr G^4 ~ 2/d`` for random symmetric G)."""
    if model.features == "gaussian":
        return 1.0
    return 1.0 + (12.0 / model.d if model.q == 2 else 36.0 / model.d)


@dataclass(frozen=True)
class LabelMoments:
    """Moments of the label as the engine uses it (centred for id, standardised otherwise).

    Attributes
    ----------
    second : float
        ``E[y^2]``.
    spike : ndarray, shape (d1,)
        ``s_i = E[y (h_i^2 - 1)]``, signed (directions strongest first).
    coupling : ndarray, shape (d1,)
        ``E[y^2 h_i^2]``.
    """

    second: float
    spike: np.ndarray
    coupling: np.ndarray


def label_moments(model: ModelSpec, signed_weights: np.ndarray) -> LabelMoments:
    """`LabelMoments` for one teacher (signed weights, strongest first)."""
    lam = np.asarray(signed_weights, dtype=np.float64)
    noise2 = model.noise_std**2
    v = h2_variance(model)
    if model.activation == "id":
        # y = h2 + noise: s_i = lambda_i/sqrt2 E[(h_i^2 - 1)^2], E[h2^2 h_i^2] = 1 + 4 lambda_i^2
        return LabelMoments(
            second=v + noise2,
            spike=math.sqrt(2.0) * lam * v,
            coupling=v + 4.0 * lam**2 + noise2,
        )
    spike, coupling, mean, second = _nonlinear_moments(model.activation, tuple(lam.tolist()))
    raw2 = second + noise2
    # the engine standardises nonlinear labels: divide by their std
    return LabelMoments(
        second=1.0,
        spike=np.asarray(spike) / math.sqrt(raw2),
        coupling=(np.asarray(coupling) + noise2) / raw2,
    )


@lru_cache(maxsize=64)
def _nonlinear_moments(name: str, lam: tuple[float, ...]):
    """``(E[g~ X_i], E[g~^2 h_i^2], E[g], Var g)`` with ``g~ = g(h2) - E g(h2)``,
    ``X_i = h_i^2 - 1``, for Gaussian h and a centred weighted chi-square h2."""
    if name == "quadratic":
        return _quadratic_moments(np.asarray(lam))
    lam_a = np.asarray(lam)
    d1 = lam_a.size
    rng = np.random.default_rng(20260514)
    nodes, w = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)
    w = w / w.sum()
    x_nodes = nodes**2 - 1.0
    h = rng.standard_normal((MOMENT_SAMPLES, d1))
    t = h * h - 1.0
    a = lam_a / math.sqrt(2.0)
    h2 = t @ a
    spike = np.empty(d1)
    coupling = np.empty(d1)
    g_all = activation(name, h2)
    # mean and variance of g(h2) from the strongest direction's quadrature (exact in h_1)
    r0 = h2 - a[0] * t[:, 0]
    r0 = r0 - r0.mean()
    g0 = activation(name, a[0] * x_nodes[None, :] + r0[:, None])
    mean = float(np.mean(g0 @ w))
    second = float(np.mean(((g0 - mean) ** 2) @ w))
    eps = 1e-4
    gp = (activation(name, h2 + eps) - activation(name, h2 - eps)) / (2 * eps)
    gpp = (activation(name, h2 + eps) - 2 * g_all + activation(name, h2 - eps)) / eps**2
    for i in range(d1):
        if i < QUADRATURE_DIRECTIONS:
            r = h2 - a[i] * t[:, i]
            r = r - r.mean()  # E[R] = 0 exactly: a control variate for the MC part
            gk = activation(name, a[i] * x_nodes[None, :] + r[:, None]) - mean
            spike[i] = float(np.mean(gk @ (w * x_nodes)))
            coupling[i] = float(np.mean((gk * gk) @ (w * (x_nodes + 1.0))))
        else:
            # E[g(aX + R) X] = 2 a E[g'] + 4 a^2 E[g''] + O(a^3); E[g~^2 h_i^2] ~ Var g
            spike[i] = 2.0 * a[i] * float(gp.mean()) + 4.0 * a[i] ** 2 * float(gpp.mean())
            coupling[i] = second
    return tuple(spike), tuple(coupling), mean, second


def _quadratic_moments(lam: np.ndarray):
    """`_nonlinear_moments` for ``g(t) = t^2 + t - 1``, exactly: Gauss-Hermite over h_i (exact
    for polynomials) and the moments of ``R_i = h2 - lambda_i X_i / sqrt2`` from its
    cumulants (a weighted sum of centred chi-squares: ``kappa_r = sum_j a_j^r 2^(r-1)(r-1)!``)."""
    from numpy.polynomial import polynomial as poly

    a = lam / math.sqrt(2.0)
    nodes, w = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)
    w = w / w.sum()
    x_nodes = nodes**2 - 1.0
    chi = [0.0, 0.0, 2.0, 8.0, 48.0]  # cumulants of chi^2_1 - 1, orders 0..4

    def r_moments(i: int) -> np.ndarray:
        rest = np.delete(a, i)
        k2, k3, k4 = (float(np.sum(rest**r)) * chi[r] for r in (2, 3, 4))
        return np.array([1.0, 0.0, k2, k3, k4 + 3.0 * k2 * k2])

    def expect(i: int, weight_of_x) -> tuple[float, float]:
        """``(E[g~ X_i], E[g~^2 weight(X_i)])`` given the mean of g (a closure below)."""
        m = r_moments(i)
        first = second = 0.0
        for u, wk, xk in zip(a[i] * x_nodes, w, x_nodes):
            coef = np.array([u * u + u - 1.0 - mean, 2.0 * u + 1.0, 1.0])  # powers of R
            first += wk * xk * float(coef @ m[:3])
            sq = poly.polymul(coef, coef)
            second += wk * weight_of_x(xk) * float(sq @ m[: sq.size])
        return first, second

    mean = 0.0
    m0 = r_moments(0)
    for u, wk in zip(a[0] * x_nodes, w):
        mean += wk * float(np.array([u * u + u - 1.0, 2.0 * u + 1.0, 1.0]) @ m0[:3])
    variance = expect(0, lambda x: 1.0)[1]
    spike, coupling = [], []
    for i in range(a.size):
        s_i, _ = expect(i, lambda x: 1.0)
        _, c_i = expect(i, lambda x: x + 1.0)
        spike.append(s_i)
        coupling.append(c_i)
    return tuple(spike), tuple(coupling), mean, variance


@dataclass(frozen=True)
class Theory:
    """Asymptotic predictions for one teacher model, averaged over sign patterns.

    Attributes
    ----------
    feature_dim : int
    weights : ndarray, shape (d1,)
        |lambda_i|, decreasing.
    nu1 : float
        ``E[g'(Z)]/std(g(Z))``, the Gaussian first-order slope (for reference only: the
        spikes below are computed per direction).
    n_onset : ndarray, shape (d1,)
        BBP onset ``D E[y^2] / s_i^2`` (median over the sign patterns; inf for a direction
        whose spike cancels).
    n_half : ndarray, shape (d1,)
        Where the predicted (pattern-mean) cos2 crosses 1/2 (inf if never).
    noise_var : float
        Label-noise variance relative to the clean label variance.
    signs : ndarray, shape (P, d1)
        The sign patterns predictions are averaged over (the first is the spectrum's).
    spike : ndarray, shape (P, d1)
        Signed spikes ``s_i`` per pattern, in the engine's label units.
    tail : ndarray, shape (P, d1)
        ``E[y^2 h_i^2] / E[y^2]``: the eigenvector-tail factor.
    label_second : float
        ``E[y^2]`` in the engine's label units.
    h2_var : float
        Variance of h2 assumed (``1 + 12/d`` for Hermite features).
    features : str
    """

    feature_dim: int
    weights: np.ndarray
    nu1: float
    n_onset: np.ndarray
    n_half: np.ndarray
    noise_var: float
    signs: np.ndarray
    spike: np.ndarray
    tail: np.ndarray
    label_second: float
    h2_var: float
    features: str

    def _onsets(self) -> np.ndarray:
        """Per-pattern onsets ``D E[y^2] / s^2``, shape (P, d1)."""
        with np.errstate(divide="ignore"):
            return np.where(
                self.spike != 0,
                self.feature_dim * self.label_second / np.maximum(self.spike**2, 1e-300),
                np.inf,
            )

    def cos2(self, n) -> np.ndarray:
        """Predicted ``cos2_i(n) = max(0, 1 - tail_i n_onset_i / n)`` (0 below the onset),
        averaged over sign patterns, shape (len(n), d1)."""
        n = np.atleast_1d(np.asarray(n, dtype=np.float64))
        onset = self._onsets()[None, :, :]
        nn = n[:, None, None]
        with np.errstate(invalid="ignore"):
            c = np.clip(1.0 - self.tail[None] * onset / nn, 0.0, 1.0)
        c = np.where(nn > onset, c, 0.0)
        return c.mean(axis=1)

    def recovered(self, n) -> np.ndarray:
        """Predicted number of directions with cos2 > 1/2, shape (len(n),)."""
        return np.sum(self.cos2(n) > 0.5, axis=1)

    def overlap(self, n) -> np.ndarray:
        return np.mean(self.cos2(n), axis=1)

    def mse(self, n) -> np.ndarray:
        """``sum_i lambda_i^2 (1 - cos2_i^2)`` plus the noise floor, over the label variance."""
        c = self.cos2(n)
        clean = np.sum(self.weights[None, :] ** 2 * (1.0 - c * c), axis=1)
        return (clean + self.noise_var) / (1.0 + self.noise_var)

    def bulk_edge(self, n: float) -> float:
        """Edge of the noise bulk of C_hat: ``2 sqrt(D E[y^2] / n)`` (Gaussian-equivalent;
        with Hermite features E[y^2] includes Var(h2) = 1 + 12/d)."""
        return 2.0 * math.sqrt(self.feature_dim * self.label_second / n)

    def spikes(self, n: float, pattern: int = 0) -> np.ndarray:
        """Predicted signed outlier eigenvalues ``sign(s) (|s| + sigma^2/|s|)``,
        ``sigma^2 = D E[y^2] / n``, of the directions past their onset (largest |s| first)."""
        s = self.spike[pattern]
        sigma2 = self.feature_dim * self.label_second / n
        s = s[np.abs(s) > math.sqrt(sigma2)]
        s = s[np.argsort(-np.abs(s))]
        return np.sign(s) * (np.abs(s) + sigma2 / np.abs(s))


def theory(model: ModelSpec, signs: np.ndarray | None = None) -> Theory:
    """Predictions for a model spec.

    Parameters
    ----------
    signs : ndarray, shape (P, d1) or (d1,), optional
        Signs of the teachers' weights (see `teacher_signs`). Without them, all-positive
        weights for g = id (its predictions do not depend on them but for the spikes' signs)
        and `SIGN_PATTERNS` fixed random patterns for nonlinear g.
    """
    dim = model.feature_dim
    d1 = model.hidden_dim
    weights = power_law_weights(d1, model.gamma)
    if signs is None:
        if model.activation == "id":
            signs = np.ones((1, d1))
        else:
            rng = np.random.default_rng(20260515)
            signs = rng.choice(np.array([-1.0, 1.0]), size=(SIGN_PATTERNS, d1))
    signs = np.atleast_2d(np.asarray(signs, dtype=np.float64))
    moments = [label_moments(model, s * weights) for s in signs]
    spike = np.array([m.spike for m in moments])
    tail = np.array([m.coupling / m.second for m in moments])
    second = moments[0].second
    v = h2_variance(model)
    label_var = v if model.activation == "id" else _label_var(model.activation)
    noise_var = model.noise_std**2 / label_var
    with np.errstate(divide="ignore"):
        onsets = np.where(spike != 0, dim * second / np.maximum(spike**2, 1e-300), np.inf)
    th = Theory(
        feature_dim=dim,
        weights=weights,
        nu1=nu1(model.activation),
        n_onset=np.median(onsets, axis=0),
        n_half=np.zeros(d1),
        noise_var=noise_var,
        signs=signs,
        spike=spike,
        tail=tail,
        label_second=second,
        h2_var=v,
        features=model.features,
    )
    object.__setattr__(th, "n_half", _n_half(th))
    return th


def _n_half(th: Theory) -> np.ndarray:
    """Where the pattern-mean cos2 of each direction crosses 1/2, by bisection in log n."""
    onsets = th._onsets()
    finite = np.isfinite(onsets)
    hi_each = np.where(finite, 2.0 * onsets * np.maximum(th.tail, 0.5), 0.0)
    # the mean crosses 1/2 before the pattern that crosses it last, or never (inf)
    upper = np.max(np.where(finite, hi_each, 0.0), axis=0) * 4.0 + 1.0
    lo = np.full(onsets.shape[1], 1.0)
    hi = upper.copy()
    never = th.cos2(hi)[np.arange(hi.size), np.arange(hi.size)] < 0.5
    for _ in range(80):
        mid = np.sqrt(lo * hi)
        c = th.cos2(mid)[np.arange(mid.size), np.arange(mid.size)]
        lo = np.where(c < 0.5, mid, lo)
        hi = np.where(c < 0.5, hi, mid)
    return np.where(never, np.inf, hi)


def teacher_signs(spec, seeds: int | None = None) -> np.ndarray | None:
    """Signs of the weights of the first ``seeds`` seeds' teachers (at most `SIGN_PATTERNS`),
    shape (P, d1), drawn as `make_teacher` draws them; None when redrawing them would cost
    more than `SIGN_DRAW_LIMIT` normal draws each. Cached per (model, root seed, count)."""
    model = spec.model
    if model.feature_dim * model.hidden_dim > SIGN_DRAW_LIMIT:
        return None
    count = min(spec.sweep.seeds if seeds is None else seeds, SIGN_PATTERNS)
    return _teacher_signs(model.model_dump_json(), spec.sweep.seed, count)


@lru_cache(maxsize=32)
def _teacher_signs(model_json: str, root_seed: int, count: int) -> np.ndarray:
    from ._data import seed_rng
    from ._spec import ExperimentSpec

    spec = ExperimentSpec.model_validate(
        {
            "model": ModelSpec.model_validate_json(model_json),
            "sweep": {"n_values": [10], "seed": root_seed},
        }
    )
    model = spec.model
    out = []
    for k in range(count):
        rng = seed_rng(spec, k).spawn(5)[0]
        rng.standard_normal((model.feature_dim, model.hidden_dim))  # the directions, first
        out.append(rng.choice(np.array([-1.0, 1.0]), size=model.hidden_dim))
    signs = np.array(out)
    signs.setflags(write=False)
    return signs


def _label_var(name: str) -> float:
    if name == "id":
        return 1.0
    nodes, w = np.polynomial.hermite_e.hermegauss(160)
    w = w / w.sum()
    g = activation(name, nodes)
    return float(np.sum(w * (g - np.sum(w * g)) ** 2))


def exponent_theory(gamma: float) -> float | None:
    """Asymptotic MSE exponent ``-1 + 1/(2 gamma)`` for gamma > 1/2, else None."""
    return -1.0 + 1.0 / (2.0 * gamma) if gamma > 0.5 else None
