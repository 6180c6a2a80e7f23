"""Theory overlays (docs/model.md section 4): BBP onsets, cos2 curves, recovered count, MSE,
exponents.

These are the asymptotic (large n/D, Gaussian-equivalent) predictions. With true Hermite
features at d <~ 100, recovery lags behind them (finite-size smoothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ._data import activation, power_law_weights
from ._spec import ModelSpec


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


@dataclass(frozen=True)
class Theory:
    """Asymptotic predictions for one teacher.

    Attributes
    ----------
    feature_dim : int
    weights : ndarray, shape (d1,)
        |lambda_i|, decreasing.
    nu1 : float
    n_onset : ndarray, shape (d1,)
        BBP onset ``D / (2 nu1^2 lambda_i^2)``.
    n_half : ndarray, shape (d1,)
        ``2 n_onset``, where the predicted cos2 crosses 1/2.
    noise_var : float
        Label-noise variance relative to the clean label variance.
    """

    feature_dim: int
    weights: np.ndarray
    nu1: float
    n_onset: np.ndarray
    n_half: np.ndarray
    noise_var: float

    def cos2(self, n) -> np.ndarray:
        """Predicted ``cos2_i(n) = max(0, 1 - n_onset_i / n)``, shape (len(n), d1)."""
        n = np.atleast_1d(np.asarray(n, dtype=np.float64))
        return np.clip(1.0 - self.n_onset[None, :] / n[:, None], 0.0, 1.0)

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
        """Edge of the noise bulk of C_hat (standardised labels): ``2 sqrt(D / n)``."""
        return 2.0 * math.sqrt(self.feature_dim / n)

    def spikes(self, n: float) -> np.ndarray:
        """Predicted outlier positions ``s + (D/n)/s`` with ``s = sqrt2 nu1 |lambda_i|``, for
        directions past their onset (empty if none)."""
        s = math.sqrt(2.0) * self.nu1 * self.weights
        ratio = self.feature_dim / n
        s = s[s > math.sqrt(ratio)]
        return s + ratio / s


def theory(model: ModelSpec) -> Theory:
    """Predictions for a model spec (they depend on |lambda|, not on the random directions)."""
    dim = model.feature_dim
    weights = power_law_weights(model.hidden_dim, model.gamma)
    v = nu1(model.activation)
    onset = dim / (2.0 * v * v * weights**2)
    noise_var = model.noise_std**2 / _label_var(model.activation)
    return Theory(dim, weights, v, onset, 2.0 * onset, noise_var)


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
