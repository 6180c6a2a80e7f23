"""Figures rendered from a results document.

Every figure is built from the results document (a plain ``dict``, as stored in
``results.json`` and served by the API) alone.  The module is safe to use from
several threads at once: it never touches :mod:`matplotlib.pyplot` or changes
``rcParams``; each call builds its own :class:`matplotlib.figure.Figure` bound to
an Agg canvas.  Matplotlib is imported lazily, so ``import hsl.plots`` works
without it installed.

Documents may be partial (an experiment still running): missing points,
methods without points, ``power_law`` null, ``theory`` without some pieces,
``cos2``/``eigenvalues`` null for kernel methods.  Missing data never raises; a
figure with nothing to show says "no data yet".
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["FORMATS", "PLOT_NAMES", "render", "write_plots"]

PLOT_NAMES: tuple[str, ...] = ("mse", "overlap", "cos2", "spectrum")
FORMATS: tuple[str, ...] = ("png", "svg")

PRIMARY_METHOD = "layerwise_spectral"
FIGSIZE = (6.4, 4.2)
DPI = 120  # on screen; PNG files are written at PNG_DPI
PNG_DPI = 240  # paper resolution
MAX_DIRECTIONS = 10
NO_DATA = "no data yet"


# --------------------------------------------------------------------------- matplotlib


def _matplotlib():
    """Return (Figure, FigureCanvasAgg), importing matplotlib lazily."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised via monkeypatch in tests
        raise RuntimeError("plots need matplotlib: pip install 'hsl[plots]'") from exc
    return Figure, FigureCanvasAgg


def _new_axes():
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3, linewidth=0.6)
    return fig, ax


