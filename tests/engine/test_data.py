import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import hsl_engine as he
from hsl_engine._data import SampleStream, power_law_weights


def spec_for(**model):
    return he.parse_spec({"model": model, "sweep": {"n_values": [100]}})


@pytest.mark.parametrize("gamma", [0.0, 0.4, 1.0])
def test_weights_normalised_and_decreasing(gamma):
    w = power_law_weights(12, gamma)
    assert_allclose(np.sum(w**2), 1.0, rtol=1e-14)
    assert np.all(np.diff(w) <= 1e-15)
    assert_allclose(w[0] / w[-1], 12.0**gamma, rtol=1e-12)


@pytest.mark.parametrize("q", [2, 3])
def test_teacher_directions_orthonormal_signed_weights(seed, q):
    spec = spec_for(d=7, q=q, d1=5, gamma=0.7)
    t = he.make_teacher(spec.model, rng=np.random.default_rng(seed))
    assert t.directions.shape == (5, he.feature_dim(7, q))
    assert_allclose(t.directions @ t.directions.T, np.eye(5), atol=1e-13)
    assert_allclose(np.abs(t.weights), power_law_weights(5, 0.7), rtol=1e-14)
    assert set(np.sign(t.weights)) <= {-1.0, 1.0}


@pytest.mark.parametrize(("q", "features"), [(2, "hermite"), (3, "hermite"), (2, "gaussian")])
def test_hidden_features_unit_variance_uncorrelated(seed, q, features):
    # h = A F(x) with orthonormal rows: covariance I exactly in expectation. The empirical
    # covariance of n samples has entry-wise std <= sqrt(E[h_i^2 h_j^2]/n) <~ sqrt(15/n) for
    # Hermite chaos of degree <= 3; 6 sigma at n = 200k is 0.05. h2 has unit variance
    # (sum lambda^2 = 1) only when h is Gaussian (Gaussian mode, or Hermite features as
    # d grows); at small d the Hermite h_i have excess kurtosis, so there only its mean is
    # checked.
    d = 6 if q == 2 else 4
    spec = spec_for(d=d, q=q, d1=4, gamma=0.5, features=features)
    t = he.make_teacher(spec.model, rng=np.random.default_rng(seed))
    stream = SampleStream(t, rng=np.random.default_rng(seed + 1))
    n = 200_000
    inputs, y = stream.take(n)
    h = t.hidden(inputs)
    assert_allclose(np.cov(h.T), np.eye(4), atol=6 * math.sqrt(15 / n))
    assert_allclose(h.mean(axis=0), 0, atol=6 * math.sqrt(1 / n))
    h2 = t.h2(h)
    assert abs(h2.mean()) < 6 * math.sqrt(np.var(h2) / n)
    if features == "gaussian":
        assert_allclose(np.var(h2), 1.0, atol=0.1)
    assert_allclose(y, t.h2(h), rtol=1e-12)  # id activation, no noise


def test_nested_samples_and_fixed_test_set(seed):
    spec = he.parse_spec(
        {"model": {"d": 8, "noise_std": 0.3}, "sweep": {"n_values": [50, 500], "seed": seed}}
    )
    a = he.make_seed_data(spec, 1)
    b = he.make_seed_data(spec, 1)
    x_small, y_small = a.train.take(37)
    x_big, y_big = b.train.take(1000)
    x_mid, y_mid = a.train.take(400)  # extends the stream that already gave 37 rows
    assert_array_equal(x_small, x_big[:37])
    assert_array_equal(y_small, y_big[:37])
    assert_array_equal(x_mid, x_big[:400])
    assert_array_equal(y_mid, y_big[:400])
    assert_array_equal(a.test_inputs, b.test_inputs)
    assert_array_equal(a.teacher.directions, b.teacher.directions)
    other = he.make_seed_data(spec, 2)
    assert not np.array_equal(other.train.take(37)[0], x_small)
    assert not np.array_equal(a.second.take(37)[0], x_small)  # sample split: fresh batch


def test_seed_streams_are_spawned_not_offset():
    spec0 = he.parse_spec({"sweep": {"n_values": [50], "seed": 0}})
    spec1 = he.parse_spec({"sweep": {"n_values": [50], "seed": 1}})
    # seed i of root 0 must not equal seed 0 of root i (as seed + i would give)
    a = he.seed_rng(spec0, 1).standard_normal(5)
    b = he.seed_rng(spec1, 0).standard_normal(5)
    assert not np.allclose(a, b)
    expected = np.random.default_rng(np.random.SeedSequence(0).spawn(3)[1]).standard_normal(5)
    assert_array_equal(a, expected)


@pytest.mark.parametrize("activation", ["tanh", "quadratic"])
def test_nonlinear_labels(seed, activation):
    spec = spec_for(d=6, activation=activation)
    t = he.make_teacher(spec.model, rng=np.random.default_rng(seed))
    inputs, y = SampleStream(t, rng=np.random.default_rng(seed)).take(1000)
    h2 = t.h2(t.hidden(inputs))
    expected = np.tanh(h2) if activation == "tanh" else h2**2 + h2 - 1
    assert_allclose(y, expected, rtol=1e-12)
