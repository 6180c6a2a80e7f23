"""Tests for hsl.plots: figures rendered from a results document."""

from __future__ import annotations

import copy
import math
import sys
import threading

import pytest

pytest.importorskip("matplotlib")

from hsl import plots  # noqa: E402

D1 = 4
NS = [400.0, 1600.0, 6400.0]
WEIGHTS = [0.8, 0.5, 0.3, 0.2]


def _cos2(n: float, i: int) -> float:
    # a smooth sigmoid in log n; stronger directions switch on earlier
    n_half = 300.0 / WEIGHTS[i] ** 2
    return 1.0 / (1.0 + (n_half / n) ** 1.5)


def _make_doc() -> dict:
    points = []
    for seed in range(2):
        for n in NS:
            cos2 = [_cos2(n, i) for i in range(D1)]
            eig = [0.9 - 0.2 * i for i in range(D1)]
            eig += [0.15 * (-1) ** j / (1 + j) for j in range(10)]
            points.append(
                {
                    "method": "layerwise_spectral",
                    "seed": seed,
                    "n": n,
                    "alpha": n / 200,
                    "mse": 2.0 * n**-0.48 * (1 + 0.02 * seed),
                    "overlap": sum(cos2) / D1,
                    "cos2": cos2,
                    "eigenvalues": eig,
                    "recovered": sum(c > 0.5 for c in cos2),
                    "n_train_used": n,
                    "seconds": 0.1,
                }
            )
            points.append(
                {
                    "method": "kernel_rbf",
                    "seed": seed,
                    "n": n,
                    "alpha": n / 200,
                    "mse": 0.9 * n**-0.1,
                    "overlap": None,
                    "cos2": None,
                    "eigenvalues": None,
                    "recovered": None,
                    "n_train_used": n,
                    "seconds": 0.2,
                }
            )
    curves = {
        "layerwise_spectral": [
            {
                "n": n,
                "alpha": n / 200,
                "n_seeds": 2,
                "mse_mean": 2.0 * n**-0.48,
                # the first row has a null SEM
                "mse_sem": None if k == 0 else 0.01 * 2.0 * n**-0.48,
                "overlap_mean": sum(_cos2(n, i) for i in range(D1)) / D1,
                "overlap_sem": None if k == 0 else 0.02,
                "cos2_mean": [_cos2(n, i) for i in range(D1)],
                "recovered_mean": float(sum(_cos2(n, i) > 0.5 for i in range(D1))),
            }
            for k, n in enumerate(NS)
        ],
        "kernel_rbf": [
            {
                "n": n,
                "alpha": n / 200,
                "n_seeds": 2,
                "mse_mean": 0.9 * n**-0.1,
                "mse_sem": 0.005,
                "overlap_mean": None,
                "overlap_sem": None,
                "cos2_mean": None,
                "recovered_mean": None,
            }
            for n in NS
        ],
    }
    grid = [300.0 * 1.25**k for k in range(22)]
    theory_curve = [
        {
            "n": n,
            "mse": 1.9 * n**-0.5,
            "overlap": sum(_cos2(n, i) for i in range(D1)) / D1,
            "recovered": sum(_cos2(n, i) > 0.5 for i in range(D1)),
            "cos2": [_cos2(n * 1.1, i) for i in range(D1)],
        }
        for n in grid
    ]
    return {
        "experiment_id": "exp-test",
        "spec": {
            "name": "unit-doc",
            "model": {"d": 20, "q": 2, "gamma": 1.0, "activation": "id", "features": "hermite"},
            "sweep": {"n": NS},
            "methods": [{"name": "layerwise_spectral"}, {"name": "kernel_rbf"}],
        },
        "spec_hash": "sha256:0",
        "engine_version": "0.1.0",
        "complete": True,
        "d1": D1,
        "feature_dim": 210,
        "weights": WEIGHTS,
        "points": points,
        "curves": curves,
        "thresholds": [
            {
                "feature": i + 1,
                "weight": w,
                "n_half": (None if i == D1 - 1 else 300.0 / w**2),
                "n_half_theory": 300.0 / w**2,
                "n_onset_theory": 150.0 / w**2,
            }
            for i, w in enumerate(WEIGHTS)
        ],
        "power_law": {
            "method": "layerwise_spectral",
            "exponent": -0.48,
            "intercept": math.log(2.0),
            "exponent_ci": [-0.55, -0.41],
            "exponent_theory": -0.5,
            "exponent_theory_curve": -0.6,
            "n_range": [400, 6400],
            "n_points": 3,
        },
        "theory": {
            "curve": theory_curve,
            "spectrum": {"n": 6400, "bulk_edge": 0.18, "spikes": [0.92, 0.7, 0.5, 0.31]},
        },
    }


