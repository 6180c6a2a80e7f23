"""Teacher and data: the hierarchical target of docs/model.md section 1.

All randomness comes from an explicit ``numpy.random.Generator``. Training samples come from
chunk-keyed streams: chunk c of a stream is drawn from its own generator, so the first n
samples of a seed are the same whatever n is, and a pass over the data can regenerate them
instead of storing them (memory no longer grows with n).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
from array_api_compat import array_namespace, device

from ._backend import Backend, numpy_backend, single_threaded_blas
from ._features import SQRT2, feature_dim, lift, vec_to_sym
from ._simd import lifted_pass
from ._spec import ExperimentSpec, ModelSpec

# Samples per chunk when projecting inputs on directions.
_CHUNK = 2048
NUMPY = numpy_backend()


def _nbytes(a) -> int:
    return int(a.nbytes) if hasattr(a, "nbytes") else int(a.numel() * a.element_size())


def power_law_weights(d1: int, gamma: float) -> np.ndarray:
    """|lambda_i| = Z i^-gamma with sum lambda_i^2 = 1, shape (d1,), decreasing."""
    w = np.arange(1, d1 + 1, dtype=np.float64) ** (-gamma)
    return w / np.sqrt(np.sum(w * w))


def activation(name: str, t):
    """The output function g: ``id``, ``tanh`` or ``quadratic`` (x^2 + x - 1)."""
    if name == "id":
        return t
    if name == "tanh":
        return array_namespace(t).tanh(t)
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

    def to(self, backend: Backend) -> Teacher:
        """This teacher with its arrays on ``backend``'s device (itself for NumPy)."""
        if not backend.is_torch:
            return self
        conv = backend.asarray
        return Teacher(
            model=self.model,
            directions=conv(self.directions),
            weights=conv(self.weights),
            matrices=None if self.matrices is None else conv(self.matrices),
        )

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


