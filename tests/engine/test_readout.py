"""The readout of the layer-wise spectral method: the paper's rescaling, the sample split."""

from __future__ import annotations

import numpy as np
import pytest

import hsl_engine as he
from hsl_engine import _spectral
from hsl_engine._data import make_seed_data


def _spec(method: dict, **model) -> he.ExperimentSpec:
    return he.parse_spec(
        {
            "model": {"d": 20, "d1": 4, "gamma": 1.0, "features": "gaussian", **model},
            "sweep": {"n_values": [210, 840], "seeds": 1},
            "methods": [{"name": "layerwise_spectral", **method}],
        }
    )


def test_readout_field_is_validated_and_hashed():
    fit = _spec({})
    rescale = _spec({"readout": "rescale"})
    assert fit.methods[0].readout == "fit"  # the default is unchanged
    assert fit.spec_hash != rescale.spec_hash
    with pytest.raises(he.SpecError) as err:
        _spec({"readout": "rescale", "readout_degree": 3})
    assert err.value.errors[0]["field"] == "methods.0.readout_degree"
    assert "rescale" in err.value.errors[0]["message"]
    with pytest.raises(he.SpecError) as err:
        _spec({"readout": "affine"})
    assert err.value.errors[0]["field"] == "methods.0.readout"


def test_full_spectrum_is_validated():
    with pytest.raises(he.SpecError) as err:
        he.parse_spec(
            {
                "methods": [{"name": "layerwise_spectral", "spectrum": "full"}],
                "solver": {"eigensolver": "krylov"},
            }
        )
    assert err.value.errors[0]["field"] == "methods.0.spectrum"
    with pytest.raises(he.SpecError, match="D must be <= 20000"):
        he.parse_spec(
            {"model": {"d": 300}, "methods": [{"name": "layerwise_spectral", "spectrum": "full"}]}
        )


def test_full_spectrum_stores_every_eigenvalue():
    spec = _spec({"spectrum": "full", "sample_split": False})
    # seed 0's points alone (no summary: the exact theory of the spec is not looked at)
    points = list(he.iter_run(spec, "layerwise_spectral", 0))
    eig = np.array(points[0].eigenvalues)
    assert eig.size == spec.model.feature_dim == 210
    assert np.all(np.diff(np.abs(eig)) <= 1e-12)  # by decreasing magnitude
    top = next(he.iter_run(_spec({"sample_split": False}), "layerwise_spectral", 0)).eigenvalues
    # the top-only run may use the Krylov solver (residual tolerance 1e-6)
    np.testing.assert_allclose(eig[: len(top)], top, rtol=5e-4)


@pytest.mark.parametrize("activation", ["id", "tanh"])
def test_rescale_readout_predicts_g_of_standardised_h2(activation):
    rng = np.random.default_rng(3)
    t = 3.0 + 2.0 * rng.standard_normal(1000)
    readout = _spectral.RescaleReadout(activation).fit_chunks(lambda: iter([(t, t)]))
    pred = readout.predict(np.array([3.0, 5.0, 1.0]))
    z = (np.array([3.0, 5.0, 1.0]) - t.mean()) / t.std()
    expected = z if activation == "id" else np.tanh(z)
    np.testing.assert_allclose(pred, expected, rtol=1e-12)


def test_rescale_readout_runs_and_learns(seed):
    spec = he.parse_spec(
        {
            "model": {"d": 20, "d1": 4, "gamma": 1.0, "features": "gaussian"},
            "sweep": {"n_values": [420, 6720], "seeds": 1, "seed": seed},
            "methods": [
                {"name": "layerwise_spectral", "sample_split": False, "readout": "rescale"}
            ],
        }
    )
    # the points alone (run_experiment's summary would add the exact theory of this Gaussian
    # spec, seconds of work this test does not look at)
    first, last = he.iter_run(spec, "layerwise_spectral", 0)
    assert last.mse < 0.6 < first.mse


def test_split_readout_uses_fresh_samples_not_a2s():
    spec = _spec({})
    data = make_seed_data(spec, 0)
    method = _spectral.LayerwiseSpectral(
        spec, spec.methods[0], data, he.get_backend("cpu"), rng=np.random.default_rng(0)
    )
    n = 300  # not a multiple of the chunk: the readout batch starts inside a chunk
    a2_x, a2_y = data.second.take(n)
    both_x, both_y = data.second.take(2 * n)
    batch = method.readout_batch(n)
    xs = np.concatenate([batch.block(c)[0] for c in range(batch.n_chunks())])
    ys = np.concatenate([batch.block(c)[1] for c in range(batch.n_chunks())])
    assert batch.n == n and xs.shape[0] == n
    np.testing.assert_array_equal(xs, both_x[n:])
    np.testing.assert_array_equal(ys, both_y[n:])
    assert not np.isin(ys, a2_y).any()  # none of A2's samples
    assert method.fit(n).n_train_used == 3 * n


def test_split_readout_is_not_inflated_before_recovery(monkeypatch, seed):
    # n = D, nothing recovered: a readout fitted on A2's own samples overshoots (measured
    # 1.011 against 0.996 with the fresh batch, 6 seeds at root seed 0)
    spec = he.parse_spec(
        {
            "model": {"d": 20, "d1": 4, "gamma": 1.0, "features": "gaussian"},
            "sweep": {"n_values": [210], "seeds": 6, "seed": seed},
        }
    )

    def mean_mse() -> float:  # the points only: no summary, no exact theory of the spec
        return float(
            np.mean([p.mse for s in range(6) for p in he.iter_run(spec, "layerwise_spectral", s)])
        )

    fresh = mean_mse()
    monkeypatch.setattr(
        _spectral.LayerwiseSpectral, "readout_batch", _spectral.LayerwiseSpectral.second_batch
    )
    in_sample = mean_mse()
    assert fresh < 1.005, fresh
    assert fresh < in_sample, (fresh, in_sample)