@pytest.fixture
def doc() -> dict:
    return _make_doc()


@pytest.fixture
def partial_doc() -> dict:
    return {
        "experiment_id": "exp-partial",
        "spec": {"name": "partial", "model": {"d": 20, "q": 2}},
        "complete": False,
        "d1": D1,
        "weights": WEIGHTS,
        "points": [],
        "curves": {},
        "thresholds": [],
        "power_law": None,
        "theory": {},
    }


@pytest.mark.parametrize("name", plots.PLOT_NAMES)
def test_render_png_and_svg(doc, name):
    png = plots.render(doc, name, "png")
    assert png.startswith(b"\x89PNG")
    svg = plots.render(doc, name, "svg")
    assert b"<svg" in svg


def test_default_format_is_png(doc):
    assert plots.render(doc, "mse").startswith(b"\x89PNG")


def test_write_plots(doc, tmp_path):
    out = tmp_path / "nested" / "plots"
    paths = plots.write_plots(doc, out)
    assert len(paths) == 8
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}.{f}" for n in plots.PLOT_NAMES for f in plots.FORMATS
    )
    for p in paths:
        assert p.parent == out and p.stat().st_size > 0


def test_write_plots_one_format(doc, tmp_path):
    paths = plots.write_plots(doc, tmp_path, formats=("svg",))
    assert [p.name for p in paths] == [f"{n}.svg" for n in plots.PLOT_NAMES]


@pytest.mark.parametrize("name", plots.PLOT_NAMES)
@pytest.mark.parametrize("fmt", plots.FORMATS)
def test_partial_document_renders(partial_doc, name, fmt):
    data = plots.render(partial_doc, name, fmt)
    assert data
    if fmt == "svg":
        assert b"no data yet" in data


@pytest.mark.parametrize("name", plots.PLOT_NAMES)
def test_bare_document_renders(name):
    assert plots.render({}, name, "svg")


@pytest.mark.parametrize("name", plots.PLOT_NAMES)
def test_running_document_renders(doc, name):
    """A running experiment: one sample size, kernel method without points,
    null power law, thresholds without n_half, theory without the spectrum."""
    running = copy.deepcopy(doc)
    running["complete"] = False
    running["points"] = [
        p for p in running["points"] if p["method"] == "layerwise_spectral" and p["n"] == NS[0]
    ]
    running["curves"] = {
        "layerwise_spectral": running["curves"]["layerwise_spectral"][:1],
        "kernel_rbf": [],
    }
    running["power_law"] = None
    for t in running["thresholds"]:
        t["n_half"] = None
    running["theory"] = {"curve": running["theory"]["curve"], "spectrum": None}
    assert plots.render(running, name, "png").startswith(b"\x89PNG")


def test_points_without_curves_are_aggregated(doc):
    doc["curves"] = {}
    svg = plots.render(doc, "mse", "svg")
    assert b"no data yet" not in svg
    assert b"layerwise_spectral" in svg and b"kernel_rbf" in svg
    assert b"no data yet" not in plots.render(doc, "cos2", "svg")


def test_mse_plot_shows_data(doc):
    svg = plots.render(doc, "mse", "svg")
    assert (
        b"fit: slope -0.48 [-0.55, -0.41] (95 % t over seeds), n in [400, 6.4e+03], 3 points" in svg
    )
    # the theory curve's own slope over the fit window (-0.50 for 1.9 n^-0.5), named, and
    # the asymptotic exponent beside it
    assert b"asymptotic theory (BBP, corrected tail): slope -0.50 over the fit window" in svg
    assert "n→∞ exponent -0.50".encode() in svg
    assert b"layerwise_spectral" in svg and b"kernel_rbf" in svg
    assert "mean ± SEM over 2 seeds".encode() in svg
    assert b"test MSE / Var(y)" in svg
    assert b"unit-doc: d=20, q=2, gamma=1.0, id, hermite" in svg
    assert b"no data yet" not in svg


