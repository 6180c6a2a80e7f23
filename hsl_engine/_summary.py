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
from ._theory import Theory, exponent_theory, teacher_signs, theory

THEORY_GRID_POINTS = 64
# fewest sweep points a power law is fitted on (a line through 3 points has 1 residual
# degree of freedom; windows of 3-4 points swing fig3-cpu's slope from -0.43 to -0.95)
MIN_FIT_POINTS = 4
CI_LEVEL = 0.95


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
    seeds: tuple[int, ...] = ()


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
    """``mse ~ exp(intercept) n**exponent`` over the recovery window.

    Each seed's log MSE is fitted by least squares on log n over the window; ``exponent`` and
    ``intercept`` are the means over the seeds that have every n of the window, and
    ``exponent_ci`` is the Student t interval (``CI_LEVEL``) of the mean slope over them: the
    seeds are independent, so their slopes are i.i.d. and the interval has its nominal
    coverage whatever the correlation between the n of one seed (nested samples).

    When no fit is made, ``exponent`` is None and ``reason`` says why: no recovery window (no
    direction reaches cos2 1/2, or the method learns no directions) or fewer than
    `MIN_FIT_POINTS` sweep points in it. ``n_range``/``n_points`` are the window (None/0
    without one) and ``seeds`` the seeds fitted.
    """

    method: str
    exponent: float | None
    intercept: float | None
    exponent_ci: tuple[float, float] | None
    exponent_theory: float | None
    exponent_theory_curve: float | None
    n_range: tuple[int, int] | None
    n_points: int
    seeds: tuple[int, ...] = ()
    reason: str | None = None


@dataclass(frozen=True)
class TheoryPoint:
    n: float
    mse: float
    overlap: float
    recovered: int
    cos2: tuple[float, ...]


@dataclass(frozen=True)
class SpectrumTheory:
    """Predicted spectrum at the largest n: bulk edge ``2 sqrt(D E[y^2]/n)`` and signed
    outliers (seed 0's teacher signs), and the model they come from."""

    n: int
    bulk_edge: float
    spikes: tuple[float, ...]
    model: str = "gaussian-equivalent"


@dataclass(frozen=True)
class Summary:
    curves: dict[str, list[CurvePoint]]
    thresholds: list[Threshold]
    power_law: PowerLaw | None
    theory_curve: list[TheoryPoint]
    spectrum: SpectrumTheory | None
    finite_size: list[FiniteSizePoint] | None = None  # at the sweep's n (Gaussian features)
    finite_size_note: str | None = None  # why finite_size is None


@dataclass(frozen=True)
class ExactTheory:
    """The exact finite-size theory of a spec (`finite_size_curve` at the sweep's n and
    `n_half_finite_size` per direction), or the reason there is none (``note``: Hermite
    features, d1 too large). It depends on the spec alone, never on the points, so it is
    computed once per experiment (`exact_theory`) and handed to `summarize`.
    """

    finite_size: list[FiniteSizePoint] | None
    n_half: tuple[float | None, ...] | None
    note: str | None = None


def exact_theory(spec: ExperimentSpec) -> ExactTheory:
    """The spec's exact finite-size theory (seconds of work: compute it once, keep it)."""
    ns = sorted(n for n, _ in spec.sample_sizes())
    try:
        return ExactTheory(finite_size_curve(spec, ns), tuple(n_half_finite_size(spec)))
    except ValueError as exc:  # Hermite features or d1 too large: said in the document
        return ExactTheory(None, None, str(exc))


def _sem(values: np.ndarray) -> float | None:
    if values.shape[0] < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(values.shape[0]))


def curves(points: Iterable[Point]) -> dict[str, list[CurvePoint]]:
    """Mean and SEM over seeds per (method, n), methods in first-seen order, n ascending.

    Each row names the seeds it averages (``seeds``): while an experiment runs they can differ
    between n; `consistent_points` restricts a method to one seed set.
    """
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
                    seeds=tuple(p.seed for p in ps),
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


