"""Teacher and data: the hierarchical target of MODEL.md section 1.

All randomness comes from an explicit ``numpy.random.Generator``. Training samples are drawn
from a stream so that, for one seed, the first n samples are the same whatever n is (NumPy's
generators fill arrays sequentially, so drawing ``m`` more rows continues the same sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._features import SQRT2, feature_dim, lift, vec_to_sym
from ._spec import ExperimentSpec, ModelSpec

# Samples per chunk when projecting inputs on directions.
_CHUNK = 2048


def power_law_weights(d1: int, gamma: float) -> np.ndarray:
    """|lambda_i| = Z i^-gamma with sum lambda_i^2 = 1, shape (d1,), decreasing."""
    w = np.arange(1, d1 + 1, dtype=np.float64) ** (-gamma)
    return w / np.sqrt(np.sum(w * w))


def activation(name: str, t: np.ndarray) -> np.ndarray:
    """The output function g: ``id``, ``tanh`` or ``quadratic`` (x^2 + x - 1)."""
    if name == "id":
        return t
    if name == "tanh":
        return np.tanh(t)
    if name == "quadratic":
        return t * t + t - 1.0
    raise ValueError(f"unknown activation {name!r}")


@dataclass(frozen=True)
class Teacher:
    """A random teacher.

    Attributes
    ----------
    model : ModelSpec
    directions : ndarray, shape (d1, D)
        Orthonormal first-layer directions ``A_i`` in feature coordinates.
    weights : ndarray, shape (d1,)
        Signed second-layer weights ``lambda_i``, ``|lambda_i|`` decreasing, unit norm.
    """

    model: ModelSpec
    directions: np.ndarray
    weights: np.ndarray
    matrices: np.ndarray | None = field(default=None, repr=False)  # (d1, d, d) for q = 2

    @property
    def d1(self) -> int:
        return self.weights.shape[0]

    def hidden(self, inputs: np.ndarray) -> np.ndarray:
        """First-layer features ``h = A F(x)`` (or ``A z``), shape (n, d1)."""
        if self.model.features == "gaussian":
            return inputs @ self.directions.T
        return project(inputs, self.directions, self.model.q, matrices=self.matrices)

    def h2(self, h: np.ndarray) -> np.ndarray:
        """``(1/sqrt 2) sum_i lambda_i (h_i^2 - 1)``, shape (n,)."""
        return ((h * h - 1.0) @ self.weights) / SQRT2

    def clean_labels(self, inputs: np.ndarray) -> np.ndarray:
        return activation(self.model.activation, self.h2(self.hidden(inputs)))


def project(x: np.ndarray, directions: np.ndarray, q: int, *, matrices=None) -> np.ndarray:
    """``<A_i, F(x)>`` for every row of x without forming F when q = 2.

    Parameters
    ----------
    x : ndarray, shape (n, d)
    directions : ndarray, shape (k, D)
    matrices : ndarray, shape (k, d, d), optional
        ``vec_to_sym(directions)`` if already known (q = 2).

    Returns
    -------
    ndarray, shape (n, k)
    """
    n, d = x.shape
    k = directions.shape[0]
    out = np.empty((n, k), dtype=x.dtype)
    if q == 2:
        g = vec_to_sym(directions, d) if matrices is None else matrices
        gcat = g.transpose(1, 0, 2).reshape(d, k * d)
        trace = np.trace(g, axis1=1, axis2=2)
        # chunked so the (chunk, k, d) intermediate stays small whatever n is
        for s in range(0, n, _CHUNK):
            xb = x[s : s + _CHUNK]
            xg = (xb @ gcat).reshape(xb.shape[0], k, d)
            out[s : s + _CHUNK] = (np.matmul(xg, xb[:, :, None])[:, :, 0] - trace) / SQRT2
        return out
    for s in range(0, n, _CHUNK):
        out[s : s + _CHUNK] = lift(x[s : s + _CHUNK], q) @ directions.T
    return out


def make_teacher(model: ModelSpec, *, rng: np.random.Generator) -> Teacher:
    """Draw a teacher: Haar-random orthonormal directions and random signs."""
    d1 = model.hidden_dim
    dim = feature_dim(model.d, model.q)
    gauss = rng.standard_normal((dim, d1))
    # QR of a Gaussian matrix with the sign fix gives Haar-distributed orthonormal columns
    qmat, r = np.linalg.qr(gauss)
    qmat *= np.sign(np.diag(r))
    directions = np.ascontiguousarray(qmat.T)
    signs = rng.choice(np.array([-1.0, 1.0]), size=d1)
    weights = signs * power_law_weights(d1, model.gamma)
    matrices = vec_to_sym(directions, model.d) if model.q == 2 else None
    for a in (directions, weights):
        a.setflags(write=False)
    return Teacher(model=model, directions=directions, weights=weights, matrices=matrices)


class SampleStream:
    """An endless i.i.d. sample stream whose prefixes are nested.

    ``take(n)`` returns the first n inputs and labels; asking for more continues the same
    random sequences, so ``take(m)`` for m < n is a prefix of ``take(n)``.
    """

    def __init__(self, teacher: Teacher, *, rng: np.random.Generator):
        self.teacher = teacher
        self._input_rng, self._noise_rng = rng.spawn(2)
        model = teacher.model
        self._width = feature_dim(model.d, model.q) if model.features == "gaussian" else model.d
        self._inputs = np.empty((0, self._width))
        self._labels = np.empty(0)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first n samples: inputs, shape (n, d) (or (n, D) in gaussian mode), labels (n,)."""
        have = self._inputs.shape[0]
        if n > have:
            # grow to exactly n: a sweep's few dozen concatenations cost less than
            # over-allocation would in memory (the resource estimate counts n rows)
            more = self._draw(n - have)
            self._inputs = np.concatenate([self._inputs, more[0]])
            self._labels = np.concatenate([self._labels, more[1]])
        return self._inputs[:n], self._labels[:n]

    def _draw(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        inputs = self._input_rng.standard_normal((m, self._width))
        labels = self.teacher.clean_labels(inputs)
        noise = self.teacher.model.noise_std
        if noise > 0:
            labels = labels + noise * self._noise_rng.standard_normal(m)
        return inputs, labels


@dataclass
class SeedData:
    """Everything one seed shares between methods: teacher, streams, test set, method streams."""

    seed_index: int
    teacher: Teacher
    train: SampleStream
    second: SampleStream  # the fresh batch for steps 3-4 with sample_split
    test_inputs: np.ndarray
    test_labels: np.ndarray
    method_seq: np.random.SeedSequence

    def method_rng(self, index: int) -> np.random.Generator:
        """Stream ``index`` of the methods' randomness (fixed per method, independent of
        which other methods run)."""
        seq = self.method_seq
        return np.random.default_rng(
            np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, index))
        )


