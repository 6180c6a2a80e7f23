"""The PyTorch backend against NumPy: the same algorithm through one code path.

Run on the CPU in CI (torch's CPU build) and on CUDA where a GPU is present (the ``cuda``
parameter skips cleanly without one). Tolerances:

* Same samples (the PyTorch backend on the CPU reads NumPy's keyed streams): float64 results
  agree to rounding, 1e-10 relative on operator products and 1e-8 on the end-to-end MSE and
  cos2; float32 GEMMs (float64 sums) to 1e-4 relative, the float32 solver tolerance.
* Device streams (the device's own generator, as on CUDA): other numbers from the same law,
  so statistical agreement only: moments of 2^16 draws within 5 standard errors, and
  learning curves of the same spec within the seed spread stated in each test.
"""

from __future__ import annotations

import numpy as np
import pytest

import hsl_engine as he
from hsl_engine._backend import to_host
from hsl_engine._eigen import block_krylov_top, dense_top
from hsl_engine._operator import MomentOperator

torch = pytest.importorskip("torch")


def _devices() -> list:
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
    return ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.fixture(params=_devices())
def device(request) -> str:
    return request.param


def _torch(device: str, **kw) -> he.Backend:
    return he.get_backend(device, backend="torch", **kw)


def _spec(**over) -> he.ExperimentSpec:
    base = {
        "model": {"d": 14, "gamma": 1.0},
        "sweep": {"alphas": [2.0, 2.5, 3.0], "seeds": 1, "n_test": 2000},
        "methods": [{"name": "layerwise_spectral"}],
    }
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return he.parse_spec(base)


@pytest.mark.parametrize(
    ("q", "features", "dtype"),
    [(2, "hermite", "float64"), (3, "hermite", "float64"), (2, "gaussian", "float64"),
     (2, "hermite", "float32"), (3, "hermite", "float32")],
)  # fmt: skip
def test_operator_matches_numpy(seed, device, q, features, dtype):
    rng = np.random.default_rng(seed)
    d = 9
    dim = he.feature_dim(d, q)
    width = dim if features == "gaussian" else d
    x = rng.standard_normal((3000, width))
    y = rng.standard_normal(3000)
    y -= y.mean()
    v = rng.standard_normal((dim, 5))
    out = {}
    for name, be in (("numpy", he.get_backend("cpu")), ("torch", _torch(device))):
        op = MomentOperator(
            x.astype(dtype), y, q=q, features=features, backend=be, dtype=np.dtype(dtype)
        )
        out[name] = to_host(op.matmat(v))
    assert out["torch"].dtype == np.float64
    tol = 1e-10 if dtype == "float64" else 1e-4
    scale = np.abs(out["numpy"]).max()
    assert np.abs(out["torch"] - out["numpy"]).max() <= tol * scale


def test_krylov_and_dense_solvers_match_numpy(seed, device):
    rng = np.random.default_rng(seed)
    dim = 120
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spikes = np.array([5.0, -4.0, 3.0, 2.5, -2.0])
    values = np.concatenate([spikes, rng.uniform(-1, 1, dim - spikes.size)])
    c = (q * values) @ q.T

    class Dense:
        shape = (dim, dim)

        def __init__(self, be):
            self.backend, self.c = be, be.asarray(c)

        def matmat(self, v):
            return self.c @ v

    be = _torch(device)
    kw = {"block": 10, "tol": 1e-9, "max_passes": 400}
    ref = block_krylov_top(Dense(he.get_backend("cpu")), 5, 8, rng=np.random.default_rng(1), **kw)
    got = block_krylov_top(Dense(be), 5, 8, rng=np.random.default_rng(1), **kw)
    assert isinstance(got.vectors, torch.Tensor) and got.vectors.device.type == device
    np.testing.assert_allclose(got.values[:5], spikes, rtol=1e-9)
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-9)
    # the same invariant subspace: the top-5 projectors agree
    u, w = ref.vectors[:, :5], to_host(got.vectors)[:, :5]
    assert np.abs(u @ u.T - w @ w.T).max() < 1e-7
    # the dense solver: a full eigh on the device against NumPy's (exact to rounding)
    dense = dense_top(be.asarray(c), 8, 10, backend=be)
    exact = dense_top(c, 8, 10)
    np.testing.assert_allclose(dense.values, exact.values, rtol=1e-10)
    assert isinstance(dense.vectors, torch.Tensor)


