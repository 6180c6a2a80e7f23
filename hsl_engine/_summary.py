"""Summaries of a set of points: curves, per-feature thresholds, power-law fit, theory.

Everything here works on any subset of an experiment's points (the service summarises a
running experiment), in any order.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ._finite_size import FiniteSizePoint, finite_size_curve, n_half_finite_size
from ._spec import ExperimentSpec
from ._theory import Theory, exponent_theory, theory

BOOTSTRAP_RESAMPLES = 1000
THEORY_GRID_POINTS = 64


@dataclass(frozen=True)
class Point:
    """One measurement: a (method, seed, n) triple.

    ``cos2``, ``overlap``, ``recovered`` and ``eigenvalues`` are None for methods without a
    learned first layer (kernels on x).
    """

    method: str
    seed: int
    n: int
    alpha: float
    mse: float
    overlap: float | None
    cos2: tuple[float, ...] | None
    eigenvalues: tuple[float, ...] | None
    recovered: int | None
    n_train_used: int
    seconds: float
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CurvePoint:
    n: int
    alpha: float
    n_seeds: int
    mse_mean: float
    mse_sem: float | None
    overlap_mean: float | None
    overlap_sem: float | None
    cos2_mean: tuple[float, ...] | None
    recovered_mean: float | None


@dataclass(frozen=True)
class Threshold:
    """Where direction ``feature`` (1-based, strongest first) is recovered.

    ``n_half`` is None if the seed-mean cos2 never reaches 1/2 in the sweep; ``censored`` is
    ``"left"`` when it is already above 1/2 at the smallest n (then n_half is that n, an upper
    bound).
    """

    feature: int
    weight: float
    n_half: float | None
    n_half_theory: float
    n_onset_theory: float
    censored: str | None = None
    n_half_finite_size: float | None = None  # exact theory (Gaussian features), else None


@dataclass(frozen=True)
class PowerLaw:
    """``mse ~ exp(intercept) n**exponent`` fitted on the seed-mean curve over a window."""

    method: str
    exponent: float
    intercept: float
    exponent_ci: tuple[float, float] | None
    exponent_theory: float | None
    exponent_theory_curve: float | None
    n_range: tuple[int, int]
    n_points: int


@dataclass(frozen=True)
class TheoryPoint:
    n: float
    mse: float
    overlap: float
    recovered: int
    cos2: tuple[float, ...]


@dataclass(frozen=True)
class SpectrumTheory:
    n: int
    bulk_edge: float
    spikes: tuple[float, ...]


@dataclass(frozen=True)
class Summary:
    curves: dict[str, list[CurvePoint]]
    thresholds: list[Threshold]
    power_law: PowerLaw | None
    theory_curve: list[TheoryPoint]
    spectrum: SpectrumTheory | None
    finite_size: list[FiniteSizePoint] | None = None  # at the sweep's n (Gaussian features)
    finite_size_note: str | None = None  # why finite_size is None


def _sem(values: np.ndarray) -> float | None:
    if values.shape[0] < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(values.shape[0]))


def curves(points: Iterable[Point]) -> dict[str, list[CurvePoint]]:
    """Mean and SEM over seeds per (method, n), methods in first-seen order, n ascending."""
    groups: dict[str, dict[int, list[Point]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        groups[p.method][p.n].append(p)
    out: dict[str, list[CurvePoint]] = {}
    for method, by_n in groups.items():
        rows = []
        for n in sorted(by_n):
            ps = sorted(by_n[n], key=lambda p: p.seed)
            mse = np.array([p.mse for p in ps])
            has_cos2 = all(p.cos2 is not None for p in ps)
            if has_cos2:
                cos2 = np.array([p.cos2 for p in ps])
                ov = np.array([p.overlap for p in ps])
                rec = np.array([p.recovered for p in ps], dtype=float)
            rows.append(
                CurvePoint(
                    n=n,
                    alpha=ps[0].alpha,
                    n_seeds=len(ps),
                    mse_mean=float(mse.mean()),
                    mse_sem=_sem(mse),
                    overlap_mean=float(ov.mean()) if has_cos2 else None,
                    overlap_sem=_sem(ov) if has_cos2 else None,
                    cos2_mean=tuple(float(c) for c in cos2.mean(axis=0)) if has_cos2 else None,
                    recovered_mean=float(rec.mean()) if has_cos2 else None,
                )
            )
        out[method] = rows
    return out


def threshold_method(spec: ExperimentSpec, curve_map: Mapping[str, list[CurvePoint]]) -> str | None:
    """The method whose directions define thresholds: layer-wise spectral if present."""
    names = [m.name for m in spec.methods]
    for name in ["layerwise_spectral", *names]:
        rows = curve_map.get(name)
        if rows and rows[0].cos2_mean is not None:
            return name
    return None


def n_half_crossing(ns: np.ndarray, c: np.ndarray) -> tuple[float | None, str | None]:
    """Smallest n where c reaches 1/2, linear in log n between sweep points."""
    above = np.flatnonzero(c >= 0.5)
    if above.size == 0:
        return None, None
    j = int(above[0])
    if j == 0:
        return float(ns[0]), "left"
    x0, x1 = math.log(ns[j - 1]), math.log(ns[j])
    frac = (0.5 - c[j - 1]) / (c[j] - c[j - 1])
    return float(math.exp(x0 + frac * (x1 - x0))), None


def thresholds(spec: ExperimentSpec, th: Theory, curve_map) -> list[Threshold]:
    method = threshold_method(spec, curve_map)
    rows = curve_map.get(method, []) if method else []
    ns = np.array([r.n for r in rows], dtype=float)
    cos2 = np.array([r.cos2_mean for r in rows]) if rows else None
    out = []
    for i, w in enumerate(th.weights):
        n_half, censored = (None, None) if cos2 is None else n_half_crossing(ns, cos2[:, i])
        out.append(
            Threshold(
                feature=i + 1,
                weight=float(w),
                n_half=n_half,
                n_half_theory=float(th.n_half[i]),
                n_onset_theory=float(th.n_onset[i]),
                censored=censored,
            )
        )
    return out


def _fit(log_n: np.ndarray, log_mse: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(log_n, log_mse, 1)
    return float(slope), float(intercept)


def fit_window(ns: np.ndarray, ths: list[Threshold], th: Theory) -> np.ndarray:
    """Indices of the sweep inside the recovery window.

    The window runs from the first direction's n_half (empirical if reached, else theory) to
    the last empirical n_half reached (the largest n if directions remain unrecovered), and is
    widened by one sweep point at a time on the left until it holds at least 3 points.
    """
    if ns.size == 0:
        return np.array([], dtype=int)
    first = ths[0].n_half if ths and ths[0].n_half is not None else float(th.n_half[0])
    reached = [t.n_half for t in ths if t.n_half is not None]
    all_reached = len(reached) == len(ths) and reached
    last = max(reached) if all_reached else float(ns[-1])
    inside = np.flatnonzero((ns >= first * (1 - 1e-9)) & (ns <= last * (1 + 1e-9)))
    lo = int(inside[0]) if inside.size else int(np.searchsorted(ns, first))
    hi = int(inside[-1]) if inside.size else ns.size - 1
    lo = min(lo, ns.size - 1)
    hi = max(hi, lo)
    while hi - lo + 1 < 3 and lo > 0:
        lo -= 1
    while hi - lo + 1 < 3 and hi < ns.size - 1:
        hi += 1
    return np.arange(lo, hi + 1)


def power_law(
    spec: ExperimentSpec,
    th: Theory,
    points: list[Point],
    curve_map,
    ths,
    *,
    rng: np.random.Generator,
) -> PowerLaw | None:
    """Fit log mse against log n on the seed-mean curve; bootstrap CI over seeds."""
    method = threshold_method(spec, curve_map) or (spec.methods[0].name if spec.methods else None)
    rows = curve_map.get(method or "", [])
    ns = np.array([r.n for r in rows], dtype=float)
    idx = fit_window(ns, ths, th)
    if idx.size < 3:
        return None
    window_n = ns[idx]
    mean_mse = np.array([rows[i].mse_mean for i in idx])
    if np.any(mean_mse <= 0):
        return None
    slope, intercept = _fit(np.log(window_n), np.log(mean_mse))
    # bootstrap over seeds: only seeds that have every n of the window take part
    by_seed: dict[int, dict[int, float]] = defaultdict(dict)
    for p in points:
        if p.method == method:
            by_seed[p.seed][p.n] = p.mse
    full = sorted(s for s, m in by_seed.items() if all(int(n) in m for n in window_n))
    ci = None
    if len(full) >= 2:
        table = np.array([[by_seed[s][int(n)] for n in window_n] for s in full])
        picks = rng.integers(0, len(full), size=(BOOTSTRAP_RESAMPLES, len(full)))
        means = table[picks].mean(axis=1)  # (B, window)
        x = np.log(window_n)
        xc = x - x.mean()
        logs = np.log(np.maximum(means, np.finfo(float).tiny))
        slopes = (logs - logs.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
        ci = (float(np.percentile(slopes, 2.5)), float(np.percentile(slopes, 97.5)))
    theory_mse = th.mse(window_n)
    curve_slope = _fit(np.log(window_n), np.log(theory_mse))[0] if np.all(theory_mse > 0) else None
    return PowerLaw(
        method=method or "",
        exponent=slope,
        intercept=intercept,
        exponent_ci=ci,
        exponent_theory=exponent_theory(spec.model.gamma),
        exponent_theory_curve=curve_slope,
        n_range=(int(window_n[0]), int(window_n[-1])),
        n_points=int(idx.size),
    )


def theory_curve(spec: ExperimentSpec, th: Theory) -> list[TheoryPoint]:
    """Predictions on a log grid over the sweep, including the sweep's own n values."""
    ns = np.array([n for n, _ in spec.sample_sizes()], dtype=float)
    grid = np.geomspace(ns.min(), ns.max(), THEORY_GRID_POINTS) if ns.size > 1 else ns
    grid = np.unique(np.concatenate([grid, ns]))
    cos2 = th.cos2(grid)
    mse = th.mse(grid)
    rec = th.recovered(grid)
    return [
        TheoryPoint(float(n), float(m), float(c.mean()), int(r), tuple(float(v) for v in c))
        for n, m, c, r in zip(grid, mse, cos2, rec)
    ]


