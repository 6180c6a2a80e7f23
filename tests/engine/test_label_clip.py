"""The layer-wise spectral method's ``label_clip`` option (an extension, docs/theory.md section
10): the first layer's matrix uses ``T(y) = clip((y - mean) / sd, -c, c)``, re-centred over the
same samples.

Checked here: the spec field and its limits; unset, nothing changes (the spec hash of earlier
specs included); the operator applies T in its matrix-free and dense forms as a direct
computation does; the Krylov and dense solvers, the NumPy and PyTorch backends and stored and
streamed samples agree; the exact theory follows the method's T; and, in Gaussian mode with
g = id, clipping recovers directions earlier, as the theory says, and the theory with the
clip predicts the simulated overlaps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import hsl_engine as he
from hsl.document import results_document
from hsl_engine._estimate import choose_solver
from hsl_engine._operator import DenseAccumulator, MomentOperator
from hsl_engine._spectral import label_map

# the default spec's hash before label_clip existed (engine 0.5.0, commit 12f860a)
DEFAULT_SPEC_HASH = "sha256:5ca6e4aa8d21b84d8ee45db9d5e9f2434dc418db559e98cbed7f41cca540d06c"
GAUSSIAN_ID = {"d": 24, "d1": 5, "gamma": 0.4, "features": "gaussian"}  # D = 300


def clip_spec(clip, *, model=None, solver="dense", ns=(900, 1800, 3601), seeds=1, seed=0):
    method = {"name": "layerwise_spectral"}
    if clip is not None:
        method["label_clip"] = clip
    return he.parse_spec(
        {
            "model": model or GAUSSIAN_ID,
            "sweep": {"n_values": list(ns), "seeds": seeds, "seed": seed, "n_test": 2000},
            "methods": [method],
            "solver": {"eigensolver": solver},
        }
    )


def run(spec, **backend):
    return list(he.iter_run(spec, "layerwise_spectral", 0, backend=he.get_backend(**backend)))


def without_time(points):
    return [dataclasses.replace(p, seconds=0.0) for p in points]


# ---------------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("value", [0.4, 10.5, -1.0])
def test_label_clip_outside_its_bounds_is_refused_naming_the_field(value):
    with pytest.raises(he.SpecError) as exc:
        clip_spec(value)
    assert exc.value.errors == [
        {"field": "methods.0.label_clip", "message": f"must be in [0.5, 10], got {value}"}
    ]


def test_label_clip_belongs_to_the_layerwise_method_only():
    with pytest.raises(he.SpecError) as exc:
        he.parse_spec({"methods": [{"name": "latent_rbf", "label_clip": 1.5}]})
    assert exc.value.errors[0]["field"].endswith("label_clip")


def test_unset_label_clip_leaves_the_spec_and_its_hash_as_before():
    spec = he.parse_spec({})
    assert spec.spec_hash == DEFAULT_SPEC_HASH
    explicit = he.parse_spec({"methods": [{"name": "layerwise_spectral", "label_clip": None}]})
    assert explicit.spec_hash == DEFAULT_SPEC_HASH
    assert "label_clip" not in spec.model_dump(mode="json")["methods"][0]
    clipped = he.parse_spec({"methods": [{"name": "layerwise_spectral", "label_clip": 1.5}]})
    assert clipped.spec_hash != DEFAULT_SPEC_HASH
    assert clipped.model_dump(mode="json")["methods"][0]["label_clip"] == 1.5
    assert he.parse_spec(clipped.canonical_json()) == clipped  # round trip


# ------------------------------------------------------------------------------ the operator


@pytest.mark.parametrize(("q", "features"), [(2, "hermite"), (2, "gaussian"), (3, "hermite")])
def test_operator_applies_the_clipped_labels_in_both_forms(seed, q, features):
    rng = np.random.default_rng(seed)
    d = 7
    width = d if features == "hermite" else he.feature_dim(d, q)
    n = 3000
    x = rng.standard_normal((n, width))
    y = rng.standard_exponential(n) ** 2  # a heavy right tail: many labels get clipped
    samples = MomentOperator(x, y, q=q, features=features, backend=he.get_backend("cpu")).samples
    labels = label_map(samples, "id", clip=1.5)
    # the same T computed directly
    sd = y.std()
    t = np.clip(y - y.mean(), -1.5 * sd, 1.5 * sd)
    assert np.mean(np.abs(y - y.mean()) > 1.5 * sd) > 0.02
    t = t - t.mean()
    assert labels.bounds == pytest.approx((-1.5 * sd, 1.5 * sd), rel=1e-12)
    f = x if features == "gaussian" else he.lift(x, q)
    dim = f.shape[1]
    # (1/n) sum T (F F^T - I): the -I term vanishes with sum T = 0
    direct = (f.T * t) @ f / n - t.mean() * np.eye(dim)
    op = MomentOperator(
        x, y, q=q, features=features, backend=he.get_backend("cpu"), **labels.kwargs()
    )
    v = rng.standard_normal((dim, 3))
    np.testing.assert_allclose(op.matmat(v), direct @ v, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(op.dense(), direct, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="raw sums"):
        DenseAccumulator(dim).moment(op)


def test_a_clip_that_clips_nothing_gives_the_method_without_one():
    # g = id with Gaussian features: |y - mean| < 10 sd for every sample here, so the clip
    # only adds a re-centring by a rounding-sized mean: the same numbers up to rounding
    plain = run(clip_spec(None, solver="krylov"))
    wide = run(clip_spec(10.0, solver="krylov"))
    for p, r in zip(wide, plain, strict=True):
        assert abs(p.mse - r.mse) <= 1e-10
        np.testing.assert_allclose(p.cos2, r.cos2, atol=1e-10)
        np.testing.assert_allclose(p.eigenvalues, r.eigenvalues, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------- solvers, backends, storage


@pytest.mark.parametrize(
    "model",
    [GAUSSIAN_ID, {"d": 10, "d1": 4, "gamma": 0.8, "activation": "tanh", "noise_std": 0.5}],
)
def test_krylov_and_dense_solvers_agree_with_a_clip(model):
    # the tolerances of tests/engine/test_solver_accuracy.py (equal accuracy, issue 8)
    dense = run(clip_spec(1.5, model=model, solver="dense"))
    krylov = run(clip_spec(1.5, model=model, solver="krylov"))
    plain = run(clip_spec(None, model=model, solver="dense"))
    for p, r, u in zip(krylov, dense, plain, strict=True):
        assert p.extra["converged"] and p.extra["eigensolver"] == "krylov"
        assert r.extra["eigensolver"] == "dense"
        assert np.max(np.abs(np.subtract(p.cos2, r.cos2))) <= 1e-3
        assert abs(p.mse - r.mse) <= 1e-3
        assert abs(p.eigenvalues[0] - r.eigenvalues[0]) <= 1e-4 * abs(r.eigenvalues[0])
        assert not np.allclose(r.cos2, u.cos2, atol=1e-3)  # the clip changed the first layer


def test_torch_cpu_backend_matches_numpy_with_a_clip(seed):
    pytest.importorskip("torch")
    for solver in ("dense", "krylov"):
        spec = clip_spec(1.5, solver=solver, seed=seed)
        ref = run(spec, device="cpu")
        got = run(spec, device="cpu", backend="torch")
        for p, r in zip(got, ref, strict=True):
            assert p.extra["backend"] == "torch"
            assert abs(p.mse - r.mse) <= 1e-8
            assert np.abs(np.subtract(p.cos2, r.cos2)).max() <= 1e-8
            np.testing.assert_allclose(p.eigenvalues, r.eigenvalues, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solver", ["dense", "krylov"])
def test_stored_and_streamed_samples_give_identical_points_with_a_clip(seed, solver):
    # n not multiples of the chunk: the last chunk is cut
    spec = clip_spec(1.5, model={**GAUSSIAN_ID, "noise_std": 0.3}, solver=solver, seed=seed)
    stored = run(spec, device="cpu")
    streamed = run(spec, device="cpu", sample_budget_bytes=0)
    partial = run(spec, device="cpu", sample_budget_bytes=1e7)  # 3 chunks kept
    assert without_time(stored) == without_time(streamed) == without_time(partial)


def test_the_auto_rule_and_the_estimate_count_the_dense_rebuild_per_n():
    # dense without a clip accumulates each sample once (4 D^2 flops); with one it builds the
    # matrix from all n at each n (2 n D^2): the auto rule weighs that against Krylov. On a
    # linear grid of 8 n at D = 465 that is 0.7x the Krylov estimate without a clip, 1.5x with
    ns = [3000 * k for k in range(1, 9)]
    model = {**GAUSSIAN_ID, "d": 30}
    plain = clip_spec(None, model=model, solver="auto", ns=ns)
    clipped = clip_spec(1.5, model=model, solver="auto", ns=ns)
    assert choose_solver(plain) == "dense"
    assert choose_solver(clipped) == "krylov"
    a = he.estimate_resources(clip_spec(None, model=model, ns=ns))
    b = he.estimate_resources(clip_spec(1.5, model=model, ns=ns))
    dim = plain.model.feature_dim
    extra = [
        fb - fa
        for fa, fb in zip(a.point_flops["layerwise_spectral"], b.point_flops["layerwise_spectral"])
    ]
    previous = [0] + ns[:-1]
    for e, n, m in zip(extra, ns, previous):
        # (the clip's extra pass over the labels regenerates nothing: the samples are stored)
        assert e == pytest.approx(2.0 * n * dim * dim - 4.0 * (n - m) * dim * dim, rel=1e-9)


# -------------------------------------------------------------------------------- the theory


def test_exact_theory_follows_the_methods_clip():
    ns = [900, 1800, 3600]
    plain, clipped = clip_spec(None, ns=ns, seeds=2), clip_spec(1.5, ns=ns, seeds=2)
    a, b = he.finite_size_curve(plain, ns), he.finite_size_curve(clipped, ns)
    assert b == he.finite_size_curve(plain, ns, label_clip=1.5)
    assert a != b
    # the theory of the clip recovers every direction earlier (docs/theory.md section 10:
    # 0.68-0.81x the samples at D = 465, gamma 0.4)
    half_a, half_b = he.n_half_finite_size(plain), he.n_half_finite_size(clipped)
    ratio = np.array(half_b) / np.array(half_a)
    assert np.all(ratio < 0.95), ratio
    doc = results_document(clipped, [])
    assert [r["cos2"] for r in doc["theory"]["finite_size"]] == [list(p.cos2) for p in b]
    assert [t["n_half_finite_size"] for t in doc["thresholds"]] == half_b
    # the asymptotic overlay stays the T = y one
    assert doc["theory"]["curve"] == results_document(plain, [])["theory"]["curve"]


def test_clipped_labels_recover_earlier_and_the_theory_predicts_it(seed):
    # ~5 s. Gaussian mode, g = id, gamma 0.4, D = 300, dense solver: two sweeps of 5 seeds (the
    # teachers the theory averages over) at n/D = 3-24, where the directions are recovered.
    # Measured over root seeds 0-4 (docs/theory.md section 10): mean |d cos2| to the theory
    # 0.018-0.026 with the clip, 0.064-0.078 to the T = y theory
    ns = [900, 1800, 3600, 7200]
    out = {}
    for clip in (None, 1.5):
        spec = clip_spec(clip, ns=ns, seeds=5, seed=seed)
        result = he.run_experiment(spec, threads=1)
        sim = np.array([r.cos2_mean for r in result.summary.curves["layerwise_spectral"]])
        pred = np.array([p.cos2 for p in he.finite_size_curve(spec, ns)])
        out[clip] = sim, pred
    (sim_y, pred_y), (sim_c, pred_c) = out[None], out[1.5]
    # recovery comes earlier: higher mean overlap at every n, and at least as many
    # directions past 1/2 (seed means over 5 teachers)
    assert np.all(sim_c.mean(axis=1) > sim_y.mean(axis=1)), (sim_c, sim_y)
    assert np.all(np.sum(sim_c > 0.5, axis=1) >= np.sum(sim_y > 0.5, axis=1))
    # the theory with the clip predicts the clipped runs within the bound of the
    # theory-agreement test (tests/engine/test_finite_size.py: mean |d cos2| <= 0.05)
    assert np.mean(np.abs(sim_c - pred_c)) <= 0.05, np.abs(sim_c - pred_c)
    assert np.mean(np.abs(sim_y - pred_y)) <= 0.05
    # and the T = y theory does not describe the clipped runs as well
    assert np.mean(np.abs(sim_c - pred_y)) > np.mean(np.abs(sim_c - pred_c))