def seed_rng(spec: ExperimentSpec, seed_index: int) -> np.random.Generator:
    """The generator of seed ``seed_index``: child ``seed_index`` of ``SeedSequence(seed)``.

    Equivalent to ``SeedSequence(seed).spawn(seeds)[seed_index]``, but computable for one seed
    alone (a worker running one seed must not depend on how many others exist).
    """
    seq = np.random.SeedSequence(spec.sweep.seed, spawn_key=(seed_index,))
    return np.random.default_rng(seq)


def make_seed_data(spec: ExperimentSpec, seed_index: int) -> SeedData:
    """Teacher, training streams and test set of one seed (same for every method)."""
    rng = seed_rng(spec, seed_index)
    teacher_rng, train_rng, second_rng, test_rng, method_rng = rng.spawn(5)
    teacher = make_teacher(spec.model, rng=teacher_rng)
    test = SampleStream(teacher, rng=test_rng)
    test_inputs, test_labels = test.take(spec.sweep.n_test)
    return SeedData(
        seed_index=seed_index,
        teacher=teacher,
        train=SampleStream(teacher, rng=train_rng),
        second=SampleStream(teacher, rng=second_rng),
        test_inputs=test_inputs,
        test_labels=test_labels,
        method_seq=method_rng.bit_generator.seed_seq,
    )


def standardise(y: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation used to standardise labels (std floored to avoid 0)."""
    mean = float(np.mean(y))
    std = float(np.std(y))
    return mean, std if std > 0 and math.isfinite(std) else 1.0