def summarize(
    spec: ExperimentSpec, points: Iterable[Point], *, rng: np.random.Generator
) -> Summary:
    """Curves, thresholds, power law and theory for whatever points exist so far.

    Parameters
    ----------
    rng : numpy.random.Generator
        Drives the bootstrap; pass `summary_rng(spec)` for reproducible documents.
    """
    pts = list(points)
    th = theory(spec.model)
    curve_map = curves(pts)
    ths = thresholds(spec, th, curve_map)
    pl = power_law(spec, th, pts, curve_map, ths, rng=rng)
    ns = [n for n, _ in spec.sample_sizes()]
    spectrum = SpectrumTheory(
        max(ns), th.bulk_edge(max(ns)), tuple(float(s) for s in th.spikes(max(ns)))
    )
    finite, note = None, None
    try:
        finite = finite_size_curve(spec, sorted(ns))
        exact = n_half_finite_size(spec)
        ths = [replace(t, n_half_finite_size=x) for t, x in zip(ths, exact)]
    except ValueError as exc:  # Hermite features or d1 too large: said in the document
        note = str(exc)
    return Summary(curve_map, ths, pl, theory_curve(spec, th), spectrum, finite, note)


def summary_rng(spec: ExperimentSpec) -> np.random.Generator:
    """A bootstrap stream derived from the spec's seed, apart from every seed's stream."""
    return np.random.default_rng(np.random.SeedSequence(spec.sweep.seed, spawn_key=(2**32,)))