def _no_data(ax, message: str = NO_DATA) -> None:
    ax.text(
        0.5,
        0.5,
        message,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=13,
        color="0.45",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(ax, order: Sequence[str] = (), **kwargs) -> None:
    """Add a legend only when something is labelled (an empty legend warns).

    Entries whose label is in ``order`` come first, in that order (matplotlib lists
    errorbar containers after plain lines, whatever the drawing order).
    """
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    rank = {label: k for k, label in enumerate(order)}
    idx = sorted(range(len(labels)), key=lambda k: (rank.get(labels[k], len(rank)), k))
    ax.legend([handles[k] for k in idx], [labels[k] for k in idx], **kwargs)


# --------------------------------------------------------------------------- data helpers


def _num(x: Any) -> float:
    """A finite float, or NaN for anything else (None, strings, inf, ...)."""
    if isinstance(x, bool):
        return float(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _ok(x: float) -> bool:
    return not math.isnan(x)


def _list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else []


def _dict(x: Any) -> dict:
    return x if isinstance(x, Mapping) else {}


def _mathsafe(s: Any) -> str:
    """Text with ``$`` escaped so matplotlib never parses it as mathtext."""
    return str(s).replace("$", r"\$")


def _fmt(v: float) -> str:
    return f"{v:g}" if _ok(v) else "?"


def _title(doc: Mapping) -> str:
    spec = _dict(doc.get("spec"))
    model = _dict(spec.get("model"))
    name = spec.get("name") or doc.get("experiment_id") or "experiment"
    parts = []
    for key in ("d", "q", "gamma"):
        if model.get(key) is not None:
            parts.append(f"{key}={model[key]}")
    for key in ("activation", "features"):
        if model.get(key) is not None:
            parts.append(str(model[key]))
    title = str(name) + (": " + ", ".join(parts) if parts else "")
    if doc.get("complete") is False:
        title += " (running)"
    return _mathsafe(title)


def _d1(doc: Mapping) -> int | None:
    d1 = doc.get("d1")
    if isinstance(d1, int) and not isinstance(d1, bool) and d1 >= 0:
        return d1
    weights = _list(doc.get("weights"))
    return len(weights) or None


def _weights(doc: Mapping) -> list[float]:
    return [abs(_num(w)) for w in _list(doc.get("weights"))]


def _curves(doc: Mapping) -> dict[str, list[dict]]:
    """Per-method curve rows sorted by n.

    Uses ``doc["curves"]``; methods that have points but no curve rows yet get rows
    aggregated from the points (mean and standard error over seeds).
    """
    out: dict[str, list[dict]] = {}
    for method, rows in _dict(doc.get("curves")).items():
        rows = [r for r in _list(rows) if isinstance(r, Mapping)]
        out[str(method)] = rows

    grouped: dict[str, dict[float, list[Mapping]]] = {}
    for p in _list(doc.get("points")):
        if not isinstance(p, Mapping) or p.get("method") is None:
            continue
        n = _num(p.get("n"))
        if _ok(n):
            grouped.setdefault(str(p["method"]), {}).setdefault(n, []).append(p)
    for method, by_n in grouped.items():
        if out.get(method):
            continue
        rows = []
        for n, pts in by_n.items():
            row: dict[str, Any] = {"n": n, "n_seeds": len(pts)}
            for key in ("mse", "overlap"):
                mean, sem = _mean_sem([_num(p.get(key)) for p in pts])
                row[f"{key}_mean"], row[f"{key}_sem"] = mean, sem
            rows.append(row)
        out[method] = rows

    methods = list(_list(_dict(doc.get("spec")).get("methods")))
    order = [str(m.get("name")) for m in methods if isinstance(m, Mapping)]
    rank = {m: i for i, m in enumerate(order)}
    return {
        m: sorted(out[m], key=lambda r: _num(r.get("n")) if _ok(_num(r.get("n"))) else math.inf)
        for m in sorted(out, key=lambda m: (rank.get(m, len(rank)), m))
    }


def _mean_sem(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if _ok(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var / len(vals))


def _colors(methods: Iterable[str]) -> dict[str, str]:
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def _series(rows: Sequence[Mapping], key: str, *, log_y: bool) -> tuple[list, list, list]:
    """(n, mean, sem) with rows lacking a usable mean dropped (and, on log axes,
    non-positive values dropped); sem is NaN where unknown."""
    xs, ys, es = [], [], []
    for r in rows:
        n, y, e = _num(r.get("n")), _num(r.get(f"{key}_mean")), _num(r.get(f"{key}_sem"))
        if not (_ok(n) and n > 0 and _ok(y)):
            continue
        if log_y and y <= 0:
            continue
        xs.append(n)
        ys.append(y)
        es.append(abs(e) if _ok(e) else math.nan)
    return xs, ys, es


def _theory_rows(doc: Mapping) -> list[Mapping]:
    theory = _dict(doc.get("theory"))
    rows = [r for r in _list(theory.get("curve")) if isinstance(r, Mapping)]
    rows = [r for r in rows if _ok(_num(r.get("n"))) and _num(r.get("n")) > 0]
    return sorted(rows, key=lambda r: _num(r.get("n")))


def _errorbar(ax, xs, ys, es, *, log_y: bool, **kw) -> None:
    import numpy as np

    y = np.asarray(ys, dtype=float)
    e = np.asarray(es, dtype=float)
    if np.all(np.isnan(e)):
        ax.plot(xs, ys, **kw)
        return
    e = np.where(np.isnan(e), 0.0, e)
    lower = np.minimum(e, y * (1 - 1e-9)) if log_y else e  # keep bars on a log axis
    ax.errorbar(xs, ys, yerr=np.vstack([lower, e]), capsize=2.5, elinewidth=0.9, **kw)


# --------------------------------------------------------------------------- theory

ASYMPTOTIC = "asymptotic theory (BBP, corrected tail)"
FINITE_SIZE = "finite-size theory (exact, Gaussian-equivalent)"
HERMITE_NOTE = (
    "Hermite features: both theories are Gaussian-equivalent (Var h2 = 1 + 12/d);\n"
    "at d <~ 100 the lift adds noise eigenvalues above their bulk, so recovery lags them"
)
MSE_LABEL = "test MSE / Var(y)"


def _finite_rows(doc: Mapping) -> list[Mapping]:
    """Rows of ``theory.finite_size`` (a curve list, or a mapping with ``curve``)."""
    fs = _dict(doc.get("theory")).get("finite_size")
    rows = _list(fs) if not isinstance(fs, Mapping) else _list(fs.get("curve"))
    rows = [r for r in rows if isinstance(r, Mapping)]
    rows = [r for r in rows if _ok(_num(r.get("n"))) and _num(r.get("n")) > 0]
    return sorted(rows, key=lambda r: _num(r.get("n")))


def _label_clip(doc: Mapping) -> float | None:
    """The ``label_clip`` of the spec's layer-wise spectral method (an extension), if any."""
    for meth in _list(_dict(doc.get("spec")).get("methods")):
        if _dict(meth).get("name") == "layerwise_spectral":
            clip = _num(meth.get("label_clip"))
            return clip if _ok(clip) else None
    return None


def _theories(doc: Mapping) -> list[tuple[str, list[Mapping], dict]]:
    """(label, rows, line style) of each theory curve the document carries. With a
    ``label_clip`` the labels say which preprocessing each theory is for: the finite-size
    theory follows the method's clip, the asymptotic one is for T = y."""
    out = []
    clip = _label_clip(doc)
    rows = _theory_rows(doc)
    if rows:
        label = ASYMPTOTIC + (", T = y" if clip is not None else "")
        out.append((label, rows, {"linestyle": "--", "color": "0.15", "linewidth": 1.1}))
    rows = _finite_rows(doc)
    if rows:
        label = FINITE_SIZE + (f", labels clipped at ±{clip:g} sd" if clip is not None else "")
        out.append((label, rows, {"linestyle": "-.", "color": "C3", "linewidth": 1.3}))
    return out


def _dash(label: str) -> str:
    """The cos2 figure's dash of a theory curve (by its label, `_theories`)."""
    return ":" if label.startswith(FINITE_SIZE) else "--"


def _hermite(doc: Mapping) -> bool:
    model = _dict(_dict(doc.get("spec")).get("model"))
    return model.get("features", "hermite") == "hermite" and bool(model)


def _xlabel(ax, doc: Mapping, text: str = "sample size n", *, note: bool = True) -> None:
    if note and _hermite(doc):
        ax.set_xlabel(f"{text}\n{HERMITE_NOTE}", fontsize=7.5)
    else:
        ax.set_xlabel(text)


def _method_label(doc: Mapping, method: str, rows: Sequence[Mapping]) -> str:
    """The method's name, how many seeds its bars average, and the samples a split uses."""
    seeds = [int(_num(r.get("n_seeds"))) for r in rows if _ok(_num(r.get("n_seeds")))]
    parts = []
    if seeds:
        lo, hi = min(seeds), max(seeds)
        count = f"{hi}" if lo == hi else f"{lo}-{hi}"
        parts.append(f"mean ± SEM over {count} seed{'s' if hi > 1 else ''}")
    for m in _list(_dict(doc.get("spec")).get("methods")):
        if isinstance(m, Mapping) and str(m.get("name")) == method and m.get("sample_split"):
            used = "3n" if method == PRIMARY_METHOD else "2n"
            parts.append(f"sample split: uses {used} samples")
    label = _mathsafe(method)
    return f"{label} ({'; '.join(parts)})" if parts else label


def _slope_over(rows: Sequence[Mapping], key: str, lo: float, hi: float) -> float | None:
    """Least-squares slope of log(key) on log n over the rows with n in [lo, hi]."""
    import numpy as np

    pts = [
        (_num(r.get("n")), _num(r.get(key)))
        for r in rows
        if lo * (1 - 1e-9) <= _num(r.get("n")) <= hi * (1 + 1e-9)
    ]
    pts = [(n, v) for n, v in pts if _ok(v) and v > 0]
    if len(pts) < 2 or min(p[0] for p in pts) == max(p[0] for p in pts):
        return None
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


# --------------------------------------------------------------------------- figures


def _plot_mse(doc: Mapping):
    from matplotlib.lines import Line2D

    fig, ax = _new_axes()
    ax.set_title(_title(doc), fontsize=10)
    _xlabel(ax, doc)
    ax.set_ylabel(MSE_LABEL)
    curves = _curves(doc)
    colors = _colors(curves)
    drawn = False
    labels = {}

    for k, (method, rows) in enumerate(curves.items()):
        xs, ys, es = _series(rows, "mse", log_y=True)
        if xs:
            labels[method] = _method_label(doc, method, rows)
            _errorbar(
                ax,
                xs,
                ys,
                es,
                log_y=True,
                marker="osD^v"[k % 5],
                markersize=4,
                linewidth=1.3,
                color=colors[method],
                label=labels[method],
                zorder=3,
            )
            drawn = True

    pl = _dict(doc.get("power_law"))
    window = [_num(v) for v in _list(pl.get("n_range"))]
    has_window = len(window) == 2 and all(_ok(v) and v > 0 for v in window)
    fitted = _ok(_num(pl.get("exponent")))
    theory_labels = []
    for label, rows, style in _theories(doc):
        tx, ty = [], []
        for r in rows:
            n, m = _num(r.get("n")), _num(r.get("mse"))
            if _ok(m) and m > 0:
                tx.append(n)
                ty.append(m)
        if not tx:
            continue
        extra = []
        if fitted and has_window:
            slope = _slope_over(rows, "mse", min(window), max(window))
            if slope is not None:
                extra.append(f"slope {slope:.2f} over the fit window")
        if label.startswith(ASYMPTOTIC) and _ok(_num(pl.get("exponent_theory"))):
            extra.append(f"n→∞ exponent {_num(pl.get('exponent_theory')):.2f}")
        full = label + (f": {', '.join(extra)}" if extra else "")
        ax.plot(tx, ty, label=full, zorder=2, **style)
        theory_labels.append(full)
        drawn = True

    fit = _fit_line(doc, curves)
    fit_label = None
    if fit is not None:
        fx, fy, fit_label, method = fit
        # a wide translucent band under the data, in the colour of the fitted method
        ax.plot(
            fx,
            fy,
            linestyle="-",
            linewidth=6,
            color=colors.get(method, "C3"),
            alpha=0.25,
            solid_capstyle="butt",
            zorder=1.5,
            label=fit_label,
        )
        drawn = True
    elif pl and not fitted and pl.get("reason"):
        fit_label = _mathsafe(f"no power-law fit: {pl.get('reason')}")
        ax.add_line(Line2D([], [], linestyle="none", label=fit_label))

    if not drawn:
        _no_data(ax)
        return fig
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="minor", alpha=0.12, linewidth=0.4)
    order = [labels[m] for m in curves if m in labels] + theory_labels
    _legend(ax, order=order, fontsize=6.5, loc="lower left")
    return fig


def _fit_line(doc: Mapping, curves: Mapping[str, list]) -> tuple | None:
    import numpy as np

    pl = _dict(doc.get("power_law"))
    slope, intercept = _num(pl.get("exponent")), _num(pl.get("intercept"))
    if not (_ok(slope) and _ok(intercept)):
        return None
    method = str(pl.get("method") or PRIMARY_METHOD)
    rng = [_num(v) for v in _list(pl.get("n_range"))]
    if len(rng) == 2 and all(_ok(v) and v > 0 for v in rng) and rng[0] != rng[1]:
        lo, hi = min(rng), max(rng)
    else:  # no usable range: span the method's sample sizes
        ns = [_num(r.get("n")) for r in curves.get(method, [])]
        ns = [n for n in ns if _ok(n) and n > 0]
        if len(ns) < 2 or min(ns) == max(ns):
            return None
        lo, hi = min(ns), max(ns)
    xs = np.geomspace(lo, hi, 50)
    with np.errstate(all="ignore"):
        ys = np.exp(intercept + slope * np.log(xs))
    keep = np.isfinite(ys) & (ys > 0)
    if not keep.any():
        return None

    label = f"fit: slope {slope:.2f}"
    ci = [_num(v) for v in _list(pl.get("exponent_ci"))]
    if len(ci) == 2 and all(_ok(v) for v in ci):
        label += f" [{ci[0]:.2f}, {ci[1]:.2f}] (95 % t over seeds)"
    points = _num(pl.get("n_points"))
    label += f", n in [{lo:.3g}, {hi:.3g}]"
    if _ok(points) and points > 0:
        label += f", {int(points)} points"
    return xs[keep], ys[keep], label, method


def _plot_overlap(doc: Mapping):
    fig, ax = _new_axes()
    ax.set_title(_title(doc), fontsize=10)
    _xlabel(ax, doc)
    ax.set_ylabel("overlap: mean over directions of cos²")
    curves = _curves(doc)
    colors = _colors(curves)
    drawn = False
    labels = {}

    for k, (method, rows) in enumerate(curves.items()):
        xs, ys, es = _series(rows, "overlap", log_y=False)
        if xs:
            labels[method] = _method_label(doc, method, rows)
            _errorbar(
                ax,
                xs,
                ys,
                es,
                log_y=False,
                marker="osD^v"[k % 5],
                markersize=4,
                linewidth=1.3,
                color=colors[method],
                label=labels[method],
                zorder=3,
            )
            drawn = True

    for label, rows, style in _theories(doc):
        tx, ty = [], []
        for r in rows:
            v = _num(r.get("overlap"))
            if _ok(v):
                tx.append(_num(r.get("n")))
                ty.append(v)
        if tx:
            ax.plot(tx, ty, label=label, zorder=2, **style)
            drawn = True

    if not drawn:
        _no_data(ax)
        return fig
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    _legend(ax, order=[labels[m] for m in curves if m in labels], fontsize=7, loc="upper left")
    return fig


def _cos2_method(curves: Mapping[str, list]) -> str | None:
    def has_cos2(rows):
        return any(_list(r.get("cos2_mean")) for r in rows)

    if has_cos2(curves.get(PRIMARY_METHOD, [])):
        return PRIMARY_METHOD
    for method, rows in curves.items():
        if has_cos2(rows):
            return method
    return None


def _cos2_from_points(doc: Mapping, method: str) -> list[dict]:
    """Mean cos2 per n from the points of one method (used when curves lack it)."""
    by_n: dict[float, list[list[float]]] = {}
    for p in _list(doc.get("points")):
        if not isinstance(p, Mapping) or str(p.get("method")) != method:
            continue
        n, c = _num(p.get("n")), _list(p.get("cos2"))
        if _ok(n) and c:
            by_n.setdefault(n, []).append([_num(v) for v in c])
    rows = []
    for n, vecs in sorted(by_n.items()):
        k = min(len(v) for v in vecs)
        mean = []
        for i in range(k):
            m, _ = _mean_sem([v[i] for v in vecs])
            mean.append(m)
        rows.append({"n": n, "cos2_mean": mean})
    return rows


def _direction_indices(d1: int) -> list[int]:
    """0-based directions to draw: all of them, or MAX_DIRECTIONS spread over 1..d1."""
    if d1 <= MAX_DIRECTIONS:
        return list(range(d1))
    idx = {round(k * (d1 - 1) / (MAX_DIRECTIONS - 1)) for k in range(MAX_DIRECTIONS)}
    return sorted(idx)


def _cos2_rows(rows: Sequence[Mapping]) -> list[tuple[float, list[float]]]:
    out = []
    for r in rows:
        c = _list(r.get("cos2"))
        if c:
            out.append((_num(r.get("n")), [_num(v) for v in c]))
    return out


def _plot_cos2(doc: Mapping):
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    fig, ax = _new_axes()
    curves = _curves(doc)
    method = _cos2_method(curves)
    rows = curves.get(method, []) if method else []
    if method is None:
        method = PRIMARY_METHOD
        rows = _cos2_from_points(doc, method)
        if not rows:
            for p in _list(doc.get("points")):
                if isinstance(p, Mapping) and _list(p.get("cos2")):
                    method = str(p.get("method"))
                    rows = _cos2_from_points(doc, method)
                    break
    ax.set_title(_title(doc), fontsize=10)
    _xlabel(ax, doc)
    seeds = [int(_num(r.get("n_seeds"))) for r in rows if _ok(_num(r.get("n_seeds")))]
    what = f"mean over {max(seeds)} seeds" if seeds and max(seeds) > 1 else "seed mean"
    ax.set_ylabel(f"cos² with teacher direction i\n({_mathsafe(method)}, {what})")

    emp: list[tuple[float, list[float]]] = []
    for r in rows:
        n, c = _num(r.get("n")), _list(r.get("cos2_mean"))
        if _ok(n) and n > 0 and c:
            emp.append((n, [_num(v) for v in c]))
    theories = [(label, _cos2_rows(rs), style) for label, rs, style in _theories(doc)]
    theories = [t for t in theories if t[1]]

    d1 = _d1(doc)
    if d1 is None:
        d1 = max([len(c) for _, c in emp] + [len(c) for t in theories for _, c in t[1]], default=0)
    if d1 == 0 or not (emp or theories):
        _no_data(ax)
        return fig

    weights = _weights(doc)
    directions = _direction_indices(d1)
    # a sequential map from dark (strongest) to light, its pale end cut off so every curve
    # stays visible on white; each curve also carries its index at its right end
    cmap = colormaps["plasma"]
    span = max(len(directions) - 1, 1)
    colour = {i: cmap(0.82 * k / span) for k, i in enumerate(directions)}

    drawn = False
    for i in directions:
        w = weights[i] if i < len(weights) else math.nan
        label = f"i={i + 1}" + (f" (|λ|={w:.2f})" if _ok(w) else "")
        pts = [(n, c[i]) for n, c in emp if i < len(c) and _ok(c[i])]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                markersize=3.5,
                linewidth=1.5,
                color=colour[i],
                label=label,
                zorder=3,
            )
            # the index beside the curve where it crosses 1/2 (curves are spread apart
            # there), else at its last point
            at = next((k for k in range(1, len(pts)) if pts[k - 1][1] < 0.5 <= pts[k][1]), None)
            if at is None:
                xy, offset, ha = pts[-1], (4, 0), "left"
            else:
                (x0, y0), (x1, y1) = pts[at - 1], pts[at]
                frac = (0.5 - y0) / (y1 - y0)
                xy = (x0 * (x1 / x0) ** frac, 0.5)
                offset, ha = (-3, 5), "right"
            ax.annotate(
                str(i + 1),
                xy,
                xytext=offset,
                textcoords="offset points",
                fontsize=7,
                fontweight="bold",
                color=colour[i],
                va="center",
                ha=ha,
                zorder=5,
            )
            drawn = True
        for tlabel, trows, _style in theories:
            tpts = [(n, c[i]) for n, c in trows if i < len(c) and _ok(c[i])]
            if tpts:
                ax.plot(
                    [p[0] for p in tpts],
                    [p[1] for p in tpts],
                    linestyle=_dash(tlabel),
                    linewidth=1.0,
                    color=colour[i],
                    alpha=0.9,
                    label=None if pts else label,
                    zorder=2,
                )
                drawn = True
                pts = pts or tpts
    if not drawn:
        _no_data(ax)
        return fig

    extra = []
    for tlabel, _rows, _style in theories:
        extra.append(Line2D([], [], linestyle=_dash(tlabel), color="0.35", label=tlabel))
    any_half = False
    for t in _list(doc.get("thresholds")):
        if not isinstance(t, Mapping):
            continue
        feature, n_half = _num(t.get("feature")), _num(t.get("n_half"))
        i = int(feature) - 1 if _ok(feature) else -1
        if i in colour and _ok(n_half) and n_half > 0:
            ax.plot([n_half], [0.5], marker="|", markersize=9, color=colour[i], zorder=4)
            any_half = True
    if any_half:
        extra.append(
            Line2D([], [], linestyle="none", marker="|", color="0.35", label="empirical n½")
        )
    ax.axhline(0.5, color="0.5", linewidth=0.8, linestyle="-", alpha=0.7)

    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    handles, labels = ax.get_legend_handles_labels()
    handles += extra
    labels += [h.get_label() for h in extra]
    title = None if d1 <= MAX_DIRECTIONS else f"{len(directions)} of {d1} directions"
    ax.legend(
        handles,
        labels,
        fontsize=6.5,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        title=title,
        title_fontsize=7,
        frameon=False,
    )
    return fig


def _spectrum_point(doc: Mapping) -> Mapping | None:
    def candidates(method: str | None):
        out = []
        for p in _list(doc.get("points")):
            if not isinstance(p, Mapping):
                continue
            if method is not None and str(p.get("method")) != method:
                continue
            eig = [_num(v) for v in _list(p.get("eigenvalues"))]
            if eig and any(_ok(v) for v in eig) and _ok(_num(p.get("n"))):
                out.append(p)
        return out

    pts = candidates(PRIMARY_METHOD) or candidates(None)
    if not pts:
        return None
    n_max = max(_num(p.get("n")) for p in pts)
    at_max = [p for p in pts if _num(p.get("n")) == n_max]

    def seed_key(p):
        s = _num(p.get("seed"))
        return (0 if s == 0 else 1, s if _ok(s) else math.inf)

    return min(at_max, key=seed_key)


def _spectrum_theories(doc: Mapping) -> list[tuple[str, float, list[float], float, str]]:
    """(name, bulk edge, signed spikes, n, model) of the asymptotic and finite-size spectra."""
    theory = _dict(doc.get("theory"))
    out = []
    fs = theory.get("finite_size")
    sources = [("asymptotic", _dict(theory.get("spectrum")))]
    if isinstance(fs, Mapping):
        sources.append(("finite-size", _dict(fs.get("spectrum"))))
    for name, sp in sources:
        if not sp:
            continue
        edge = _num(sp.get("bulk_edge"))
        spikes = [_num(v) for v in _list(sp.get("spikes", sp.get("outliers")))]
        spikes = sorted((v for v in spikes if _ok(v)), key=abs, reverse=True)
        model = str(sp.get("model") or "gaussian-equivalent")
        out.append((name, edge, spikes, _num(sp.get("n")), model))
    return out


def _plot_spectrum(doc: Mapping):
    fig, ax = _new_axes()
    title = _title(doc)
    point = _spectrum_point(doc)
    if point is None:
        ax.set_xlabel("rank (by |eigenvalue|)")
        ax.set_ylabel("eigenvalue of moment matrix")
        ax.set_title(title, fontsize=10)
        _no_data(ax)
        return fig

    n = _num(point.get("n"))
    method = str(point.get("method"))
    seed = point.get("seed")
    eig = [_num(v) for v in _list(point.get("eigenvalues"))]
    d1 = _d1(doc)
    k = min(d1 if d1 is not None else 0, len(eig))
    full = len(eig) > max(60, 3 * (k + 10))
    sub = f"{'all' if full else 'top'} eigenvalues at n={n:g} ({_mathsafe(method)}"
    sub += f", seed {seed})" if seed is not None else ")"
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    if full:
        _spectrum_histogram(ax, doc, eig, k, n)
    else:
        _spectrum_stems(ax, doc, eig, k, n)
    return fig


def _edge_label(name: str, model: str, n_theory: float, n: float) -> str:
    label = f"{name} bulk edge ±2√(D E[y²]/n) ({_mathsafe(model)})"
    if _ok(n_theory) and n_theory != n:
        label += f" at n={n_theory:g}"
    return label


def _spectrum_stems(ax, doc: Mapping, eig: list[float], k: int, n: float) -> None:
    _xlabel(ax, doc, "rank (by |eigenvalue|)")
    ax.set_ylabel("eigenvalue of the moment matrix C_hat")
    ranks = list(range(1, len(eig) + 1))
    groups = [
        (ranks[:k], eig[:k], "C0", f"top d1 = {k} (learned)"),
        (ranks[k:], eig[k:], "0.6", f"next {len(eig) - k}"),
    ]
    for xs, ys, color, label in groups:
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if _ok(y)]
        if not pts:
            continue
        px, py = [p[0] for p in pts], [p[1] for p in pts]
        ax.vlines(px, 0, py, color=color, linewidth=1.6)
        ax.plot(px, py, "o", color=color, markersize=5, label=label)
    ax.axhline(0, color="0.3", linewidth=0.7)

    n_spikes = 0
    styles = {"asymptotic": ("C3", "--", "x", 0.0), "finite-size": ("C2", ":", "+", 0.18)}
    for name, edge, spikes, tn, model in _spectrum_theories(doc):
        color, ls, marker, shift = styles[name]
        if _ok(edge) and edge > 0:
            ax.axhline(
                edge,
                color=color,
                linestyle=ls,
                linewidth=1.0,
                label=_edge_label(name, model, tn, n),
            )
            ax.axhline(-edge, color=color, linestyle=ls, linewidth=1.0)
        if spikes:
            label = f"{name} outliers, predicted sign"
            if _ok(tn) and tn != n:
                label += f" (n={tn:g})"
            ax.plot(
                [r + shift for r in range(1, len(spikes) + 1)],
                spikes,
                marker,
                color="C1" if name == "asymptotic" else color,
                markersize=8,
                markeredgewidth=1.8,
                label=label,
            )
            n_spikes = max(n_spikes, len(spikes))

    ax.set_xlim(0.3, max(len(eig), n_spikes) + 0.7)
    if len(ranks) <= 25:
        ax.set_xticks(ranks if len(ranks) <= 12 else ranks[::2])
    _legend(ax, fontsize=6.5, loc="best")