def test_mse_legend_lists_methods_first(doc):
    # without any SEM the layerwise series is a plain line, which matplotlib would
    # otherwise list before the kernel's errorbar container
    for row in doc["curves"]["layerwise_spectral"]:
        row["mse_sem"] = None
    svg = plots.render(doc, "mse", "svg")
    keys = [
        b"<!-- layerwise_spectral (",
        b"<!-- kernel_rbf (",
        b"<!-- asymptotic theory",
        b"<!-- fit:",
    ]
    positions = [svg.index(k) for k in keys]
    assert positions == sorted(positions)


def test_mse_fit_label_without_ci_or_theory(doc):
    doc["power_law"]["exponent_ci"] = None
    doc["power_law"]["exponent_theory"] = None
    doc["power_law"]["exponent_theory_curve"] = None
    svg = plots.render(doc, "mse", "svg")
    assert b"fit: slope -0.48, n in [400, 6.4e+03], 3 points -->" in svg


def test_mse_drops_nonpositive_values(doc):
    doc["curves"]["layerwise_spectral"][0]["mse_mean"] = 0.0
    doc["curves"]["kernel_rbf"][1]["mse_mean"] = -1.0
    doc["theory"]["curve"][0]["mse"] = 0.0
    assert plots.render(doc, "mse", "png").startswith(b"\x89PNG")


def test_cos2_and_spectrum_content(doc):
    cos2 = plots.render(doc, "cos2", "svg")
    assert b"i=1 (|\xce\xbb|=0.80)" in cos2  # |λ| in UTF-8
    assert b"i=4 (|\xce\xbb|=0.20)" in cos2
    spec = plots.render(doc, "spectrum", "svg")
    assert b"top d1 = 4 (learned)" in spec
    assert b"next 10" in spec
    assert b"n=6400" in spec and b"seed 0" in spec


def test_cos2_caps_directions():
    doc = _make_doc()
    d1 = 25
    doc["d1"] = d1
    doc["weights"] = [1.0 / (1 + i) for i in range(d1)]
    for row in doc["curves"]["layerwise_spectral"]:
        row["cos2_mean"] = [0.5] * d1
    for row in doc["theory"]["curve"]:
        row["cos2"] = [0.5] * d1
    svg = plots.render(doc, "cos2", "svg")
    assert svg.count(b"<!-- i=") == 10
    assert b"<!-- i=1 " in svg and b"<!-- i=25 " in svg


def test_bad_name_or_format(doc):
    with pytest.raises(ValueError, match="mse"):
        plots.render(doc, "nope")
    with pytest.raises(ValueError, match="svg"):
        plots.render(doc, "mse", "jpg")
    with pytest.raises(ValueError):
        plots.write_plots(doc, "/nonexistent-should-not-be-created", formats=("pdf",))


