"""What a spec will cost, computed in log space before anything is allocated.

The figures are upper-bound style estimates of one run's peak memory (a worker executes one
(method, seed) run at a time) and of the whole experiment's floating-point work. They use
only logarithms and floats, so ``d = 10**6`` or ``n = 10**9`` never form a huge integer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._spec import ExperimentSpec

BASELINE_BYTES = 150e6  # interpreter, NumPy/SciPy and their buffers
# operator applications per n, in full blocks of d1 + 10 vectors: measured 7-9 blocks' worth
# (120-160 vectors) at fig2-cpu sizes with warm starts; 12 keeps the estimate an upper bound
KRYLOV_PASSES = 12.0


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
    """

    feature_dim: float
    max_n: float
    peak_bytes: float
    flops: float
    points: int

    @property
    def log10_peak_bytes(self) -> float:
        return math.log10(self.peak_bytes) if self.peak_bytes > 0 else -math.inf

    @property
    def log10_flops(self) -> float:
        return math.log10(self.flops) if self.flops > 0 else -math.inf


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def estimate_resources(spec: ExperimentSpec) -> ResourceEstimate:
    m = spec.model
    log_dim = m.log_feature_dim
    dim = _exp(log_dim)
    d = float(m.d)
    d1 = float(m.hidden_dim)
    k = d1 + 10
    itemsize = 4.0 if spec.solver.dtype == "float32" else 8.0
    log_d = math.log(d)
    if spec.sweep.alphas is not None:
        ns = [_exp(a * log_d) for a in spec.sweep.alphas]
    else:
        ns = [float(n) for n in spec.sweep.n_values or []]
    n_max = max(ns)
    width = dim if m.features == "gaussian" else d  # stored floats per sample
    q2 = m.features == "hermite" and m.q == 2
    per_vector_per_sample = 4.0 * d * d if q2 else 4.0 * dim

    peak = 0.0
    flops = 0.0
    for method in spec.methods:
        split = getattr(method, "sample_split", False)
        # samples: train (+ second batch) + test, 8-byte floats, x2 while a stream grows
        data = 8.0 * width * (2.0 * n_max * (2.0 if split else 1.0) + spec.sweep.n_test)
        run_peak = data
        if method.name in ("layerwise_spectral", "latent_rbf"):
            dense_mem = 3.0 * 8.0 * dim * dim
            basis = 2.0 * 8.0 * dim * min(360.0, max(2 * k, 256 * 2**20 / (8 * dim)))
            run_peak += min(dense_mem, basis) + 8.0 * dim * k * 4 + itemsize * n_max
            if itemsize != 8.0:  # the operator keeps a float32 copy of the inputs
                run_peak += itemsize * width * n_max
            for n in ns:
                solve = min(
                    2.0 * n * dim * dim + 10.0 * dim**3,
                    KRYLOV_PASSES * k * n * per_vector_per_sample,
                )
                project = 2.0 * (2.0 * n + spec.sweep.n_test) * d1 * (d * d if q2 else dim)
                flops += solve + project
        if method.name in ("kernel_rbf", "kernel_poly", "latent_rbf"):
            lm = float(method.n_landmarks)
            kernel_width = d1 if method.name == "latent_rbf" else width
            run_peak += 8.0 * (4.0 * lm * lm + 2.0 * 4096.0 * lm)
            nested = method.name != "latent_rbf"
            total_rows = n_max if nested else sum(ns)
            flops += 2.0 * total_rows * lm * (kernel_width + lm)
            flops += 2.0 * len(ns) * spec.sweep.n_test * lm * (kernel_width + 1)
        peak = max(peak, run_peak)
    flops *= spec.sweep.seeds
    points = len(spec.methods) * spec.sweep.seeds * len(ns)
    return ResourceEstimate(dim, n_max, BASELINE_BYTES + peak, flops, points)