def test_numpy_streams_on_torch_give_the_same_samples(seed, device):
    spec = _spec(sweep={"seed": seed}, solver={"dtype": "float32"})
    a = he.make_seed_data(spec, 0)
    b = he.make_seed_data(spec, 0, backend=_torch(device))
    xa, ya = a.train.view(5000).materialise()
    xb, yb = b.train.view(5000).materialise()
    assert xb.dtype == torch.float32 and yb.dtype == torch.float64
    assert np.array_equal(xa, to_host(xb)) and np.array_equal(ya, to_host(yb))
    assert np.array_equal(a.test_labels, to_host(b.test_labels))


@pytest.mark.slow  # draws 2-3 chunks of D = 105 inputs on the device: ~5 s on a CPU
def test_device_streams_are_nested_keyed_and_deterministic(seed, device):
    spec = _spec(sweep={"seed": seed})
    be = _torch(device, device_streams=True)
    one = he.make_seed_data(spec, 0, backend=be)
    two = he.make_seed_data(spec, 0, backend=he.get_backend(device, backend="torch",
                                                             device_streams=True,
                                                             sample_budget_bytes=0))  # fmt: skip
    rows = one.train.rows
    n = 2 * rows + 17  # crosses chunk boundaries
    x1, y1 = one.train.view(n).materialise()
    x2, y2 = two.train.view(n + rows).materialise()  # streamed, more samples
    assert torch.equal(x1, x2[:n]) and torch.equal(y1, y2[:n])
    # labels are the teacher's function of the inputs
    np.testing.assert_allclose(
        to_host(y1), one.teacher.clean_labels(to_host(x1)), rtol=1e-12, atol=1e-12
    )
    # another seed, other samples; NumPy's streams, other samples too
    other = he.make_seed_data(_spec(sweep={"seed": seed + 1}), 0, backend=be)
    assert not torch.equal(other.train.view(n).materialise()[0], x1)
    assert not np.array_equal(he.make_seed_data(spec, 0).train.view(n).materialise()[0],
                              to_host(x1))  # fmt: skip


def test_device_streams_draw_standard_normal_inputs(device):
    spec = _spec(model={"d": 16})
    data = he.make_seed_data(spec, 0, backend=_torch(device, device_streams=True))
    n = 1 << 16
    x = to_host(data.train.view(n).materialise()[0])
    m = x.size
    # mean 0 and variance 1 within 5 standard errors; no correlation between columns
    assert abs(x.mean()) < 5 / np.sqrt(m)
    assert abs(x.var() - 1.0) < 5 * np.sqrt(2.0 / m)
    corr = np.corrcoef(x.T)
    assert np.abs(corr - np.eye(16)).max() < 5 / np.sqrt(n)


# the d = 14, q = 2 runs (D = 105) cost seconds each: in the slow set; the fast one keeps a
# Krylov float64 (q = 3), an auto (Gaussian) and a float32 (tanh) run
_HEAVY = pytest.mark.slow


@pytest.mark.parametrize(
    ("model", "solver"),
    [
        pytest.param({"q": 2}, {"eigensolver": "krylov", "dtype": "float64"}, marks=_HEAVY),
        pytest.param({"q": 2}, {"eigensolver": "dense", "dtype": "float64"}, marks=_HEAVY),
        ({"q": 3, "d": 8}, {"eigensolver": "krylov", "dtype": "float64"}),
        ({"features": "gaussian", "d": 12}, {"eigensolver": "auto", "dtype": "float64"}),
        pytest.param({"q": 2}, {"eigensolver": "krylov", "dtype": "float32"}, marks=_HEAVY),
        ({"activation": "tanh", "features": "gaussian", "d": 12}, {"dtype": "float32"}),
    ],
)
def test_layerwise_spectral_run_matches_numpy(seed, device, model, solver):
    spec = _spec(model=model, solver=solver, sweep={"seed": seed})
    ref = list(he.iter_run(spec, "layerwise_spectral", 0, backend=he.get_backend("cpu")))
    got = list(he.iter_run(spec, "layerwise_spectral", 0, backend=_torch(device)))
    tol = 1e-8 if solver["dtype"] == "float64" else 1e-4
    for p, r in zip(got, ref, strict=True):
        assert (p.extra["backend"], p.extra["device"]) == ("torch", he.resolve_device(device))
        assert p.n == r.n and p.n_train_used == r.n_train_used
        assert abs(p.mse - r.mse) <= tol
        assert np.abs(np.subtract(p.cos2, r.cos2)).max() <= tol
        np.testing.assert_allclose(p.eigenvalues, r.eigenvalues, rtol=100 * tol, atol=tol)


