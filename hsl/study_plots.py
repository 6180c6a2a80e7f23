"""Figures across experiments: a study's members, or any experiments compared.

Built from results documents alone (as `hsl.plots` is, whose helpers these share): thread
safe, matplotlib imported lazily, missing data never raises.

Study figures (`STUDY_PLOTS`):

- ``mse``: test MSE against n, one curve per member (its primary method, seed mean and
  standard error) with its theory curve dashed in the same colour;
- ``exponent``: the fitted MSE exponent against gamma, with its 95 % t interval over seeds,
  and the theory line ``-1 + 1/(2 gamma)`` (gamma > 1/2);
- ``collapse``: the measured ``n_half / D`` against the asymptotic theory's
  ``n_half_theory / D`` (BBP onset with the ``E[y^2 h_i^2]`` tail, `hsl_engine._theory`) for
  every member and direction: the theory puts every point on ``y = x``.

Comparison figures (`COMPARE_PLOTS`): ``mse`` and ``overlap`` of each experiment with its
theory overlay. ``x="n_over_n_half"`` puts ``n / n_half_theory`` of the first (strongest)
direction on the x axis: the theory's onsets all scale with ``D / (nu1^2 lambda_1^2)``, so
curves of different d (and so D) at the same d1 and gamma fall onto one curve, and curves
of different gamma start recovering at the same x.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .plots import (
    DPI,
    FORMATS,
    PRIMARY_METHOD,
    _curves,
    _errorbar,
    _legend,
    _list,
    _mathsafe,
    _new_axes,
    _no_data,
    _num,
    _ok,
    _series,
    _theory_rows,
)

__all__ = ["COMPARE_PLOTS", "FORMATS", "STUDY_PLOTS", "X_AXES", "render_compare", "render_study"]

STUDY_PLOTS: tuple[str, ...] = ("mse", "exponent", "collapse")
COMPARE_PLOTS: tuple[str, ...] = ("mse", "overlap")
X_AXES: tuple[str, ...] = ("n", "n_over_n_half")


def _save(fig, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    elif fmt == "svg":
        fig.savefig(buf, format="svg", metadata={"Date": None})
    else:
        raise ValueError(f"unknown plot format {fmt!r}; allowed: {', '.join(FORMATS)}")
    return buf.getvalue()


def _method(doc: Mapping) -> str | None:
    curves = _curves(doc)
    if curves.get(PRIMARY_METHOD):
        return PRIMARY_METHOD
    return next((m for m, rows in curves.items() if rows), None)


def _n_half_1(doc: Mapping) -> float:
    """n_half_theory of the first direction (from the thresholds, else 2 n_onset)."""
    for t in _list(doc.get("thresholds")):
        if isinstance(t, Mapping) and t.get("feature") == 1:
            return _num(t.get("n_half_theory"))
    return math.nan


def _overlay(ax, docs: Sequence[tuple[str, Mapping]], key: str, *, x: str) -> bool:
    log_y = key == "mse"
    drawn = False
    for i, (label, doc) in enumerate(docs):
        color = f"C{i % 10}"
        scale = 1.0
        if x == "n_over_n_half":
            scale = _n_half_1(doc)
            if not (_ok(scale) and scale > 0):
                continue
        method = _method(doc)
        if method is not None:
            xs, ys, es = _series(_curves(doc)[method], key, log_y=log_y)
            if xs:
                _errorbar(
                    ax,
                    [v / scale for v in xs],
                    ys,
                    es,
                    log_y=log_y,
                    marker="o",
                    markersize=3.5,
                    linewidth=1.2,
                    color=color,
                    label=_mathsafe(label),
                )
                drawn = True
        tx, ty = [], []
        for r in _theory_rows(doc):
            v = _num(r.get(key))
            if _ok(v) and (v > 0 or not log_y):
                tx.append(_num(r.get("n")) / scale)
                ty.append(v)
        if tx:
            ax.plot(tx, ty, linestyle="--", color=color, linewidth=1.0, alpha=0.8)
            drawn = True
    if drawn:
        ax.plot(
            [],
            [],
            linestyle="--",
            color="0.3",
            linewidth=1.0,
            label="asymptotic theory (BBP, corrected tail), dashed",
        )
    return drawn


def _curves_figure(title: str, docs, key: str, x: str):
    fig, ax = _new_axes()
    ax.set_title(_mathsafe(title), fontsize=10)
    ax.set_xlabel("n / n_half_theory of direction 1" if x == "n_over_n_half" else "sample size n")
    ax.set_ylabel("test MSE / Var(y)" if key == "mse" else "overlap with teacher")
    if not _overlay(ax, docs, key, x=x):
        _no_data(ax)
        return fig
    ax.set_xscale("log")
    if key == "mse":
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1.02)
    _legend(ax, fontsize=7, loc="best")
    return fig


def _gamma(doc: Mapping) -> float:
    spec = doc.get("spec") if isinstance(doc.get("spec"), Mapping) else {}
    model = spec.get("model") if isinstance(spec.get("model"), Mapping) else {}
    return _num(model.get("gamma"))


def _exponent_figure(title: str, docs):
    import numpy as np

    fig, ax = _new_axes()
    ax.set_title(_mathsafe(title), fontsize=10)
    ax.set_xlabel("gamma")
    ax.set_ylabel("MSE exponent")
    gx, gy, lo, hi = [], [], [], []
    for _, doc in docs:
        pl = doc.get("power_law") if isinstance(doc.get("power_law"), Mapping) else None
        g = _gamma(doc)
        if pl is None or not _ok(g) or not _ok(_num(pl.get("exponent"))):
            continue
        e = _num(pl.get("exponent"))
        ci = [_num(v) for v in _list(pl.get("exponent_ci"))]
        gx.append(g)
        gy.append(e)
        if len(ci) == 2 and all(_ok(v) for v in ci):
            lo.append(max(0.0, e - min(ci)))
            hi.append(max(0.0, max(ci) - e))
        else:
            lo.append(0.0)
            hi.append(0.0)
    gammas = [g for g in (_gamma(d) for _, d in docs) if _ok(g)]
    drawn = False
    if gx:
        ax.errorbar(
            gx,
            gy,
            yerr=np.vstack([lo, hi]),
            fmt="o",
            capsize=3,
            color="C0",
            label="fitted (95 % t interval over seeds)",
        )
        drawn = True
    top = max(gammas + [1.0])
    grid = np.linspace(0.5 + 1e-3, max(top, 0.6) * 1.05, 100)
    if any(g > 0.5 for g in gammas):
        ax.plot(grid, -1 + 1 / (2 * grid), "--", color="0.2", label="theory -1 + 1/(2 gamma)")
        drawn = True
    if not drawn:
        _no_data(ax, "no fitted exponent yet")
        return fig
    ax.axhline(0.0, color="0.6", linewidth=0.6)
    _legend(ax, fontsize=8, loc="best")
    return fig


def _collapse_figure(title: str, docs):
    import numpy as np

    fig, ax = _new_axes()
    ax.set_title(_mathsafe(title), fontsize=10)
    ax.set_xlabel("n_half_theory / D  (asymptotic theory, corrected tail)")
    ax.set_ylabel("measured n_half / D")
    xs_all = []
    for i, (label, doc) in enumerate(docs):
        dim = _num(doc.get("feature_dim"))
        if not (_ok(dim) and dim > 0):
            continue
        xs, ys = [], []
        for t in _list(doc.get("thresholds")):
            if not isinstance(t, Mapping) or t.get("censored"):
                continue
            theory, nh = _num(t.get("n_half_theory")), _num(t.get("n_half"))
            if _ok(theory) and theory > 0 and _ok(nh) and nh > 0:
                xs.append(theory / dim)
                ys.append(nh / dim)
        if xs:
            ax.plot(xs, ys, "o", color=f"C{i % 10}", markersize=4.5, label=_mathsafe(label))
            xs_all += xs
    if not xs_all:
        _no_data(ax, "no direction recovered yet")
        return fig
    grid = np.geomspace(min(xs_all) / 1.5, max(xs_all) * 1.5, 50)
    ax.plot(grid, grid, "--", color="0.2", label="theory: measured = n_half_theory")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _legend(ax, fontsize=7, loc="best")
    return fig


def render_study(
    name: str, members: Sequence[tuple[Mapping[str, Any], Mapping]], plot: str, fmt: str = "png"
) -> bytes:
    """A study figure (one of `STUDY_PLOTS`) from ``[(params, results document)]``."""
    from .studies import param_label

    if plot not in STUDY_PLOTS:
        raise ValueError(f"unknown study plot {plot!r}; allowed: {', '.join(STUDY_PLOTS)}")
    docs = [
        (param_label(dict(params)) or f"member {i + 1}", d) for i, (params, d) in enumerate(members)
    ]
    if plot == "mse":
        fig = _curves_figure(f"{name}: MSE per member", docs, "mse", "n")
    elif plot == "exponent":
        fig = _exponent_figure(f"{name}: MSE exponent against gamma", docs)
    else:
        fig = _collapse_figure(f"{name}: recovery thresholds", docs)
    return _save(fig, fmt)


def render_compare(
    docs: Sequence[tuple[str, Mapping]], plot: str, fmt: str = "png", *, x: str = "n"
) -> bytes:
    """A comparison figure (one of `COMPARE_PLOTS`) from ``[(label, results document)]``;
    ``x``: ``n`` or ``n_over_n_half``."""
    if plot not in COMPARE_PLOTS:
        raise ValueError(f"unknown comparison plot {plot!r}; allowed: {', '.join(COMPARE_PLOTS)}")
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}; allowed: {', '.join(X_AXES)}")
    title = "comparison: " + ("MSE" if plot == "mse" else "overlap")
    return _save(_curves_figure(title, docs, plot, x), fmt)