def _spectrum_histogram(ax, doc: Mapping, eig: list[float], k: int, n: float) -> None:
    """Every eigenvalue: a histogram, the learned top d1 as a rug, the theories' edges and
    signed outliers as vertical lines."""
    vals = [v for v in eig if _ok(v)]
    _xlabel(ax, doc, "eigenvalue of the moment matrix C_hat")
    ax.set_ylabel("count")
    counts, _, _ = ax.hist(
        vals,
        bins=int(min(120, max(20, len(vals) // 4))),
        color="0.6",
        label=f"all {len(vals)} eigenvalues",
    )
    ax.set_yscale("log")
    ax.set_ylim(0.5, max(2.0, float(max(counts, default=1.0))) * 40)  # room for the legend
    top = [v for v in eig[:k] if _ok(v)]
    if top:
        ax.plot(
            top,
            [0.8] * len(top),
            "|",
            color="C0",
            markersize=14,
            markeredgewidth=1.5,
            label=f"top d1 = {k} (learned)",
        )
    styles = {"asymptotic": ("C3", "--"), "finite-size": ("C2", ":")}
    for name, edge, spikes, tn, model in _spectrum_theories(doc):
        color, ls = styles[name]
        if _ok(edge) and edge > 0:
            ax.axvline(
                edge,
                color=color,
                linestyle=ls,
                linewidth=1.0,
                label=_edge_label(name, model, tn, n),
            )
            ax.axvline(-edge, color=color, linestyle=ls, linewidth=1.0)
        for j, v in enumerate(spikes):
            ax.axvline(
                v,
                color="C1" if name == "asymptotic" else color,
                linestyle=ls,
                linewidth=0.8,
                alpha=0.8,
                label=f"{name} outliers, predicted sign" if j == 0 else None,
            )
    _legend(ax, fontsize=6.5, loc="upper left")


_BUILDERS = {
    "mse": _plot_mse,
    "overlap": _plot_overlap,
    "cos2": _plot_cos2,
    "spectrum": _plot_spectrum,
}


# --------------------------------------------------------------------------- public API


def _check(name: str, fmt: str) -> None:
    if name not in PLOT_NAMES:
        raise ValueError(f"unknown plot name {name!r}; allowed: {', '.join(PLOT_NAMES)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown plot format {fmt!r}; allowed: {', '.join(FORMATS)}")


def render(doc: dict, name: str, fmt: str = "png") -> bytes:
    """Render plot ``name`` (one of :data:`PLOT_NAMES`) of a results document as
    ``fmt`` (``"png"`` or ``"svg"``) and return the file's bytes.

    Raises ``ValueError`` for an unknown name or format and ``RuntimeError`` when
    matplotlib is not installed; missing data in ``doc`` never raises.
    """
    _check(name, fmt)
    if not isinstance(doc, Mapping):
        raise ValueError("doc must be a results document (a dict)")
    fig = _BUILDERS[name](doc)
    buf = io.BytesIO()
    if fmt == "png":
        fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
    else:
        # no date in the file, so identical documents give identical SVGs
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def write_plots(doc: dict, out_dir, *, formats=FORMATS) -> list[pathlib.Path]:
    """Write ``{name}.{fmt}`` for every plot name and format into ``out_dir``
    (created if needed; files are replaced atomically) and return the paths."""
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    for fmt in formats:
        _check(PLOT_NAMES[0], fmt)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PLOT_NAMES:
        for fmt in formats:
            data = render(doc, name, fmt)
            path = out / f"{name}.{fmt}"
            tmp = out / f".{name}.{fmt}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "xb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                pathlib.Path(tmp).unlink(missing_ok=True)
                raise
            paths.append(path)
    return paths