def test_threads_render_concurrently(doc):
    errors: list[BaseException] = []
    results: list[bytes] = []

    def work(name):
        try:
            results.append(plots.render(doc, name, "png"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in plots.PLOT_NAMES * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 8


def test_missing_matplotlib_message(doc, monkeypatch):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(RuntimeError, match=r"pip install 'hsl\[plots\]'"):
        plots.render(doc, "mse")


def _finite_size(doc: dict) -> list[dict]:
    """A finite-size theory curve in the shape of the results document: rows with n, mse,
    overlap, recovered and cos2 per direction (here: the asymptotic one, shifted)."""
    return [
        {**row, "mse": row["mse"] * 1.15, "cos2": [0.9 * c for c in row["cos2"]]}
        for row in doc["theory"]["curve"]
    ]


def test_both_theories_are_drawn_and_named(doc):
    doc["theory"]["finite_size"] = _finite_size(doc)
    for name in ("mse", "overlap", "cos2"):
        svg = plots.render(doc, name, "svg")
        assert b"asymptotic theory (BBP, corrected tail)" in svg, name
        assert b"finite-size theory (exact, Gaussian-equivalent)" in svg, name
    # the finite-size curve's slope over the fit window is in the MSE legend too
    mse = plots.render(doc, "mse", "svg")
    assert b"finite-size theory (exact, Gaussian-equivalent): slope -0.50 over the fit" in mse
    # a mapping with the curve under "curve" works as well
    doc["theory"]["finite_size"] = {"curve": _finite_size(doc)}
    assert b"finite-size theory" in plots.render(doc, "cos2", "svg")


def test_theory_labels_name_the_label_clip(doc):
    # with the layer-wise method's label_clip (an extension) the finite-size theory is the
    # clip's and the asymptotic one is for T = y: the legends say so
    doc["theory"]["finite_size"] = _finite_size(doc)
    doc["spec"]["methods"] = [{"name": "layerwise_spectral", "label_clip": 1.5}]
    for name in ("mse", "overlap", "cos2"):
        svg = plots.render(doc, name, "svg").decode()
        assert "finite-size theory (exact, Gaussian-equivalent), labels clipped at ±1.5 sd" in svg
        assert "asymptotic theory (BBP, corrected tail), T = y" in svg, name
    mse = plots.render(doc, "mse", "svg").decode()
    assert "asymptotic theory (BBP, corrected tail), T = y: slope -0.50 over the fit" in mse


def test_no_power_law_says_why(doc):
    doc["power_law"] = {
        "method": "layerwise_spectral",
        "exponent": None,
        "intercept": None,
        "exponent_ci": None,
        "n_range": None,
        "n_points": 0,
        "reason": "no recovery window: no direction reaches seed-mean cos2 1/2 in the sweep",
    }
    svg = plots.render(doc, "mse", "svg")
    assert b"no power-law fit: no recovery window" in svg
    assert b"fit: slope" not in svg


def test_spectrum_draws_signed_spikes_and_names_the_edge_model(doc):
    doc["theory"]["spectrum"] = {
        "n": 6400,
        "bulk_edge": 0.18,
        "spikes": [-0.92, 0.7, -0.5],
        "model": "gaussian-equivalent, Var(h2) = 1 + 12/d = 1.600",
    }
    svg = plots.render(doc, "spectrum", "svg")
    assert b"asymptotic outliers, predicted sign" in svg
    assert b"(gaussian-equivalent, Var(h2) = 1 + 12/d = 1.600)" in svg
    # Hermite features: the figure says which model the curves are and why data lag them
    assert b"Hermite features: both theories are Gaussian-equivalent" in svg
    fig = plots._plot_spectrum(doc)
    ys = sorted(
        float(y)
        for line in fig.axes[0].lines
        if "outliers" in str(line.get_label())
        for y in line.get_ydata()
    )
    assert ys == [-0.92, -0.5, 0.7]
    doc["spec"]["model"]["features"] = "gaussian"
    assert b"Hermite features" not in plots.render(doc, "spectrum", "svg")


def test_full_spectrum_is_a_histogram(doc):
    point = doc["points"][-2]  # layerwise_spectral, seed 1, largest n
    for p in doc["points"]:
        if p["method"] == "layerwise_spectral" and p["n"] == NS[-1] and p["seed"] == 0:
            point = p
    point["eigenvalues"] = [0.9, -0.7, 0.6, 0.5] + [0.1 * math.sin(k) for k in range(200)]
    svg = plots.render(doc, "spectrum", "svg")
    assert b"all eigenvalues at n=6400" in svg
    assert b"all 204 eigenvalues" in svg


def test_png_at_paper_resolution(doc):
    import io

    from matplotlib.image import imread

    png = plots.render(doc, "mse", "png")
    height, width = imread(io.BytesIO(png)).shape[:2]
    assert width == round(plots.FIGSIZE[0] * plots.PNG_DPI) and plots.PNG_DPI >= 200
    assert height == round(plots.FIGSIZE[1] * plots.PNG_DPI)


def test_split_methods_say_which_samples_they_used(doc):
    doc["spec"]["methods"][0]["sample_split"] = True
    svg = plots.render(doc, "mse", "svg")
    assert b"sample split: uses 3n samples" in svg


def test_cos2_curves_carry_direct_labels(doc):
    fig = plots._plot_cos2(doc)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["1", "2", "3", "4"]
    colours = {line.get_color() for line in fig.axes[0].lines if line.get_label().startswith("i=")}
    assert len(colours) == D1  # one distinct colour per direction
