"""The kernel baselines on the PyTorch backend (CPU) agree with NumPy.

On the CPU the PyTorch backend sees the very samples NumPy sees, and the small dense linear
algebra (landmark eigendecomposition, Cholesky solves) runs on the host with SciPy on both
backends, so the two differ only by the rounding of the kernel GEMMs (MKL in PyTorch, NumPy's
BLAS) and of the streamed sums. That rounding (~1e-16 relative) is amplified at most by the
conditioning of the ridge systems; with the ridges used here (1e-3, n_landmarks 200-300) the
observed prediction differences on raw inputs are below 4e-13, so 1e-8 relative on the
predictions (max-norm) and 1e-9 on the normalised MSE leave wide margins while still catching
any real discrepancy (a wrong intercept, feature map or landmark set moves predictions by
O(1e-3) or more). latent_rbf has a looser, justified prediction tolerance (see
LATENT_PRED_RTOL).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hsl_engine as he  # noqa: E402
from hsl_engine import _kernels  # noqa: E402
from hsl_engine._backend import to_host  # noqa: E402
from hsl_engine._experiment import _METHOD_STREAM, _KernelOnInputs, _LatentRBF  # noqa: E402
from hsl_engine._kernels import KernelRidgeSweep, poly_kernel, rbf_kernel  # noqa: E402
from hsl_engine._spectral import (  # noqa: E402
    FirstLayerSolver,
    HiddenView,
    hidden_features,
    normalised_mse,
)

PRED_RTOL = 1e-8  # max |torch - numpy| / max |numpy| over the test predictions
MSE_ATOL = 1e-9
# latent_rbf: each backend computes h_hat itself, so the kernel inputs already differ by an
# ulp. The RBF kernel on the low-dimensional h_hat keeps landmark eigenvalues down to the
# 1e-10 cut-off, whose s^-1/2 scaling amplifies that: NumPy alone moves its Nystroem
# predictions by 5e-10..1e-9 (measured) when h_hat is perturbed by one ulp, and the observed
# torch-numpy difference is ~9e-10. 1e-7 keeps a 100x margin over that conditioning.
LATENT_PRED_RTOL = 1e-7


def _spec(n_landmarks: int = 300):
    # n = 64 (exact), 304 and 1448 (Nystroem above n_landmarks = 300, nested prefixes)
    return he.parse_spec(
        {
            "model": {"d": 8, "gamma": 1.0},
            "sweep": {"alphas": [2.0, 2.75, 3.5], "seeds": 1},
            "methods": [
                {"name": "kernel_rbf", "n_landmarks": n_landmarks},
                {"name": "kernel_poly", "n_landmarks": n_landmarks},
                {"name": "latent_rbf", "n_landmarks": n_landmarks},
            ],
        }
    )


def _backends():
    return {
        "numpy": he.get_backend("cpu", backend="numpy"),
        "torch": he.get_backend("cpu", backend="torch"),
    }


def _assert_close(got, want, what: str, rtol: float = PRED_RTOL) -> None:
    assert isinstance(got, torch.Tensor), f"{what}: torch predictions are {type(got)}"
    assert got.dtype == torch.float64
    assert isinstance(want, np.ndarray)
    got = got.numpy()
    assert got.shape == want.shape
    assert np.all(np.isfinite(want)) and float(np.std(want)) > 1e-3  # a real fit, not a constant
    err = float(np.max(np.abs(got - want))) / float(np.max(np.abs(want)))
    assert err <= rtol, f"{what}: torch vs numpy max relative difference {err:.3g}"


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # several row blocks per Nystroem update and per prediction, on both backends
    monkeypatch.setattr(_kernels, "_CHUNK_ROWS", 256)


def test_kernel_functions_agree():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((70, 9)), rng.standard_normal((50, 9))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for got, want in (
        (rbf_kernel(ta, tb, 1.7), rbf_kernel(a, b, 1.7)),
        (poly_kernel(ta, tb, 4), poly_kernel(a, b, 4)),
    ):
        assert isinstance(got, torch.Tensor)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kernel", ["rbf", pytest.param("poly", marks=pytest.mark.slow)])
def test_sweep_on_arrays_agrees(kernel):
    # plain arrays vs tensors, exact then Nystroem on growing prefixes (incremental)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1500, 6))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.2 * rng.standard_normal(1500)
    xt = rng.standard_normal((600, 6))
    kw = {"degree": 3} if kernel == "poly" else {}
    models = {
        lib: KernelRidgeSweep(
            kernel, ridge=1e-3, n_landmarks=200, rng=np.random.default_rng(), **kw
        )
        for lib in ("numpy", "torch")
    }
    for n, solver in ((150, "exact"), (200, "exact"), (700, "nystroem"), (1500, "nystroem")):
        want = models["numpy"].fit_predict(x[:n], y[:n], xt)
        got = models["torch"].fit_predict(
            torch.from_numpy(x[:n]), torch.from_numpy(y[:n]), torch.from_numpy(xt)
        )
        assert got.solver == want.solver == solver
        assert got.bandwidth == want.bandwidth
        _assert_close(got.predictions, want.predictions, f"{kernel} n={n}")
    # the second Nystroem call streamed only the new rows on both backends
    assert models["torch"]._state.rows_processed == models["numpy"]._state.rows_processed == 1500


@pytest.mark.parametrize(
    "method", ["kernel_rbf", pytest.param("kernel_poly", marks=pytest.mark.slow)]
)
def test_kernel_on_inputs_agrees(method):
    # the method's own sweep on lazy views of the seed's training stream, as `iter_run` runs it
    spec = _spec()
    fits = {}
    for lib, be in _backends().items():
        data = he.make_seed_data(spec, 0, backend=be)
        rng = data.method_rng(_METHOD_STREAM[method])
        runner = _KernelOnInputs(spec, spec.method(method), data, be, rng)
        out = []
        for n, _ in spec.sample_sizes():
            view = data.train.view(n)
            fit = runner.krr.fit_predict(view, view.y, data.test_inputs)
            out.append((n, fit, normalised_mse(fit.predictions, data.test_labels)))
        fits[lib] = (out, runner.krr._state.rows_processed)
    (np_out, np_rows), (t_out, t_rows) = fits["numpy"], fits["torch"]
    assert [f.solver for _, f, _ in np_out] == ["exact", "nystroem", "nystroem"]
    assert t_rows == np_rows == np_out[-1][0]  # incremental: each row streamed once
    for (n, want, mse_n), (_, got, mse_t) in zip(np_out, t_out):
        assert (got.solver, got.n_landmarks, got.bandwidth) == (
            want.solver,
            want.n_landmarks,
            want.bandwidth,
        )
        _assert_close(got.predictions, want.predictions, f"{method} n={n}")
        assert abs(mse_t - mse_n) <= MSE_ATOL


def test_latent_rbf_agrees():
    # the latent_rbf sweep on h_hat of the second stream; the first-layer directions are fixed
    # (one NumPy first-layer fit, the same numbers on both backends) so that only the kernel
    # port is compared
    spec = _spec(n_landmarks=200)
    method = spec.method("latent_rbf")
    backends = _backends()
    n_max = spec.sample_sizes()[-1][0]
    np_data = he.make_seed_data(spec, 0, backend=backends["numpy"])
    first = FirstLayerSolver(spec, backends["numpy"], rng=np.random.default_rng(0))
    host_directions = to_host(first.fit(np_data.train.view(n_max)).directions)
    fits = {}
    for lib, be in backends.items():
        data = np_data if lib == "numpy" else he.make_seed_data(spec, 0, backend=be)
        directions = be.asarray(host_directions)
        rng = data.method_rng(_METHOD_STREAM["latent_rbf"])
        runner = _LatentRBF(spec, method, data, be, rng)
        h_test = hidden_features(spec, data.test_inputs, directions)
        out = []
        for n, _ in spec.sample_sizes():
            second = data.second.view(n)
            fit = runner.krr.fit_predict(HiddenView(spec, second, directions), second.y, h_test)
            out.append((n, fit, normalised_mse(fit.predictions, data.test_labels)))
        fits[lib] = out
    assert [f.solver for _, f, _ in fits["numpy"]] == ["exact", "nystroem", "nystroem"]
    for (n, want, mse_n), (_, got, mse_t) in zip(fits["numpy"], fits["torch"]):
        assert got.solver == want.solver
        # h_hat is computed by each backend (its own rounding), so the median bandwidth may
        # differ in the last bits
        assert got.bandwidth == pytest.approx(want.bandwidth, rel=1e-12)
        _assert_close(got.predictions, want.predictions, f"latent_rbf n={n}", LATENT_PRED_RTOL)
        assert abs(mse_t - mse_n) <= MSE_ATOL


@pytest.mark.slow  # whole kernel sweeps on both backends (n up to 1448): ~4 s each
@pytest.mark.parametrize("method", ["kernel_rbf", "kernel_poly"])
def test_iter_run_agrees(method):
    spec = _spec()
    points = {
        lib: list(he.iter_run(spec, method, 0, backend=be)) for lib, be in _backends().items()
    }
    assert [p.n for p in points["torch"]] == [p.n for p in points["numpy"]] == [64, 304, 1448]
    for p, q in zip(points["numpy"], points["torch"]):
        assert q.extra["backend"] == "torch" and p.extra["backend"] == "numpy"
        assert q.extra["solver"] == p.extra["solver"]
        assert q.extra["bandwidth"] == p.extra["bandwidth"]  # same rows, host median
        assert q.n_train_used == p.n_train_used
        assert 0.0 < p.mse < 1.0
        assert abs(q.mse - p.mse) <= MSE_ATOL


@pytest.mark.slow  # a whole kernel sweep on torch's own generator: ~3 s
def test_device_streams_run():
    # torch's own generator: different samples, so only a sane, finite result is expected
    spec = _spec()
    be = he.get_backend("cpu", backend="torch", device_streams=True)
    points = list(he.iter_run(spec, "kernel_rbf", 0, backend=be))
    assert [p.extra["solver"] for p in points] == ["exact", "nystroem", "nystroem"]
    assert all(0.0 < p.mse < 1.0 for p in points)