def project(x, directions, q: int, *, matrices=None):
    """``<A_i, F(x)>`` for every row of x without forming F when q = 2.

    Parameters
    ----------
    x : ndarray, shape (n, d)
    directions : ndarray, shape (k, D)
    matrices : ndarray, shape (k, d, d), optional
        ``vec_to_sym(directions)`` if already known (q = 2).

    Returns
    -------
    array, shape (n, k), in the namespace and type of x
    """
    xp = array_namespace(x)
    n, d = x.shape
    k = directions.shape[0]
    if n == 0:
        return xp.zeros((0, k), dtype=x.dtype, device=device(x))
    parts = []
    step = _CHUNK
    if not isinstance(x, np.ndarray):  # a device: fewer, larger kernels (<= 64 MB each)
        step = max(_CHUNK, 2**23 // max(1, k * d))
    if q == 2 and isinstance(x, np.ndarray):
        # the first step of the lifted pass (hsl_engine._simd): 2 D flops per row and
        # direction, against 2 d^2 for the matrix form below
        kernel = lifted_pass(d, x.dtype)
        vc = kernel.vectors(directions)
        for s in range(0, n, step):
            out = kernel.dots(np.ascontiguousarray(x[s : s + step]), vc)
            parts.append(out)
    elif q == 2:
        g = vec_to_sym(directions, d) if matrices is None else matrices
        g = xp.astype(g, x.dtype, copy=False)
        gcat = xp.reshape(xp.permute_dims(g, (1, 0, 2)), (d, k * d))
        trace = xp.sum(xp.linalg.diagonal(g), axis=-1)
        # chunked so the (chunk, k, d) intermediate stays small whatever n is
        for s in range(0, n, step):
            xb = x[s : s + step]
            xg = xp.reshape(xb @ gcat, (xb.shape[0], k, d))
            quad = xp.matmul(xg, xb[:, :, None])[:, :, 0]
            parts.append((quad - trace) / SQRT2)
    else:
        dirs_t = xp.astype(directions, x.dtype, copy=False).T
        for s in range(0, n, step):
            parts.append(lift(x[s : s + step], q) @ dirs_t)
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


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


class LabelView:
    """The labels of a `SampleView`, read by slices."""

    def __init__(self, view: SampleView):
        self.view = view
        self.shape = (view.n,)

    def __len__(self) -> int:
        return self.view.n

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(self.view.n)
            if step != 1:
                raise IndexError("LabelView supports contiguous slices only")
            return self.view.read(a, b)[1]
        i = int(key)
        i = i + self.view.n if i < 0 else i
        if not 0 <= i < self.view.n:
            raise IndexError(i)
        return float(self.view.read(i, i + 1)[1][0])


def chunk_rows(width: int, *, device: bool = False) -> int:
    """Samples per stream chunk for inputs of ``width`` floats: a power of two, about 2 MB
    (NumPy streams: cache-sized work for the CPU threads) or about 64 MB (device streams:
    few, large kernels on a GPU).

    The chunk is the unit of generation: a chunk's samples are a function of (stream, chunk
    index) alone, so every consumer sees the same numbers whatever n, storage or thread count.
    """
    floats, lo, hi = (2**23, 1024, 2**20) if device else (2**18, 64, 4096)
    rows = 2 ** int(math.floor(math.log2(max(1.0, floats / width))))
    return int(min(hi, max(lo, rows)))


class SampleStream:
    """An endless i.i.d. sample stream of chunk-keyed blocks whose prefixes are nested.

    Chunk ``c`` holds samples ``c * rows .. (c + 1) * rows - 1`` and is drawn from its own
    generator, ``SeedSequence(entropy, spawn_key=(*key, c))``: inputs first, then label noise.
    Labels are computed on the whole chunk, so a sample's inputs and label are a function of
    (stream, index) alone, bit for bit, whatever n, chunking, storage or thread count.

    Parameters
    ----------
    teacher : Teacher
    rng : numpy.random.Generator
        Only its seed sequence is used (the stream's key).
    dtype : numpy dtype, optional
        Inputs are handed out in this type (labels are always float64, computed from the
        float64 inputs before rounding), stored or regenerated alike.
    store_rows : int, optional
        Keep up to this many samples in memory once drawn; samples past it are regenerated at
        every pass (streaming). 0 streams everything.
    label_rows : int, optional
        Beyond ``store_rows``, keep the labels (8 bytes a sample) of up to this many more
        samples: regenerating those redraws their inputs only, not the teacher's labels, which
        cost ``2 d1 d^2`` flops a sample for q = 2 against ``d`` Gaussian draws.
    backend : Backend, optional
        Where chunks live (default: NumPy). With PyTorch, chunks are tensors on its device:
        drawn by NumPy and moved there (the same samples as NumPy's), or, with
        ``backend.device_streams``, drawn on the device by its own generator keyed by the
        same ``(stream, chunk)`` seed sequence (other numbers, the same law).
    """

    def __init__(
        self,
        teacher: Teacher,
        *,
        rng: np.random.Generator,
        dtype: np.dtype | type = np.float64,
        store_rows: int = 1 << 62,
        label_rows: int = 0,
        backend: Backend | None = None,
    ):
        self.teacher = teacher
        self.backend = backend or NUMPY
        self._device_teacher = teacher.to(self.backend) if self.backend.device_streams else None
        seq = rng.bit_generator.seed_seq
        self._entropy, self._key = seq.entropy, tuple(seq.spawn_key)
        model = teacher.model
        self.width = feature_dim(model.d, model.q) if model.features == "gaussian" else model.d
        self.rows = chunk_rows(self.width, device=self.backend.device_streams)
        self.dtype = np.dtype(dtype)
        self.store_rows = int(store_rows)
        self.label_rows = int(label_rows)
        self._stored: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # chunks within store_rows
        self._labels: dict[int, object] = {}  # labels of chunks past store_rows (label_rows)
        self._lock = threading.Lock()
        self.generated = 0  # chunks drawn so far (regenerations included)
        self.labelled = 0  # chunks whose labels were computed from the teacher

    def n_chunks(self, n: int) -> int:
        return -(-n // self.rows)

    def chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``c``: inputs, shape (rows, width) in ``dtype``, and labels, shape (rows,)."""
        hit = self._stored.get(c)
        if hit is not None:
            return hit
        x, y = self._draw(c)
        if (c + 1) * self.rows <= self.store_rows:
            with self._lock:
                self._stored.setdefault(c, (x, y))
        return x, y

    @property
    def stored_bytes(self) -> int:
        kept = sum(_nbytes(x) + _nbytes(y) for x, y in self._stored.values())
        return kept + sum(_nbytes(y) for y in self._labels.values())

    def _draw(self, c: int):
        seq = np.random.SeedSequence(self._entropy, spawn_key=(*self._key, c))
        with self._lock:
            self.generated += 1
        labels = self._labels.get(c)
        end = (c + 1) * self.rows
        keep_labels = labels is None and self.store_rows < end <= self.store_rows + self.label_rows
        noise = self.teacher.model.noise_std
        be = self.backend
        if be.device_streams:
            gen = be.generator(seq)
            inputs = be.standard_normal(gen, (self.rows, self.width))
            if labels is None:
                labels = self._device_teacher.clean_labels(inputs)
                if noise > 0:  # drawn after the inputs, from the same generator
                    labels = labels + noise * be.standard_normal(gen, (self.rows,))
                self._labelled(c, labels, keep_labels)
            return be.xp.astype(inputs, be.dtype(self.dtype), copy=False), labels
        gen = np.random.default_rng(seq)
        inputs = gen.standard_normal((self.rows, self.width))
        if labels is None:
            with single_threaded_blas():  # labels bit for bit, whatever thread reads the chunk
                labels = self.teacher.clean_labels(inputs)
            if noise > 0:
                labels = labels + noise * gen.standard_normal(self.rows)
            if be.is_torch:
                labels = be.asarray(labels)
            else:
                labels.setflags(write=False)
            self._labelled(c, labels, keep_labels)
        x = inputs if self.dtype == np.float64 else inputs.astype(self.dtype)
        if be.is_torch:
            return be.asarray(x), labels
        x.setflags(write=False)
        return x, labels

    def _labelled(self, c: int, labels, keep: bool) -> None:
        with self._lock:
            self.labelled += 1
            if keep:
                self._labels.setdefault(c, labels)

    def blocks(self, n: int, start: int = 0):
        """``(s, e, x, y)`` for consecutive chunk-aligned blocks covering samples start..n-1."""
        for c in range(start // self.rows, self.n_chunks(n)):
            s = c * self.rows
            e = min(s + self.rows, n)
            x, y = self.chunk(c)
            lo = max(start, s) - s
            yield s + lo, e, x[lo : e - s], y[lo : e - s]

    def view(self, n: int) -> SampleView:
        return SampleView(self, n)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first n samples materialised: inputs, shape (n, width), labels, shape (n,)."""
        return self.view(n).materialise()


class SampleView:
    """The first ``n`` samples of a stream, read block by block (never materialised unless
    asked). Supports ``len``, ``shape`` and slicing ``view[a:b]`` / ``view[i]`` of the
    inputs (as float64), which is what the kernel baselines need."""

    def __init__(self, stream: SampleStream, n: int):
        self.stream = stream
        self.n = int(n)
        self.shape = (self.n, stream.width)
        self.dtype = stream.dtype
        self.rows = stream.rows

    def __len__(self) -> int:
        return self.n

    def n_chunks(self) -> int:
        return self.stream.n_chunks(self.n)

    @property
    def stored(self) -> bool:
        """Whether all of the view's samples are kept in memory once drawn."""
        return self.stream.n_chunks(self.n) * self.rows <= self.stream.store_rows

    def block(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk c truncated to the view: inputs (in the stream's dtype) and labels."""
        x, y = self.stream.chunk(c)
        stop = self.n - c * self.rows
        return (x, y) if stop >= self.rows else (x[:stop], y[:stop])

    def blocks(self, start: int = 0):
        return self.stream.blocks(self.n, start)

    @property
    def y(self) -> LabelView:
        """The labels as a lazily read (n,) array (slices ``y[a:b]`` and ``y[i]``)."""
        return LabelView(self)

    def materialise(self):
        """All n samples as two arrays of the stream's backend (inputs in its dtype)."""
        return self._gather(0, self.n, self.stream.dtype)

    def read(self, a: int, b: int):
        """Inputs (float64) and labels of samples a..b-1, arrays of the stream's backend."""
        return self._gather(max(0, a), min(b, self.n), np.float64)

    def _gather(self, a: int, b: int, dtype):
        be = self.stream.backend
        xs, ys = [], []
        for _, _, x, y in self.stream.blocks(b, a):
            xs.append(x)
            ys.append(y)
        if not xs:
            return be.zeros((0, self.stream.width), dtype), be.zeros((0,))
        x = xs[0] if len(xs) == 1 else be.xp.concat(xs, axis=0)
        y = ys[0] if len(ys) == 1 else be.xp.concat(ys, axis=0)
        return be.xp.astype(x, be.dtype(dtype), copy=False), y

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(self.n)
            if step != 1:
                raise IndexError("SampleView supports contiguous slices only")
            return self.read(a, b)[0]
        i = int(key)
        i = i + self.n if i < 0 else i
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.read(i, i + 1)[0][0]


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


# Memory for samples kept in memory per seed (train and second batch together) when the
# caller gives no budget: past it, samples are regenerated at every pass.
SAMPLE_BUDGET_BYTES = 2 * 2**30


def store_rows(spec: ExperimentSpec, budget_bytes: float) -> int:
    """Samples per stream kept in memory under ``budget_bytes`` (train and second batch
    share it when some method splits samples)."""
    m = spec.model
    width = feature_dim(m.d, m.q) if m.features == "gaussian" else m.d
    per_sample = width * np.dtype(spec.solver.dtype).itemsize + 8
    split = any(getattr(meth, "sample_split", False) for meth in spec.methods)
    rows = budget_bytes / (per_sample * (2 if split else 1))
    return int(min(rows, 1 << 62))


# Share of the sample budget that keeps the labels of samples past the stored ones (their
# inputs are regenerated at every pass, their labels computed once)
LABEL_SHARE = 0.25


def budget_rows(spec: ExperimentSpec, budget_bytes: float) -> tuple[int, int]:
    """``(store_rows, label_rows)`` per stream under ``budget_bytes``: samples kept whole in
    ``1 - LABEL_SHARE`` of it, the labels of the next ones in the rest."""
    split = any(getattr(meth, "sample_split", False) for meth in spec.methods)
    labels = LABEL_SHARE * budget_bytes / (8.0 * (2 if split else 1))
    return store_rows(spec, (1.0 - LABEL_SHARE) * budget_bytes), int(min(labels, 1 << 62))


def make_seed_data(
    spec: ExperimentSpec,
    seed_index: int,
    *,
    sample_budget_bytes: float | None = None,
    backend: Backend | None = None,
) -> SeedData:
    """Teacher, training streams and test set of one seed (same for every method).

    Training samples are kept in memory up to ``sample_budget_bytes`` (default
    `SAMPLE_BUDGET_BYTES`) and regenerated beyond; the numbers do not depend on it. With a
    PyTorch ``backend`` the streams and the test set live on its device; the teacher and the
    test set are drawn by NumPy on every backend (the same for all devices).
    """
    backend = backend or NUMPY
    rng = seed_rng(spec, seed_index)
    teacher_rng, train_rng, second_rng, test_rng, method_rng = rng.spawn(5)
    teacher = make_teacher(spec.model, rng=teacher_rng)
    test = SampleStream(teacher, rng=test_rng)
    test_inputs, test_labels = test.take(spec.sweep.n_test)
    budget = SAMPLE_BUDGET_BYTES if sample_budget_bytes is None else sample_budget_bytes
    keep, labels = budget_rows(spec, budget)
    dtype = np.dtype(spec.solver.dtype)
    kw = {"dtype": dtype, "store_rows": keep, "label_rows": labels, "backend": backend}
    return SeedData(
        seed_index=seed_index,
        teacher=teacher,
        train=SampleStream(teacher, rng=train_rng, **kw),
        second=SampleStream(teacher, rng=second_rng, **kw),
        test_inputs=backend.asarray(test_inputs),
        test_labels=backend.asarray(test_labels),
        method_seq=method_rng.bit_generator.seed_seq,
    )
