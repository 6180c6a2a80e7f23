"""What a spec will cost, computed in log space before anything is allocated.

The figures are upper-bound style estimates of one run's peak memory (a worker executes one
(method, seed) run at a time) and of the whole experiment's floating-point work. They use
only logarithms and floats, so ``d = 10**6`` or ``n = 10**9`` never form a huge integer.

Memory no longer grows with n beyond the sample budget: training samples are kept in memory
up to ``sample_budget_bytes`` and regenerated at every pass beyond it (`hsl_engine._data`),
which the work estimate counts as extra passes of sample generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._data import LABEL_SHARE, SAMPLE_BUDGET_BYTES, budget_rows
from ._eigen import CPU_EXPAND, DEFAULT_EXPAND, DEFAULT_MAX_BASIS
from ._operator import flops_per_vector
from ._spec import ExperimentSpec, parse_spec

# The interpreter, NumPy/SciPy and their buffers (~125 MB resident after importing the
# engine), and Numba with LLVM once the compiled kernels are loaded (~145 MB more, ~110 MB
# of it the shared library's pages, shared between worker processes): measured 268 MB
BASELINE_BYTES = 300e6
# Operator vectors per n of a warm-started Krylov solve, in blocks of d1 + 14 (reported +
# guard) vectors: measured 4.3-6.4 blocks' worth on the fig2-cpu sweep (d = 60) and 4.0-8.4
# (6.3 on average, 5.5-6.5 at the largest n) on fig2-d120-cpu; 8 bounds the sweeps' totals.
KRYLOV_BLOCKS = 8.0
# chunks in flight, their GEMM intermediates and the allocator's per-thread arenas
# (measured: a streamed d = 40 run at n = 4e6 peaks at ~125 MiB in all)
WORKING_BYTES = 64e6
# h_hat of the second batch is kept between the passes of steps 3-4 up to the first size
# while the samples are stored, and up to the second while they stream (then the passes
# regenerate the samples and project them again, so memory stays flat in n)
# On a GPU (device streams): 64 MB chunks drawn in float64 and kept in the solver's type,
# and the operator's sub-block intermediates of up to 128 MB each
WORKING_BYTES_DEVICE = 1.5e9
HIDDEN_CACHE_BYTES = 256 * 2**20
HIDDEN_CACHE_STREAMED_BYTES = 32 * 2**20

# The cost model of the ETA and of the time quotes: a point's seconds on the reference
# machine (2 cores) are a fixed cost plus its work at the rate its kind of work sustains,
# whole point included (operator, sample generation, second layer, readout, test metrics).
# The rates differ several-fold between kinds: the q = 2 Hermite operator (the explicit-SIMD
# lifted pass on the CPU) is counted in the matrix form's 4 n d^2 flops per vector and does
# about half that, the explicit-feature operator (Gaussian features, q = 3) runs thin GEMMs of
# k columns over D-wide features. A rate is of the work as counted here, which takes
# `KRYLOV_BLOCKS` blocks of vectors per n where the solver needs 4-8, so the q = 2 rates exceed
# the operator's own GFLOP/s. Fitted by `fit_rates` (`scripts/record-runs --fit`, relative
# least squares, t = a + w / rate) to the runs of the CPU presets in
# tests/engine/data/recorded_runs.json (engine 0.11.0, the 2-core development machine of
# 2026-12-06 03:39-03:47 UTC, an Intel Xeon (Emerald Rapids) this time, from a 1-minute load
# of 1.0-2.0, its own runs included): fig2-cpu's q = 2 Krylov in float64 162.7 GFLOP/s and its
# RBF kernel 51.6 (a = 0), fig2-d120-cpu's q = 2 Krylov in float32 432.7, fig3-cpu's
# explicit-feature Krylov 13.2, fig4-cpu's dense 38.5; the fixed costs a = 0.03-0.08 s at
# D = 465 and 1830, 0.42 s at D = 7260 (fig2-d120-cpu), so the model's fixed cost grows with
# D (`point_overhead_seconds`; a fixed 0.1 s for all made fig2-cpu's first ETA 0.45x the
# truth once its first point took 0.05 s). The host differs between recordings, and so do
# the rates: engine 0.10.0's recording on an AMD EPYC (Zen 4) host (01:44-01:52 the same
# morning) fitted q2 369 and 174, explicit 21.1, dense 53.5, kernel 61.8; engine 0.9.0's on a
# slow evening (2026-12-05 22:52-23:03) q2 260 and 121, explicit 13.2, dense 40.8, kernel
# 59.3; 0.8.0's (16:52-17:01) q2 306 and 137, explicit 20, dense 53, kernel 60. Only
# measurements in one host state compare engines (README "Performance"). With these, the
# first ETA of each recording is 0.85-1.72x the truth, and from a quarter of the points on
# 0.86-1.50x.
# (Engine 0.7.0's matrix-form operator, recorded on the morning of 2026-12-05: 88.8, 52.8,
# 203.3, 15.2, 37.1.)
# Explicit and dense in float32: twice float64 (the GEMM peaks' ratio), not measured.
# A point's fixed cost at small D; it grows as (D / 1830)^1.3 (`point_overhead_seconds`)
POINT_OVERHEAD_SECONDS = 0.03
POINT_OVERHEAD_AT_1830 = 0.04


def point_overhead_seconds(dim: float) -> float:
    """A point's fixed cost on the reference machine, beyond its counted work: fitted to the
    recorded runs' fixed costs (0.02-0.08 s at D = 465 and 1830, 0.23-0.42 s at D = 7260 in
    the recordings of engines 0.10.0 and 0.11.0)."""
    return POINT_OVERHEAD_SECONDS + POINT_OVERHEAD_AT_1830 * (dim / 1830.0) ** 1.3


REFERENCE_RATES = {  # (kind, dtype) -> FLOP/s of a whole point
    ("q2", "float32"): 433e9,
    ("q2", "float64"): 163e9,
    ("explicit", "float32"): 26.4e9,
    ("explicit", "float64"): 13.2e9,
    ("dense", "float32"): 77e9,
    ("dense", "float64"): 38.5e9,
    ("kernel", "float32"): 51.6e9,
    ("kernel", "float64"): 51.6e9,
}


@dataclass(frozen=True)
class ResourceEstimate:
    """Estimated cost of a spec.

    Attributes
    ----------
    feature_dim : float
        D = C(d + q - 1, q) (a float: may exceed any sensible integer).
    max_n : float
        Largest training sample size of the sweep.
    peak_bytes : float
        Peak memory of the largest run (one method, one seed).
    flops : float
        Floating-point operations of the whole experiment.
    points : int
        Number of (method, seed, n) points.
    streamed : bool
        Whether some training samples are regenerated per pass (beyond the sample budget).
    point_flops : dict
        Method name -> the work of each of its points of one seed, in ascending n (the
        order of ``spec.sample_sizes()``); ``flops`` is their sum times the seeds.
    point_seconds : dict
        Method name -> the estimated seconds of each of its points of one seed on the
        reference machine (2 CPU cores; `point_overhead_seconds(D)` plus the work at the rate of
        its kind, `REFERENCE_RATES`).
    seconds : float
        Estimated seconds of the whole experiment on the reference machine: the sum of
        ``point_seconds`` times the seeds.
    kinds : dict
        Method name -> the kind of its work, which sets its rate in `REFERENCE_RATES`
        (``q2``, ``explicit``, ``dense`` or ``kernel``).
    """

    feature_dim: float
    max_n: float
    peak_bytes: float
    flops: float
    points: int
    streamed: bool = False
    point_flops: dict[str, list[float]] = field(default_factory=dict, repr=False, compare=False)
    point_seconds: dict[str, list[float]] = field(default_factory=dict, repr=False, compare=False)
    seconds: float = 0.0
    kinds: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def log10_peak_bytes(self) -> float:
        return math.log10(self.peak_bytes) if self.peak_bytes > 0 else -math.inf

    @property
    def log10_flops(self) -> float:
        return math.log10(self.flops) if self.flops > 0 else -math.inf


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def krylov_vectors(d1: float) -> float:
    """Estimated operator vectors per n of a warm-started solve (`KRYLOV_BLOCKS` blocks)."""
    return KRYLOV_BLOCKS * (d1 + 14.0)


# The dense solver's two D x D float64 sums must fit in this
DENSE_SUM_BYTES = 2**30


def label_clipped(spec: ExperimentSpec) -> bool:
    """Whether the spec's layer-wise spectral method clips its labels (``label_clip``)."""
    return any(getattr(meth, "label_clip", None) is not None for meth in spec.methods)