def fit_window(ns: np.ndarray, ths: list[Threshold]) -> tuple[np.ndarray, str | None]:
    """Indices of the sweep inside the recovery window, or an empty array and the reason.

    The window runs from the first direction's empirical n_half (the first n when it is
    already recovered there) to the last empirical n_half when every direction is recovered,
    else to the largest n. It is never widened into the region before recovery, where the
    MSE is flat and would bias the slope: without a recovered direction there is no window.
    """
    if ns.size == 0:
        return np.array([], dtype=int), "no points yet"
    if not ths or ths[0].n_half is None:
        return np.array([], dtype=int), (
            "no recovery window: no direction reaches seed-mean cos2 1/2 in the sweep"
        )
    first = ths[0].n_half
    reached = [t.n_half for t in ths if t.n_half is not None]
    last = max(reached) if len(reached) == len(ths) else float(ns[-1])
    inside = np.flatnonzero((ns >= first * (1 - 1e-9)) & (ns <= last * (1 + 1e-9)))
    return inside, None


def consistent_points(points: list[Point], method: str) -> tuple[list[Point], tuple[int, ...]]:
    """A method's points restricted to the seeds that have every n the method has so far
    (all seeds once complete), so a partial summary never averages different seed sets
    across n. Falls back to the seeds with the most points when none has them all."""
    mine = [p for p in points if p.method == method]
    by_seed: dict[int, set[int]] = defaultdict(set)
    for p in mine:
        by_seed[p.seed].add(p.n)
    if not by_seed:
        return [], ()
    all_n = set().union(*by_seed.values())
    seeds = sorted(s for s, ns in by_seed.items() if ns == all_n)
    if not seeds:
        most = max(len(ns) for ns in by_seed.values())
        best = [s for s, ns in by_seed.items() if len(ns) == most]
        common = set.intersection(*(by_seed[s] for s in best))
        seeds = sorted(best)
        mine = [p for p in mine if p.n in common]
    keep = set(seeds)
    return [p for p in mine if p.seed in keep], tuple(seeds)


def _refusal(method: str, reason: str, spec: ExperimentSpec, window=None) -> PowerLaw:
    return PowerLaw(
        method=method,
        exponent=None,
        intercept=None,
        exponent_ci=None,
        exponent_theory=exponent_theory(spec.model.gamma),
        exponent_theory_curve=None,
        n_range=None if window is None else (int(window[0]), int(window[-1])),
        n_points=0 if window is None else int(len(window)),
        reason=reason,
    )