@pytest.mark.slow
def test_device_streams_learn_like_numpy_streams(device):
    """Statistical agreement of whole learning curves: Gaussian mode, d = 30 (D = 465),
    d1 = 8, gamma = 1, three seeds each. At n/D = 6.5 and 43 the seed-mean MSE of the two
    stream families agree within 0.05 (seed spread here is ~0.02-0.04), and both recover the
    same directions in mean within one."""
    spec = he.parse_spec(
        {
            "model": {"d": 30, "gamma": 1.0, "features": "gaussian"},
            "sweep": {"n_values": [3000, 20000], "seeds": 3, "n_test": 4000},
            "methods": [{"name": "layerwise_spectral"}],
        }
    )
    curves = {}
    for name, be in (
        ("numpy", he.get_backend("cpu")),
        ("device", _torch(device, device_streams=True)),
    ):
        pts = [p for s in range(3) for p in he.iter_run(spec, "layerwise_spectral", s, backend=be)]
        curves[name] = {
            n: (
                np.mean([p.mse for p in pts if p.n == n]),
                np.mean([p.recovered for p in pts if p.n == n]),
            )
            for n in (3000, 20000)
        }
    for n in (3000, 20000):
        assert abs(curves["numpy"][n][0] - curves["device"][n][0]) < 0.05
        assert abs(curves["numpy"][n][1] - curves["device"][n][1]) <= 1.0
    assert curves["device"][20000][0] < curves["device"][3000][0]


def test_unavailable_cuda_and_bad_combinations_fail_at_once(monkeypatch):
    with pytest.raises(he.SpecError) as err:
        he.parse_spec({"device": "cuda", "solver": {"backend": "numpy"}})
    assert err.value.errors[0]["field"] == "solver.backend"
    with pytest.raises(he.SpecError) as err:
        he.parse_spec({"device": "gpu"})
    assert err.value.errors[0]["field"] == "device"
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal below cannot happen here")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(he.DeviceError, match="no CUDA device"):
            he.get_backend(device)
    assert he.resolve_device("auto") == "cpu"
    monkeypatch.setattr(he._backend, "torch_available", lambda: False)
    with pytest.raises(he.DeviceError, match="needs PyTorch"):
        he.get_backend("cpu", backend="torch")


def test_auto_device_resolution(monkeypatch):
    """auto is the first CUDA device where one exists, and the CPU for backend numpy."""
    monkeypatch.setattr(he._backend, "cuda_devices", lambda: 2)
    assert he.resolve_device("auto") == "cuda:0"
    assert he.resolve_device("cuda") == "cuda:0"
    assert he.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(he.DeviceError, match="2 CUDA device"):
        he.resolve_device("cuda:2")
    be = he.get_backend("auto", backend="numpy")
    assert (be.device, be.array_backend) == ("cpu", "numpy")
    monkeypatch.setattr(he._backend, "cuda_devices", lambda: 0)
    be = he.get_backend("auto")
    assert (be.device, be.array_backend) == ("cpu", "numpy")


def test_no_gpu_device_files_means_no_cuda_without_importing_torch(monkeypatch, tmp_path):
    """On Linux without a GPU's device files, device auto resolves to the CPU without asking
    PyTorch (whose import costs 1-2 s); with one present, PyTorch is asked."""
    asked = []

    def torch_probe():
        asked.append(True)
        return False

    monkeypatch.setattr(he._backend, "torch_available", torch_probe)
    monkeypatch.setattr(he._backend.sys, "platform", "linux")
    monkeypatch.setattr(he._backend, "GPU_DEVICE_FILES", (str(tmp_path / "nvidiactl"),))
    assert he._backend.gpu_absent()
    assert he.cuda_devices() == 0 and he.resolve_device("auto") == "cpu"
    assert asked == []
    (tmp_path / "nvidiactl").touch()  # a GPU's device file: PyTorch decides
    assert not he._backend.gpu_absent()
    assert he.cuda_devices() == 0 and asked == [True]
    monkeypatch.setattr(he._backend.sys, "platform", "darwin")  # no device files to read
    assert not he._backend.gpu_absent()
