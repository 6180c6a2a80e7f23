"""Exact proportional-regime theory of the layer-wise spectral method, Gaussian-equivalent mode.

With ``features = "gaussian"`` the first-layer matrix is a spectral estimator of a multi-index
model, ``C_hat = (1/n) sum_j T(y_j) z_j z_j^T`` with ``z ~ N(0, I_D)``, ``h = A z`` and
``T(y) = (y - E y) * scale`` (centred labels for ``id``, standardised ones otherwise; with
the method's ``label_clip``, clipped at that many standard deviations and centred again). As
``n, D -> infinity`` with ``n / D -> delta`` and ``d1`` fixed, its spectrum is a bulk (a
Marchenko-Pastur law weighted by T) plus at most one outlier per teacher direction on each side,
and the top eigenvectors' overlaps with the teacher directions converge. The derivation is in
``docs/theory.md``; in short, with ``e`` the (scaled) Stieltjes transform of the bulk,

* ``theta(e) = E[T / (1 + e T)] - 1 / (delta e)`` maps ``e`` to the spectral variable;
* the bulk edges are at the critical points ``delta e^2 E[T^2 / (1 + e T)^2] = 1``;
* direction i has an outlier where ``delta e kappa_i(e) = -1``, with
  ``kappa_i(e) = E[T (h_i^2 - 1) / (1 + e T)]`` (diagonal in i: the target is even in every h_i);
* its squared overlap is ``cos2_i = (1 - delta e^2 B(e)) / (1 + delta e^2 beta_i(e))`` with
  ``B = E[T^2 / (1 + e T)^2]`` and ``beta_i = E[T^2 (h_i^2 - 1) / (1 + e T)^2]``.

Expectations over the joint law of (h, y) use a fixed, seeded discretisation: Monte Carlo over
the other directions and the noise, Gauss-Hermite quadrature over ``h_i`` itself (so the
direction-specific parts carry no Monte Carlo noise in ``h_i``), compressed into bins of T with
their first three moments. At finite n the continuum is the law of T without its few most
extreme samples, whose own spikes compete with the outliers for the d1 slots (`_masks`,
`_select`, docs/theory.md section 6). The test MSE follows from the overlaps through the
second layer (fresh batch of n samples, ``A2_hat`` with its estimation noise, the readout of
the method).

All numbers are deterministic: the same inputs give the same outputs, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import ndtri
from scipy.stats import qmc

from ._data import activation, power_law_weights, seed_rng
from ._spec import MIN_N, ExperimentSpec, ModelSpec

# Discretisation of the law of (h, y): Monte Carlo samples of the other directions and the
# noise, Gauss-Hermite nodes along the direction itself, bins of T.
MC_SAMPLES = 4096
GH_NODES = 24
T_BINS = 512
# Quadrature nodes lighter than this (|h_i| >~ 5.6) do not set the range of T (their points
# outside it are dropped: a mass below any 1/n of interest)
RANGE_NODE_WEIGHT = 1e-8
# Monte Carlo samples of the second layer (MSE)
MSE_SAMPLES = 16384
N_HALF_GRID = 25  # log grid of n_half_finite_size, then regula falsi steps in log n
N_HALF_STEPS = 2
# The continuum of the spectrum: the law of T without its TAIL_SAMPLES most extreme samples on
# each side (in expectation); those and any beyond make single-sample spikes, counted against
# the outliers for the d1 slots (docs/theory.md section 6.1)
TAIL_SAMPLES = 4.0
BISECTIONS = 6  # then SECANT_STEPS Illinois steps: ~1e-8 relative
SECANT_STEPS = 6
_SEED = 0x48534C  # fixed: the theory is a deterministic function of its inputs
SQRT2 = math.sqrt(2.0)

# Teachers averaged over (the first seeds of a sweep), and the largest d1 and the largest
# D x d1 for which the seeds' own signs are re-drawn (beyond it: a fixed set of random signs)
MAX_TEACHERS = 5
MAX_D1 = 64
MAX_SIGN_DRAWS = 2 * 10**7

GAUSSIAN_ONLY = (
    "the exact finite-size theory holds for features = 'gaussian' only: the Hermite lift is "
    "not Gaussian at finite d (heavy-tailed h2_hat, Var(h2) ~ 1 + 12/d)"
)


@dataclass(frozen=True)
class FiniteSizePoint:
    """The exact proportional-regime prediction at one sample size.

    Attributes
    ----------
    n : float
    mse : float
        Test MSE over the label variance (second layer on a fresh batch of n samples).
    overlap : float
        Mean of ``cos2``.
    recovered : float
        Number of directions with ``cos2 > 1/2`` (a mean when averaged over teachers).
    cos2 : tuple of float
        Per direction, strongest first: squared overlap of ``A_i`` with the top-d1 span (the
        limit plus the O(d1/D) share of the bulk eigenvectors in free slots, see `_select`).
    cos2_limit : tuple of float
        The same in the strict limit (kept outliers only).
    bulk_edge : float
        ``max(theta_+, -theta_-)``: eigenvalues of the bulk stay below it in magnitude.
    bulk_edges : tuple of float
        ``(theta_-, theta_+)``, the left and right edges of the bulk (C_hat's units).
    outliers : tuple of float or None
        Per direction the signed outlier eigenvalue that carries it (the larger in magnitude
        if it has two), None if it has none.
    """

    n: float
    mse: float
    overlap: float
    recovered: float
    cos2: tuple[float, ...]
    cos2_limit: tuple[float, ...]
    bulk_edge: float
    bulk_edges: tuple[float, float]
    outliers: tuple[float | None, ...]


# ---------------------------------------------------------------------------------------------
# The law of (h, T): binned measures


@dataclass(frozen=True)
class _Law:
    """Binned measures of T: the law of T and, per direction, ``(h_i^2 - 1) dP``.

    ``centres`` (B,); ``base`` (3, B) moments ``sum w (t - c)^k`` for k = 0, 1, 2 of the law of
    T; ``spike`` (3, d1, B) the same for the signed weights ``w (h_i^2 - 1)``; ``cdf`` the
    cumulative mass of T by bin; ``mean``, ``scale`` the label transform ``T = (y - mean) *
    scale``; ``b`` (d1,) ``E[(y - E y)(h_i^2 - 1)]`` in label units.
    """

    centres: np.ndarray
    base: np.ndarray
    spike: np.ndarray
    cdf: np.ndarray
    mean: float
    scale: float
    b: np.ndarray


def _gh() -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.hermite_e.hermegauss(GH_NODES)
    return x, w / w.sum()


@lru_cache(maxsize=16)
def _normals(count: int, dim: int, seed: int) -> np.ndarray:
    """Standard Gaussian points, shape (count, dim): a scrambled Sobol sequence (count a power
    of two) mapped through the normal quantile, far less noisy than plain Monte Carlo for the
    smooth expectations here; fixed by ``seed``."""
    u = qmc.Sobol(dim, scramble=True, seed=seed).random(count)
    out = ndtri(np.clip(u, 1e-16, 1 - 1e-16))
    out.setflags(write=False)
    return out


def _labels(name: str, h2: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return activation(name, h2) + noise


@lru_cache(maxsize=64)
def _law(
    weights: tuple[float, ...],
    act: str,
    noise_std: float,
    preprocess: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    clip: float | None = None,
) -> _Law:
    """The discretised joint law of (h, T) for signed weights ``lambda``.

    ``preprocess``: optional knots ``(t, T(t))`` of another preprocessing, applied (linear
    interpolation, constant beyond the knots) to the engine's ``T`` and centred again; the
    theory holds for any function of the label (docs/theory.md section 10). ``clip``: the
    method's ``label_clip``, the engine's ``T`` clipped at ``+-clip`` standard deviations of
    y and centred again (a preprocessing with the knots ``+-clip sd scale``).
    """
    lam = np.asarray(weights, dtype=np.float64)
    d1 = lam.size
    a = lam / SQRT2
    g = _normals(MC_SAMPLES, d1 + 1, _SEED)
    h = g[:, :d1]
    eps = noise_std * g[:, d1] if noise_std > 0 else np.zeros(MC_SAMPLES)
    he = h * h - 1.0
    h2 = he @ a
    x, wq = _gh()
    xe = x * x - 1.0
    w_pt = np.broadcast_to(wq[None, :] / (MC_SAMPLES * d1), (MC_SAMPLES, GH_NODES))

    def y_dir(i: int) -> np.ndarray:  # labels with h_i on the quadrature nodes, (N, Q)
        rest = h2 - a[i] * he[:, i]
        return _labels(act, rest[:, None] + a[i] * xe[None, :], eps[:, None])

    # label mean and scale from the pooled discretisation (every direction's is a valid one)
    ys = [y_dir(i) for i in range(d1)]
    mean = float(sum(np.sum(w_pt * y) for y in ys))
    var = float(sum(np.sum(w_pt * (y - mean) ** 2) for y in ys))
    scale = 1.0 if act == "id" else 1.0 / math.sqrt(var) if var > 0 else 1.0
    ts = [(y - mean) * scale for y in ys]
    if clip is not None:
        if preprocess is not None:
            raise ValueError("give a clip or a preprocessing, not both")
        bound = float(clip) * math.sqrt(var) * scale
        preprocess = ((-bound, bound), (-bound, bound))
    if preprocess is not None:
        ts = [np.interp(t, preprocess[0], preprocess[1]) for t in ts]
        shift = float(sum(np.sum(w_pt * t) for t in ts))
        ts = [t - shift for t in ts]
    # range of T: every point but those on quadrature nodes of negligible weight
    far = wq >= RANGE_NODE_WEIGHT
    lo = min(float(np.min(t[:, far])) for t in ts)
    hi = max(float(np.max(t[:, far])) for t in ts)
    edges = np.linspace(lo, hi, T_BINS + 1)
    width = edges[1] - edges[0]
    centres = (edges[:-1] + edges[1:]) / 2
    base = np.zeros((3, T_BINS))
    spike = np.zeros((3, d1, T_BINS))
    b = np.zeros(d1)
    for i, (y, t) in enumerate(zip(ys, ts)):
        t = t.ravel()
        keep = (t >= lo) & (t <= hi)
        idx = np.minimum(((t[keep] - lo) / width).astype(np.intp), T_BINS - 1)
        dt = t[keep] - centres[idx]
        w0 = w_pt.ravel()[keep]
        ws = (w_pt * xe[None, :]).ravel()[keep] * d1  # (h_i^2 - 1) dP of direction i
        for k in range(3):
            base[k] += np.bincount(idx, w0 * dt**k, minlength=T_BINS)
            spike[k, i] = np.bincount(idx, ws * dt**k, minlength=T_BINS)
        b[i] = float(np.sum((w_pt * xe[None, :]) * (y - mean)) * d1)
    cdf = np.cumsum(base[0])
    for arr in (centres, base, spike, cdf, b):
        arr.setflags(write=False)
    return _Law(centres, base, spike, cdf, mean, scale, b)


# ---------------------------------------------------------------------------------------------
# Expectations as functions of e


def _expect(law: _Law, e: np.ndarray, mask: np.ndarray, moments: np.ndarray, power: int):
    """``E[F(T) w]`` for ``F = (t/(1+et))^power`` (power 1, 2 or 3) and the binned weights
    ``moments`` (3, ..., B): each bin contributes ``F(c) m0 + F'(c) m1 + F''(c) m2 / 2``.

    e has shape (...,); mask (..., B) the bins kept (1.0) or dropped (0.0).
    """
    c = law.centres
    e_ = e[..., None]
    u = 1.0 / (1.0 + e_ * c)
    f = c * u
    fp = u * u
    fpp = (-2.0 * e_) * fp * u
    if power == 2:
        f, fp, fpp = f * f, 2.0 * f * fp, 2.0 * (fp * fp + f * fpp)
    elif power == 3:
        f2 = f * f
        f, fp, fpp = f2 * f, 3.0 * f2 * fp, 6.0 * f * fp * fp + 3.0 * f2 * fpp
    total = f * moments[0]
    total += fp * moments[1]
    total += 0.5 * fpp * moments[2]
    total *= mask
    return np.sum(total, axis=-1)


def _root(fun, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Vectorised root of fun between lo (fun <= 0) and hi (fun > 0): bisection steps, then
    Illinois (modified regula falsi) steps that keep the bracket."""
    f_lo, f_hi = np.full(lo.shape, -1.0), np.full(hi.shape, 1.0)
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        fm = fun(mid)
        neg = fm <= 0
        lo, f_lo = np.where(neg, mid, lo), np.where(neg, fm, f_lo)
        hi, f_hi = np.where(neg, hi, mid), np.where(neg, f_hi, fm)
    side = np.zeros(lo.shape, dtype=np.int8)
    for _ in range(SECANT_STEPS):
        denom = f_hi - f_lo
        x = np.where(denom != 0, lo - f_lo * (hi - lo) / np.where(denom != 0, denom, 1.0), lo)
        x = np.clip(x, np.minimum(lo, hi), np.maximum(lo, hi))
        fx = fun(x)
        neg = fx <= 0
        # Illinois: halve the value kept at the end that stays twice in a row
        f_hi = np.where(neg & (side == -1), f_hi / 2, f_hi)
        f_lo = np.where(~neg & (side == 1), f_lo / 2, f_lo)
        lo, f_lo = np.where(neg, x, lo), np.where(neg, fx, f_lo)
        hi, f_hi = np.where(neg, hi, x), np.where(neg, f_hi, fx)
        side = np.where(neg, -1, 1).astype(np.int8)
    denom = f_hi - f_lo
    return np.where(denom != 0, lo - f_lo * (hi - lo) / np.where(denom != 0, denom, 1.0), lo)


def _masks(law: _Law, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bins kept at each n: T truncated where ``TAIL_SAMPLES`` of the n samples are expected
    beyond on each side. The few samples beyond are far apart: they make single-sample spikes
    (counted by `_tail_count`), not part of the deterministic continuum, whose edge a dense law
    up to the last sample would push out. Returns the mask (len(n), B) and the extreme kept
    bin centres."""
    total = law.cdf[-1]
    tail = total * np.minimum(TAIL_SAMPLES / n[:, None], 0.25)
    below = law.cdf[None, :] - law.base[0][None, :]  # mass strictly below each bin
    mask = (law.cdf[None, :] > tail) & (below < total - tail)
    c = law.centres
    t_hi = np.max(np.where(mask, c, -np.inf), axis=1)
    t_lo = np.min(np.where(mask, c, np.inf), axis=1)
    return mask.astype(np.float64), t_lo, t_hi


def _tail_count(law: _Law, n: np.ndarray, t: np.ndarray, side: int) -> np.ndarray:
    """Expected number of the n samples with T beyond ``t`` (above it for side 0, the right,
    below it for side 1), from the law's cumulative mass (linear within a bin); ``t`` has
    shape (len(n), ...)."""
    half = (law.centres[1] - law.centres[0]) / 2
    edges = np.append(law.centres - half, law.centres[-1] + half)
    cum = np.concatenate([[0.0], law.cdf]) / law.cdf[-1]
    below = np.interp(t, edges, cum)
    frac = 1.0 - below if side == 0 else below
    return n.reshape((-1,) + (1,) * (np.ndim(t) - 1)) * frac


def _solve(law: _Law, n: np.ndarray, dim: int) -> dict[str, np.ndarray]:
    """Bulk edges, outliers and their overlaps at the sample sizes ``n`` for one teacher.

    Returns ``edges`` (2, k): left and right edge; ``theta`` (2, k, d1): the right and left
    outlier of each direction (nan where there is none); ``cos2`` (2, k, d1) their squared
    overlaps with the direction (0 where there is none).
    """
    k, d1 = n.size, law.b.size
    # the bulk is the complement block, D - d1 dimensions (n / D would be the same in the
    # limit; at d1 = 8 and D = 465 it moves thresholds by 1.7 %)
    delta = n / (dim - d1)
    mask, t_lo, t_hi = _masks(law, n)
    tiny = 1e-300
    # the law's support ends at the extreme kept centres: 1 + e t > 0 needs e in (pole_r, pole_l)
    pole_r = np.where(t_hi > 0, -1.0 / np.maximum(t_hi, tiny), -1e12) * (1 - 1e-9)
    pole_l = np.where(t_lo < 0, -1.0 / np.minimum(t_lo, -tiny), 1e12) * (1 - 1e-9)

    def edge_fun(e):  # 1 - delta e^2 B(e): 1 at e = 0, decreasing in |e| to -inf at the poles
        return 1.0 - delta * e * e * _expect(law, e, mask, law.base, 2)

    e_edge = (_root(edge_fun, pole_r, np.full(k, -tiny)), _root(edge_fun, pole_l, np.full(k, tiny)))
    edges = np.stack(
        [_expect(law, e, mask, law.base, 1) - 1.0 / (delta * e) for e in (e_edge[1], e_edge[0])]
    )
    # curvature theta''(e) at the edges: the bulk density there is (delta / pi) sqrt(2 s /
    # |theta''|) at distance s inside the edge
    curv = np.stack(
        [
            2.0 * _expect(law, e, mask, law.base, 3) - 2.0 / (delta * e**3)
            for e in (e_edge[1], e_edge[0])
        ]
    )

    spike = np.broadcast_to(law.spike[:, None], (3, k, d1, law.centres.size))
    mask3 = mask[:, None, :]
    dl = delta[:, None]

    def g_fun(e):  # 1 + delta e kappa_i(e): 1 at e = 0; the outlier is where it vanishes
        return 1.0 + dl * e * _expect(law, e, mask3, spike, 1)

    thetas, cos2s, ratios, singles = [], [], [], []
    for side, e_b in enumerate(e_edge):
        ee = np.broadcast_to(e_b[:, None], (k, d1))
        g_edge = g_fun(ee)
        has = g_edge < 0  # S_ii is monotone in theta: one outlier iff G < 0 at the edge
        # bulk eigenvectors at the edge: D (v . A_i)^2 -> (1 + delta e^2 beta_i) / G_i^2
        beta_edge = _expect(law, ee, mask3, spike, 2)
        ratios.append((1.0 + dl * ee * ee * beta_edge) / np.maximum(g_edge * g_edge, 1e-300))
        zero = np.full((k, d1), -tiny if side == 0 else tiny)
        root = _root(g_fun, np.where(has, ee, zero), zero)
        base = np.broadcast_to(law.base[:, None, None], (3, k, d1, law.centres.size))
        a_ = _expect(law, root, mask3, base, 1)
        b_ = _expect(law, root, mask3, base, 2)
        beta = _expect(law, root, mask3, spike, 2)
        e2 = dl * root * root
        th = a_ - 1.0 / (dl * root)
        c2 = (1.0 - e2 * b_) / (1.0 + e2 * beta)
        thetas.append(np.where(has, th, np.nan))
        cos2s.append(np.where(has, np.clip(c2, 0.0, 1.0), 0.0))
        # samples whose own spike lies beyond the outlier: T beyond -1 / e_i on its side
        t_i = -1.0 / np.where(has, root, -1e-300 if side == 0 else 1e-300)
        singles.append(np.where(has, _tail_count(law, n, t_i, side), 0.0))
    return {
        "edges": edges,
        "curvature": np.abs(curv),
        "delta": delta,
        "theta": np.stack(thetas),
        "cos2": np.stack(cos2s),
        "edge_ratio": np.stack(ratios),
        "singles": np.stack(singles),
    }


def _select(sol: dict[str, np.ndarray], d1: int, dim: int):
    """What the top-d1-by-magnitude rule keeps. The d1 slots go to the largest eigenvalues in
    magnitude: an outlier is kept if the outliers larger than it, the expected number of
    bulk eigenvalues larger than it (from the square-root law at each edge, D - d1 times the
    edge mass beyond it; infinite in the limit when an edge lies beyond it) and the expected
    single-sample spikes beyond it (``sol["singles"]``) leave it a slot, a fraction of one
    when that count is not an integer.

    Returns per (n, direction) the overlap with the kept span, its limit part (the kept
    outliers alone), the outlier reported for the direction (the larger in magnitude, nan if
    none), and the bulk radius per n. The overlap adds, for directions without a kept
    outlier, the O(1/D) share of the bulk eigenvectors that fill the free slots: each at the
    outer edge holds ``(1 + delta e^2 beta_i) / G_i^2`` over D of A_i (the limit density ratio
    of A_i's spectral measure to the bulk's at the edge), and the share is capped at
    ``D^(-1/3)``, the overlap scale at criticality in finite D (where ``G_i -> 0``). It
    vanishes as D grows but is visible at D ~ 500 (a finite-size term, not part of the limit).
    """
    theta, c2 = sol["theta"], sol["cos2"]  # (2, k, d1)
    edges, curv, delta = sol["edges"], sol["curvature"], sol["delta"]
    radius = np.maximum(edges[1], -edges[0])  # (k,)
    k = theta.shape[1]
    mag = np.where(np.isnan(theta), -np.inf, np.abs(theta))
    # expected bulk eigenvalues beyond |theta| in magnitude, from the square-root law of each
    # edge: D (delta / pi) sqrt(2 / |theta''|) (2/3) s^(3/2) for an edge s beyond |theta|
    bulk = np.zeros(theta.shape)
    for side in range(2):
        s_in = np.maximum(
            0.0, np.abs(edges[side])[None, :, None] - np.where(np.isfinite(mag), mag, 0.0)
        )
        dens = (delta / math.pi) * np.sqrt(2.0 / np.maximum(curv[side], 1e-300))
        bulk += (dim - d1) * dens[None, :, None] * (2.0 / 3.0) * s_in**1.5
    flat = mag.transpose(1, 0, 2).reshape(k, 2 * d1)
    rank = np.argsort(np.argsort(-flat, axis=1, kind="stable"), axis=1, kind="stable")
    rank = rank.reshape(k, 2, d1).transpose(1, 0, 2)  # outliers larger than this one
    # kept fraction: the d1 slots go to the largest eigenvalues, outliers and bulk alike
    bulk += sol["singles"]  # single-sample spikes beyond the outlier
    kept = np.where(np.isfinite(mag), np.clip(d1 - rank - bulk, 0.0, 1.0), 0.0)
    limit = np.sum(kept * c2, axis=0)
    free = d1 - np.sum(kept, axis=(0, 2))  # (k,) slots filled from the bulk
    outer = np.where(edges[1] >= -edges[0], 0, 1)  # the outer edge's side
    ratio = sol["edge_ratio"][outer, np.arange(k)]  # (k, d1)
    share = np.clip(free[:, None] * ratio / dim, 0.0, dim ** (-1.0 / 3.0))
    none = 1.0 - np.minimum(1.0, np.sum(kept, axis=0))
    cos2 = np.minimum(1.0, limit + none * share)
    pick = np.argmax(mag, axis=0)  # (k, d1): the side with the larger outlier
    reported = np.take_along_axis(theta, pick[None], axis=0)[0]
    return cos2, limit, reported, radius


def _mse(
    weights: tuple[float, ...],
    act: str,
    noise_std: float,
    b: np.ndarray,
    cos2: np.ndarray,
    n: np.ndarray,
    degree: int,
    ridge: float,
) -> np.ndarray:
    """Test MSE (over the label variance) of the second layer fitted on a fresh batch of n
    samples, for learned directions with overlaps ``cos2`` (k, d1).

    Asymptotically the learned span meets the teacher's diagonally: ``h_hat_k = sqrt(c_k) h_k
    + sqrt(1 - c_k) xi_k`` with xi independent standard Gaussian, so ``A2_hat = diag(c_k b_k)
    + Delta`` where ``b_k = E[y (h_k^2 - 1)]`` and Delta is the estimation noise of n samples
    (entry variances ``Var(y (h_hat_k h_hat_l - delta_kl)) / n``). The readout sees
    ``t = sum_k c_k b_k (h_hat_k^2 - 1) + (h_hat^T Delta h_hat - tr Delta)``; the last term has
    variance ``2 E tr Delta^2`` and no correlation with y on average. For an affine readout the
    MSE is ``1 - cov(y, t)^2 / (var y var t)`` in closed form; for a polynomial one the readout
    (the method's degree and ridge, winsorised as in the engine) is fitted on a fixed
    quasi-Monte Carlo sample with the last term drawn as independent Gaussian noise. The
    readout's own n-sample noise adds ``(degree + 1) / n``.
    """
    lam = np.asarray(weights, dtype=np.float64)
    d1 = lam.size
    m = MSE_SAMPLES
    g = _normals(m, 2 * d1 + 2, _SEED + 1)
    h, xi, eta = g[:, :d1], g[:, d1 : 2 * d1], g[:, 2 * d1]
    eps = noise_std * g[:, 2 * d1 + 1] if noise_std > 0 else 0.0
    y = activation(act, ((h * h - 1.0) @ lam) / SQRT2) + eps
    yc = y - y.mean()
    y2 = yc * yc
    var_y = float(np.mean(y2))
    # moments of y^2 with the teacher's h (xi is independent: its moments are exact)
    hsq = h * h
    p0 = var_y
    p1 = y2 @ hsq / m  # E[y^2 h_k^2]
    p2 = (hsq * y2[:, None]).T @ hsq / m  # E[y^2 h_k^2 h_l^2]
    q = y2 @ (hsq - 1.0) ** 2 / m  # E[y^2 (h_k^2 - 1)^2]
    out = np.empty(n.size)
    for j in range(n.size):
        c = np.clip(cos2[j], 0.0, 1.0)
        a2 = c * b
        # E[y^2 (hh_k hh_l - delta_kl)^2]: off the diagonal E[y^2 hh_k^2 hh_l^2], on it
        # E[y^2 (hh_k^2 - 1)^2], with hh = sqrt(c) h + sqrt(1 - c) xi
        u = 1.0 - c
        mom = np.outer(c, c) * p2 + np.outer(c * p1, u) + np.outer(u, c * p1) + np.outer(u, u) * p0
        mom[np.diag_indices(d1)] = c * c * q + 2.0 * u * u * p0 + 4.0 * c * u * p1
        var_noise = 2.0 * max(0.0, float(np.sum(mom) - np.sum(a2 * a2))) / n[j]
        inflate = 1.0 + (degree + 1) / n[j]
        if degree == 1:  # cov(y, t) = sum a2_k b_k c_k... = sum a2_k^2 / c_k * c_k = sum a2^2 / 1
            cov = float(np.sum(a2 * c * b))
            var_t = 2.0 * float(np.sum(a2 * a2)) + var_noise
            rho2 = cov * cov / (var_y * var_t) if var_t > 0 else 0.0
            out[j] = (1.0 - rho2) * inflate
            continue
        hh = np.sqrt(c) * h + np.sqrt(u) * xi
        t = (hh * hh - 1.0) @ a2 + math.sqrt(var_noise) * eta
        out[j] = _readout_mse(t, y, degree, ridge) / var_y * inflate
    return out


def _readout_mse(t: np.ndarray, y: np.ndarray, degree: int, ridge: float) -> float:
    """Mean squared residual of the engine's readout (standardised, winsorised for degree > 1,
    ridge on all but the intercept) fitted on (t, y)."""
    std = float(np.std(t))
    z = (t - t.mean()) / (std if std > 0 else 1.0)
    if degree > 1:
        lo, hi = np.quantile(z, (0.005, 0.995))
        z = np.clip(z, lo, hi)
    phi = np.vander(z, degree + 1, increasing=True)
    penalty = ridge * z.size * np.eye(degree + 1)
    penalty[0, 0] = 0.0
    coef = np.linalg.solve(phi.T @ phi + penalty, phi.T @ y)
    r = y - phi @ coef
    return float(np.mean(r * r))


# ---------------------------------------------------------------------------------------------
# Public API


def teacher_signs(spec: ExperimentSpec, seed_index: int) -> np.ndarray:
    """The signs ``s_i`` of seed ``seed_index``'s teacher, as `make_teacher` draws them
    (the directions are drawn first from the same stream, so they are drawn and discarded)."""
    return np.array(_signs(spec.model, spec.sweep.seed, seed_index))


@lru_cache(maxsize=256)
def _signs(model: ModelSpec, root: int, seed_index: int) -> tuple[float, ...]:
    spec = ExperimentSpec(model=model, sweep={"n_values": [MIN_N], "seed": root})
    teacher_rng = seed_rng(spec, seed_index).spawn(5)[0]  # as make_seed_data splits it
    teacher_rng.standard_normal((model.feature_dim, model.hidden_dim))
    return tuple(float(x) for x in teacher_rng.choice(np.array([-1.0, 1.0]), size=model.hidden_dim))


def _method_readout(spec: ExperimentSpec | None, model: ModelSpec) -> tuple[int, float]:
    degree, ridge = (1 if model.activation == "id" else 5), 1e-3
    if spec is not None:
        for meth in spec.methods:
            if meth.name == "layerwise_spectral":
                if meth.readout_degree is not None:
                    degree = meth.readout_degree
                ridge = meth.readout_ridge
                break
    return degree, ridge


def _method_clip(spec: ExperimentSpec | None) -> float | None:
    """The ``label_clip`` of the spec's layer-wise spectral method (at most one per spec)."""
    if spec is not None:
        for meth in spec.methods:
            if meth.name == "layerwise_spectral":
                return meth.label_clip
    return None


def _one_teacher(
    model: ModelSpec, weights: tuple[float, ...], n: np.ndarray, readout, clip: float | None
):
    law = _law(weights, model.activation, float(model.noise_std), clip=clip)
    sol = _solve(law, n, model.feature_dim)
    cos2, limit, outliers, radius = _select(sol, len(weights), model.feature_dim)
    mse = _mse(weights, model.activation, float(model.noise_std), law.b, cos2, n, *readout)
    return cos2, mse, outliers, sol["edges"], radius, limit


def finite_size_curve(
    spec: ExperimentSpec | ModelSpec,
    n_values,
    *,
    signs=None,
    seeds: int | None = None,
    label_clip: float | None = None,
) -> list[FiniteSizePoint]:
    """The exact proportional-regime prediction at each n of ``n_values``.

    Parameters
    ----------
    spec : ExperimentSpec or ModelSpec
        With an experiment spec the teachers are its seeds' (their signs matter when the label
        law is not symmetric) and the readout is its layer-wise spectral method's; with a model
        spec alone, ``signs`` (default: all +1) and the default readout.
    n_values : sequence of float
    signs : sequence of +-1, optional
        The teacher's signs ``s_i`` (one teacher). Overrides the spec's seeds.
    seeds : int, optional
        Average over the teachers of seeds ``0 .. seeds - 1`` (default: the spec's
        ``sweep.seeds``; at most `MAX_TEACHERS`). ``cos2``, ``overlap``, ``recovered`` and
        ``mse`` are the means over the teachers; ``bulk_edges``, ``bulk_edge`` and
        ``outliers`` are the first teacher's. Where ``D d1`` exceeds `MAX_SIGN_DRAWS` the
        seeds' signs are not replayed and a fixed set of random signs stands for them.
    label_clip : float, optional
        The first layer's labels clipped at this many standard deviations (the method option
        ``label_clip``, an extension). Default: the spec's layer-wise spectral method's (T = y
        without one, or with a model spec alone).

    Raises
    ------
    ValueError
        For Hermite features (the theory is exact for Gaussian-equivalent features only), a
        d1 above `MAX_D1`, or an n <= 1.
    """
    full = spec if isinstance(spec, ExperimentSpec) else None
    model = spec.model if isinstance(spec, ExperimentSpec) else spec
    _check(model)
    n = np.atleast_1d(np.asarray(n_values, dtype=np.float64))
    if n.size == 0:
        return []
    if np.any(~np.isfinite(n)) or np.any(n <= 1):
        raise ValueError("n_values: every n must be a finite number > 1")
    sign_sets = _sign_sets(full, model, signs, seeds)
    clip = _method_clip(full) if label_clip is None else float(label_clip)
    ns = tuple(float(x) for x in n)
    return _curve(model, ns, sign_sets, _method_readout(full, model), clip)


def _check(model: ModelSpec) -> None:
    if model.features != "gaussian":
        raise ValueError(f"model.features: {GAUSSIAN_ONLY}")
    if model.hidden_dim > MAX_D1:
        raise ValueError(f"model.d1: the finite-size theory is computed for d1 <= {MAX_D1}")


def _sign_sets(full, model: ModelSpec, signs, seeds) -> tuple[tuple[float, ...], ...]:
    if signs is not None:
        s = np.asarray(signs, dtype=np.float64)
        if s.shape != (model.hidden_dim,) or np.any(np.abs(s) != 1):
            raise ValueError(f"signs: need {model.hidden_dim} values of +1 or -1")
        return (tuple(s),)
    if full is None:
        return (tuple([1.0] * model.hidden_dim),)
    count = min(MAX_TEACHERS, full.sweep.seeds if seeds is None else int(seeds))
    if model.feature_dim * model.hidden_dim > MAX_SIGN_DRAWS:  # too costly to replay
        rng = np.random.default_rng(_SEED + 2)
        return tuple(
            tuple(rng.choice(np.array([-1.0, 1.0]), size=model.hidden_dim)) for _ in range(count)
        )
    return tuple(_signs(model, full.sweep.seed, i) for i in range(count))


@lru_cache(maxsize=32)
def _curve(
    model: ModelSpec, n: tuple[float, ...], sign_sets, readout, clip: float | None
) -> list[FiniteSizePoint]:
    ns = np.asarray(n)
    mag = power_law_weights(model.hidden_dim, model.gamma)
    runs = [_one_teacher(model, tuple(mag * np.asarray(s)), ns, readout, clip) for s in sign_sets]
    cos2 = np.mean([r[0] for r in runs], axis=0)
    rec = np.mean([np.sum(r[0] > 0.5, axis=1) for r in runs], axis=0)
    mse = np.mean([r[1] for r in runs], axis=0)
    limit = np.mean([r[5] for r in runs], axis=0)
    outliers, edges, radius = runs[0][2], runs[0][3], runs[0][4]
    return [
        FiniteSizePoint(
            n=float(ns[j]),
            mse=float(mse[j]),
            overlap=float(cos2[j].mean()),
            recovered=float(rec[j]),
            cos2=tuple(float(c) for c in cos2[j]),
            cos2_limit=tuple(float(c) for c in limit[j]),
            bulk_edge=float(radius[j]),
            bulk_edges=(float(edges[0, j]), float(edges[1, j])),
            outliers=tuple(None if math.isnan(o) else float(o) for o in outliers[j]),
        )
        for j in range(ns.size)
    ]


def n_half_finite_size(
    spec: ExperimentSpec | ModelSpec,
    *,
    signs=None,
    seeds: int | None = None,
    n_range: tuple[float, float] | None = None,
    label_clip: float | None = None,
) -> list[float | None]:
    """Per direction, the smallest n where the predicted (teacher-mean) cos2 reaches 1/2.

    Found on a log grid over ``n_range`` (default ``[D / 4, 1e4 D]``), then refined by
    bisection in log n. None where it is not reached in the range. ``label_clip`` as in
    `finite_size_curve` (default: the spec's method's).
    """
    full = spec if isinstance(spec, ExperimentSpec) else None
    model = spec.model if isinstance(spec, ExperimentSpec) else spec
    _check(model)
    dim = model.feature_dim
    lo_n, hi_n = n_range if n_range is not None else (max(2.0, dim / 4.0), 1e4 * dim)
    if not 1 < lo_n < hi_n:
        raise ValueError(f"n_range: need 1 < lo < hi, got {n_range}")
    clip = _method_clip(full) if label_clip is None else float(label_clip)
    sign_sets = _sign_sets(full, model, signs, seeds)
    return list(_n_half(model, sign_sets, float(lo_n), float(hi_n), clip))


@lru_cache(maxsize=32)
def _n_half(
    model: ModelSpec, sign_sets, lo_n: float, hi_n: float, clip: float | None
) -> tuple[float | None, ...]:
    dim = model.feature_dim
    d1 = model.hidden_dim
    mag = power_law_weights(d1, model.gamma)

    def cos2_at(ns: np.ndarray) -> np.ndarray:  # (len(ns), d1), mean over teachers
        laws = [
            _law(tuple(mag * np.asarray(s)), model.activation, float(model.noise_std), clip=clip)
            for s in sign_sets
        ]
        return np.mean([_select(_solve(law, ns, dim), d1, dim)[0] for law in laws], axis=0)

    grid = np.geomspace(lo_n, hi_n, N_HALF_GRID)
    c = cos2_at(grid)
    lo = np.full(d1, np.nan)
    hi = np.full(d1, np.nan)
    for i in range(d1):
        above = np.flatnonzero(c[:, i] >= 0.5)
        if above.size:
            j = int(above[0])
            lo[i], hi[i] = (grid[j - 1], grid[j]) if j > 0 else (grid[0], grid[0])
    todo = np.flatnonzero(np.isfinite(lo) & (lo < hi))
    if todo.size:  # regula falsi in log n on the bracket, all directions at once
        rows = np.arange(todo.size)
        a, b = np.log(lo[todo]), np.log(hi[todo])
        fa = np.array([np.interp(x, np.log(grid), c[:, i]) for x, i in zip(a, todo)]) - 0.5
        fb = np.array([np.interp(x, np.log(grid), c[:, i]) for x, i in zip(b, todo)]) - 0.5
        for _ in range(N_HALF_STEPS):
            x = np.where(fb > fa, a - fa * (b - a) / np.where(fb > fa, fb - fa, 1.0), (a + b) / 2)
            x = np.clip(x, a + 0.02 * (b - a), b - 0.02 * (b - a))
            fx = cos2_at(np.exp(x))[rows, todo] - 0.5
            up = fx >= 0
            b, fb = np.where(up, x, b), np.where(up, fx, fb)
            a, fa = np.where(up, a, x), np.where(up, fa, fx)
        x = np.where(fb > fa, a - fa * (b - a) / np.where(fb > fa, fb - fa, 1.0), b)
        hi[todo] = np.exp(np.clip(x, a, b))
    return tuple(None if not np.isfinite(x) else float(x) for x in hi)