def t_quantile(p: float, dof: int) -> float:
    """Quantile ``p`` of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(p, dof))


def seed_slopes(table: np.ndarray, ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed least-squares ``(slopes, intercepts)`` of log mse on log n; table is
    (seeds, len(ns)) of positive MSEs."""
    x = np.log(ns)
    xc = x - x.mean()
    logs = np.log(table)
    slopes = (logs - logs.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    intercepts = logs.mean(axis=1) - slopes * x.mean()
    return slopes, intercepts


def slope_interval(slopes: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float] | None:
    """Student t interval of the mean of i.i.d. per-seed slopes (None with one seed)."""
    k = slopes.size
    if k < 2:
        return None
    half = t_quantile(0.5 + level / 2, k - 1) * float(np.std(slopes, ddof=1)) / math.sqrt(k)
    mean = float(slopes.mean())
    return mean - half, mean + half


def power_law(
    spec: ExperimentSpec,
    th: Theory,
    points: list[Point],
    curve_map,
    ths,
    *,
    rng: np.random.Generator | None = None,
) -> PowerLaw | None:
    """Fit log mse against log n per seed over the recovery window; t interval over seeds.

    Returns None without any point of the method, and a `PowerLaw` whose ``exponent`` is None
    (with its ``reason``) where no fit holds up. ``rng`` is unused (kept for callers of the
    bootstrap version, whose interval covered the truth 74 % of the time with 3 seeds).
    """
    method = threshold_method(spec, curve_map)
    if method is None:
        named = spec.methods[0].name if spec.methods else ""
        if not curve_map.get(named):
            return None
        return _refusal(named, "no recovery window: the method learns no directions", spec)
    pts, seeds = consistent_points(points, method)
    rows = curves(pts).get(method, [])
    ns = np.array([r.n for r in rows], dtype=float)
    idx, reason = fit_window(ns, ths)
    if reason is not None:
        return _refusal(method, reason, spec)
    window_n = ns[idx]
    if idx.size < MIN_FIT_POINTS:
        where = f"[{int(window_n[0])}, {int(window_n[-1])}]" if idx.size else "(empty)"
        return _refusal(
            method,
            f"recovery window {where} holds {idx.size} sweep points; "
            f"at least {MIN_FIT_POINTS} needed",
            spec,
            window_n if idx.size else None,
        )
    by_seed: dict[int, dict[int, float]] = defaultdict(dict)
    for p in pts:
        by_seed[p.seed][p.n] = p.mse
    full = sorted(s for s, m in by_seed.items() if all(int(n) in m for n in window_n))
    table = np.array([[by_seed[s][int(n)] for n in window_n] for s in full])
    if table.size == 0 or not np.all(np.isfinite(table)) or np.any(table <= 0):
        return _refusal(method, "non-positive or missing MSE in the window", spec, window_n)
    slopes, intercepts = seed_slopes(table, window_n)
    theory_mse = th.mse(window_n)
    curve_slope = _fit(np.log(window_n), np.log(theory_mse))[0] if np.all(theory_mse > 0) else None
    return PowerLaw(
        method=method,
        exponent=float(slopes.mean()),
        intercept=float(intercepts.mean()),
        exponent_ci=slope_interval(slopes),
        exponent_theory=exponent_theory(spec.model.gamma),
        exponent_theory_curve=curve_slope,
        n_range=(int(window_n[0]), int(window_n[-1])),
        n_points=int(idx.size),
        seeds=tuple(full),
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
    spec: ExperimentSpec,
    points: Iterable[Point],
    *,
    rng: np.random.Generator,
    exact: ExactTheory | None = None,
) -> Summary:
    """Curves, thresholds, power law and theory for whatever points exist so far.

    Parameters
    ----------
    rng : numpy.random.Generator
        Kept for compatibility (the power law's interval is now analytic, no bootstrap).
    exact : ExactTheory, optional
        The spec's exact finite-size theory, computed before (`exact_theory`); computed here
        when not given.
    """
    pts = list(points)
    th = theory(spec.model, teacher_signs(spec))
    curve_map = curves(pts)
    # thresholds from one seed set (the seeds with every n so far), never a mix across n
    method = threshold_method(spec, curve_map)
    consistent = curves(consistent_points(pts, method)[0]) if method else curve_map
    ths = thresholds(spec, th, consistent)
    pl = power_law(spec, th, pts, curve_map, ths, rng=rng)
    ns = [n for n, _ in spec.sample_sizes()]
    spectrum = SpectrumTheory(
        max(ns),
        th.bulk_edge(max(ns)),
        tuple(float(s) for s in th.spikes(max(ns))),
        "gaussian-equivalent"
        if spec.model.features == "gaussian"
        else f"gaussian-equivalent, Hermite Var(h2) = {th.h2_var:.3f}",
    )
    if exact is None:
        exact = exact_theory(spec)
    if exact.n_half is not None:
        ths = [replace(t, n_half_finite_size=x) for t, x in zip(ths, exact.n_half)]
    return Summary(
        curve_map, ths, pl, theory_curve(spec, th), spectrum, exact.finite_size, exact.note
    )


def summary_rng(spec: ExperimentSpec) -> np.random.Generator:
    """A bootstrap stream derived from the spec's seed, apart from every seed's stream."""
    return np.random.default_rng(np.random.SeedSequence(spec.sweep.seed, spawn_key=(2**32,)))