def dense_flops(ns, dim: float, clipped: bool) -> list[float]:
    """The dense solver's accumulation work per n (ascending): each new sample once, 4 D^2
    flops (two sums, `DenseAccumulator`); with clipped labels all n samples at each n, 2 D^2
    flops each (one sum, `MomentOperator.dense`)."""
    out, previous = [], 0.0
    for n in ns:
        out.append(2.0 * n * dim * dim if clipped else 4.0 * (n - previous) * dim * dim)
        previous = n
    return out


def choose_solver(spec: ExperimentSpec) -> str:
    """The ``auto`` rule, fixed per experiment (a sweep keeps one solver, so warm starts and
    the dense accumulation carry over): dense when its two D x D float64 sums fit in
    `DENSE_SUM_BYTES` and accumulating every sample once (4 n_max D^2 flops for the sweep)
    costs less than the Krylov solves (`krylov_vectors` vectors per n); krylov otherwise.
    With clipped labels (``label_clip``) the dense matrix is rebuilt at every n (2 n D^2
    flops each, `dense_flops`), and that sum is what the Krylov solves are weighed against."""
    choice = spec.solver.eigensolver
    if choice != "auto":
        return choice
    if any(getattr(meth, "spectrum", "top") == "full" for meth in spec.methods):
        return "dense"  # every eigenvalue: a dense eigendecomposition
    m = spec.model
    dim = m.feature_dim
    if 2 * 8 * dim * dim > DENSE_SUM_BYTES:
        return "krylov"
    ns = [n for n, _ in spec.sample_sizes()]
    dense = sum(dense_flops(ns, dim, label_clipped(spec)))
    per_n = krylov_vectors(m.hidden_dim)
    krylov = sum(per_n * flops_per_vector(n, m.d, dim, m.q, m.features) for n in ns)
    return "dense" if dense < krylov else "krylov"


def pass_width(spec: ExperimentSpec, device: str) -> int:
    """Vectors per Krylov pass: 4 on the CPU (fewer vectors in all) while the sweep's samples
    fit the default sample budget, 8 where every pass would regenerate them (wide passes
    amortise that) and on a GPU (wide kernels).

    Decided by the spec and the kind of device alone, under the default budget
    `SAMPLE_BUDGET_BYTES` rather than a deployment's own, so the numbers of a spec never
    depend on how much memory a run may keep (stored and regenerated samples agree).
    """
    if device.startswith("cuda"):
        return DEFAULT_EXPAND
    keep, _ = budget_rows(spec, SAMPLE_BUDGET_BYTES)
    n_max = max(n for n, _ in spec.sample_sizes())
    return CPU_EXPAND if n_max <= keep else DEFAULT_EXPAND


def estimate_resources(
    spec: ExperimentSpec,
    *,
    sample_budget_bytes: float | None = None,
    device: str | None = None,
) -> ResourceEstimate:
    """Peak memory of the largest run and the work of the whole experiment.

    ``device`` (default: the spec's) selects the working set: a CUDA device draws samples in
    64 MB chunks and runs larger sub-blocks (`WORKING_BYTES_DEVICE`); ``peak_bytes`` is then
    the device's memory (samples, basis and working set live there).
    """
    device = spec.device if device is None else device
    working = WORKING_BYTES_DEVICE if device.startswith("cuda") else WORKING_BYTES
    m = spec.model
    budget = SAMPLE_BUDGET_BYTES if sample_budget_bytes is None else sample_budget_bytes
    log_dim = m.log_feature_dim
    dim = _exp(log_dim)
    d = float(m.d)
    d1 = float(m.hidden_dim)
    k = d1 + 14.0
    itemsize = 4.0 if spec.solver.dtype == "float32" else 8.0
    log_d = math.log(d)
    if spec.sweep.alphas is not None:
        ns = [_exp(a * log_d) for a in spec.sweep.alphas]
    else:
        ns = [float(n) for n in spec.sweep.n_values or []]
    ns.sort()  # the order the points run in
    n_max = max(ns)
    n_test = float(spec.sweep.n_test)
    width = dim if m.features == "gaussian" else d  # floats per sample
    q2 = m.features == "hermite" and m.q == 2
    per_vector_per_sample = 4.0 * d * d if q2 else 4.0 * dim
    # regenerating one sample: its Gaussian inputs (~20 flops each) and its label (d1
    # projections of 2 d^2 flops for q = 2, a lift and d1 dot products otherwise)
    gen_per_sample = 20.0 * width + (2.0 * d1 * d * d if q2 else 2.0 * d1 * dim + 3.0 * dim)
    split = any(getattr(meth, "sample_split", False) for meth in spec.methods)
    streams = 2.0 if split else 1.0
    per_sample_bytes = width * itemsize + 8.0
    # samples kept whole in 1 - LABEL_SHARE of the budget, the labels of the next ones in the
    # rest (`hsl_engine._data.budget_rows`): those regenerate their inputs only
    stored_rows = (1.0 - LABEL_SHARE) * budget / (per_sample_bytes * streams)
    label_rows = LABEL_SHARE * budget / (8.0 * streams)
    streamed = n_max > stored_rows
    stored = streams * min(n_max, stored_rows) * per_sample_bytes
    stored += streams * min(max(0.0, n_max - stored_rows), label_rows) * 8.0

    def regen_flops(n: float) -> float:
        """Regeneration work of one pass over n samples beyond the stored ones."""
        relabelled = max(0.0, n - stored_rows - label_rows)
        return max(0.0, n - stored_rows) * 20.0 * width + relabelled * (
            gen_per_sample - 20.0 * width
        )

    test = 8.0 * width * n_test + 8.0 * d1 * n_test

    peak = 0.0
    # the work of each point of one seed: method -> flops per n, ascending n
    work: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    kinds: dict[str, str] = {}
    dtype = spec.solver.dtype
    for method in spec.methods:
        kind = "kernel"
        run_peak = stored + test + working
        per_n = [0.0] * len(ns)
        if method.name in ("layerwise_spectral", "latent_rbf"):
            dense_bytes = 6.0 * 8.0 * dim * dim  # two sums, the matrix, eigensolver copies
            # (choose_solver needs the exact D, which is only formed when it is modest)
            solver = spec.solver.eigensolver
            if solver == "auto":
                solver = choose_solver(spec) if log_dim < math.log(1e6) else "krylov"
            dense = solver == "dense"
            kind = "dense" if dense else ("q2" if q2 else "explicit")
            max_basis = min(DEFAULT_MAX_BASIS, max(2 * k, 256 * 2**20 / (8 * dim)))
            basis = 2.0 * 8.0 * dim * (max_basis + DEFAULT_EXPAND) + 8.0 * dim * k * 4
            run_peak += max(dense_bytes if dense else 0.0, basis)
            cache = HIDDEN_CACHE_STREAMED_BYTES if streamed else HIDDEN_CACHE_BYTES
            run_peak += min(cache, 8.0 * (d1 + 1) * n_max)
            vectors = krylov_vectors(d1)
            # (auto may run on the CPU: its width, the narrower one)
            expand = pass_width(spec, device)
            passes = vectors / expand + 1.0
            # latent_rbf's first layer never clips its labels
            clipped = getattr(method, "label_clip", None) is not None
            accumulate = dense_flops(ns, dim, clipped)
            for i, n in enumerate(ns):
                regen = regen_flops(n)
                # label statistics and the passes of steps 3-4 over the second batch
                per_n[i] += 3.0 * 2.0 * n * d1 * (d * d if q2 else dim) + 4.0 * regen
                if getattr(method, "sample_split", False):
                    # the readout batch: n more samples, drawn, labelled and projected
                    per_n[i] += 2.0 * 2.0 * n * d1 * (d * d if q2 else dim) + 2.0 * regen
                per_n[i] += 2.0 * n_test * d1 * (d * d if q2 else dim)
                if clipped:  # the clipped labels' mean: one more pass over the labels
                    per_n[i] += regen
                if dense:  # the samples accumulated (`dense_flops`), then a dense eigensolve
                    per_n[i] += accumulate[i] + 10.0 * dim**3
                else:
                    per_n[i] += vectors * n * per_vector_per_sample + passes * regen
        if method.name in ("kernel_rbf", "kernel_poly", "latent_rbf"):
            lm = float(method.n_landmarks)
            kernel_width = d1 if method.name == "latent_rbf" else width
            run_peak += 8.0 * (4.0 * lm * lm + 2.0 * 4096.0 * lm)
            # the kernels on inputs add the new samples of nested sizes; latent_rbf refits
            # on all n samples at each size (new features)
            nested = method.name != "latent_rbf"
            # kernels trained on at most max_train samples (the authors' cap)
            cap = float(method.max_train) if method.max_train is not None else math.inf
            rows = 0.0
            for i, n in enumerate(ns):
                used = min(n, cap)
                new_rows = used - (min(ns[i - 1], cap) if i else 0.0) if nested else used
                per_n[i] += 2.0 * new_rows * lm * (kernel_width + lm)
                per_n[i] += 2.0 * n_test * lm * (kernel_width + 1)
                per_n[i] += regen_flops(rows + new_rows) - regen_flops(rows)
                rows += new_rows
        work[method.name] = per_n
        kinds[method.name] = kind
        rate = REFERENCE_RATES[(kind, dtype)]
        overhead = point_overhead_seconds(dim)
        seconds[method.name] = [overhead + w / rate for w in per_n]
        peak = max(peak, run_peak)
    flops = spec.sweep.seeds * sum(sum(per_n) for per_n in work.values())
    points = len(spec.methods) * spec.sweep.seeds * len(ns)
    total = spec.sweep.seeds * sum(sum(per_n) for per_n in seconds.values())
    return ResourceEstimate(
        dim, n_max, BASELINE_BYTES + peak, flops, points, streamed, work, seconds, total, kinds
    )


def fit_rates(runs) -> dict[tuple[str, str], tuple[float, float, int]]:
    """The cost model fitted to recorded runs (``scripts/record-runs``): for each (kind of
    work, dtype), ``seconds = a + work / rate`` by least squares in relative terms over every
    recorded point, the work as `estimate_resources` counts it. Returns ``{(kind, dtype):
    (a, rate, points)}``.

    Parameters
    ----------
    runs : list of dict
        Each with ``spec`` (a spec document) and ``points`` (``[method, seed, n, seconds]``).
    """
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for run in runs:
        spec = parse_spec(run["spec"])
        est = estimate_resources(spec)
        index = {n: i for i, (n, _) in enumerate(spec.sample_sizes())}
        for method, _seed, n, seconds in run["points"]:
            key = (est.kinds[method], spec.solver.dtype)
            groups.setdefault(key, []).append((est.point_flops[method][index[n]], seconds))
    out = {}
    for key, rows in groups.items():
        work = np.array([w for w, _ in rows])
        secs = np.array([t for _, t in rows])
        # relative residuals (each row divided by its seconds): the quick points, which
        # set the fixed cost, weigh as much as the long ones, which set the rate
        design = np.stack([np.ones_like(work), work], axis=1) / secs[:, None]
        (a, inverse_rate), *_ = np.linalg.lstsq(design, np.ones_like(secs), rcond=None)
        if a < 0.0:  # no negative fixed cost: the best fit with a = 0
            a, inverse_rate = (
                0.0,
                float(design[:, 1] @ np.ones_like(secs) / (design[:, 1] @ design[:, 1])),
            )
        out[key] = (float(a), float(1.0 / inverse_rate), len(rows))
    return out
