"""``hsl bench``: speed and memory figures, each a ratio measured within one run.

1. NumPy matrix-multiply peak on this machine (float64 GEMM), measured now.
2. Moment-operator throughput (its GEMM flop count per second) as a fraction of that peak.
3. A fig2-cpu sweep of the layer-wise spectral method (one seed) against a straightforward
   reference: for each n, build the dense D x D moment matrix from explicit features from
   scratch, then a full ``eigh``. Same samples, same downstream steps; the accuracy of the
   engine is reported as the largest deviation of cos2, MSE and the top-d1 eigenvalues from
   the reference.
4. Peak memory of the engine sweep (measured in a child process) against the spec's own
   estimate.

Timings on a shared machine are noisy; the ratios compare runs made minutes apart.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import scipy.linalg

import hsl_engine as he
from hsl_engine._operator import MomentOperator
from hsl_engine._spectral import (
    LayerwiseSpectral,
    Readout,
    hidden_features,
    normalised_mse,
    overlaps,
    quadratic_form,
    second_layer,
    transformed_labels,
)


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(size: int = 2000, repeat: int = 3) -> float:
    """float64 GEMM flops per second."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size))
    b = rng.standard_normal((size, size))
    a @ b  # warm up BLAS threads
    return 2.0 * size**3 / _best(lambda: a @ b, repeat)


def operator_throughput(
    n: int, d: int, k: int, threads: int | None, repeat: int = 3
) -> dict[str, float]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, d))
    y = rng.standard_normal(n)
    y -= y.mean()
    op = MomentOperator(
        x, y, q=2, features="hermite", backend=he.get_backend("cpu", threads=threads)
    )
    v = rng.standard_normal((op.dim, k))
    op.matmat(v)
    seconds = _best(lambda: op.matmat(v), repeat)
    return {
        "n": n,
        "d": d,
        "k": k,
        "seconds": seconds,
        "flops_per_s": op.flops_per_vector() * k / seconds,
    }


def bench_spec(quick: bool) -> he.ExperimentSpec:
    base = he.preset("fig2-cpu").model_dump(mode="json")
    base["sweep"]["seeds"] = 1
    base["sweep"]["alphas"] = [1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0]
    base["methods"] = [{"name": "layerwise_spectral", "sample_split": True}]
    base["solver"]["eigensolver"] = "krylov"
    if quick:
        base["model"]["d"] = 36
        base["sweep"]["alphas"] = [1.5, 2.0, 2.5, 2.75]
    return he.parse_spec(base)


def engine_sweep(spec: he.ExperimentSpec, threads: int | None) -> list[dict[str, Any]]:
    data = he.make_seed_data(spec, 0)
    method = LayerwiseSpectral(
        spec,
        spec.methods[0],
        data,
        he.get_backend("cpu", threads=threads),
        rng=np.random.default_rng(0),
    )
    rows = []
    for n, _ in spec.sample_sizes():
        data.train.take(n), method.second_batch(n)  # sample generation is not timed
        t0 = time.perf_counter()
        fit = method.fit(n)
        rows.append(
            {
                "n": n,
                "seconds": time.perf_counter() - t0,
                "mse": fit.mse,
                "cos2": fit.cos2.tolist(),
                "eig": fit.first.eigenvalues.tolist(),
                "passes": fit.first.passes,
            }
        )
    return rows


def reference_sweep(spec: he.ExperimentSpec, threads: int | None) -> list[dict[str, Any]]:
    """Dense moment matrix from scratch for every n, full eigh, same downstream steps."""
    data = he.make_seed_data(spec, 0)
    backend = he.get_backend("cpu", threads=threads)
    d1 = spec.model.hidden_dim
    rows = []
    for n, _ in spec.sample_sizes():
        x, y = data.train.take(n)
        x2, y2 = data.second.take(n)
        t0 = time.perf_counter()
        yc = transformed_labels(y, spec.model.activation)
        op = MomentOperator(x, yc - yc.mean(), q=2, features="hermite", backend=backend)
        theta, u = scipy.linalg.eigh(op.dense())
        order = np.argsort(-np.abs(theta))
        directions = u[:, order[:d1]]
        h = hidden_features(spec, x2, directions)
        a2 = second_layer(h, y2)
        readout = Readout(1, spec.methods[0].readout_ridge).fit(quadratic_form(h, a2), y2)
        pred = readout.predict(
            quadratic_form(hidden_features(spec, data.test_inputs, directions), a2)
        )
        rows.append(
            {
                "n": n,
                "seconds": time.perf_counter() - t0,
                "mse": normalised_mse(pred, data.test_labels),
                "cos2": overlaps(data.teacher.directions, directions).tolist(),
                "eig": theta[order[: d1 + 10]].tolist(),
            }
        )
    return rows


def _child_peak(spec: he.ExperimentSpec, threads: int | None) -> dict[str, Any]:
    """Run the engine sweep in a fresh interpreter and return its rows and peak RSS."""
    code = (
        "import json, resource, sys\n"
        "import hsl_engine as he\n"
        "from hsl.bench import engine_sweep\n"
        "spec = he.parse_spec(json.loads(sys.argv[1]))\n"
        "threads = None if sys.argv[2] == 'None' else int(sys.argv[2])\n"
        "rows = engine_sweep(spec, threads)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps({'rows': rows, 'peak_bytes': peak}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, spec.canonical_json(), str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(*, quick: bool = False, threads: int | None = None) -> int:
    def say(text: str = "") -> None:
        print(text, flush=True)

    spec = bench_spec(quick)
    say(
        f"hsl bench ({'quick' if quick else 'full'}): d={spec.model.d}, "
        f"D={spec.model.feature_dim}, d1={spec.model.hidden_dim}, "
        f"n up to {spec.sample_sizes()[-1][0]}"
    )

    child = _child_peak(spec, threads)
    engine = child["rows"]
    estimate = he.estimate_resources(spec).peak_bytes

    peak = matmul_peak(1500 if quick else 2000)
    say(f"\n1. matmul peak (float64 GEMM): {peak / 1e9:.1f} GFLOP/s")

    n_op = 50_000 if quick else 216_000
    say("\n2. moment operator (q = 2, d = 60), GEMM flops 4 n d^2 per vector:")
    for k in (4, 18):
        r = operator_throughput(n_op, 60, k, threads)
        say(
            f"   n={n_op} k={k:<3} {r['seconds'] * 1e3:8.1f} ms/pass  "
            f"{r['flops_per_s'] / 1e9:6.1f} GFLOP/s  = {r['flops_per_s'] / peak:6.1%} of peak"
        )

    reference = reference_sweep(spec, threads)
    t_engine = sum(r["seconds"] for r in engine)
    t_ref = sum(r["seconds"] for r in reference)
    d1 = spec.model.hidden_dim
    dcos2 = max(
        np.max(np.abs(np.subtract(a["cos2"], b["cos2"]))) for a, b in zip(engine, reference)
    )
    dmse = max(abs(a["mse"] - b["mse"]) for a, b in zip(engine, reference))
    deig = max(
        np.max(np.abs(np.subtract(a["eig"][:d1], b["eig"][:d1]))) / abs(b["eig"][0])
        for a, b in zip(engine, reference)
    )
    say("\n3. sweep, one seed (first layer + second layer + test metrics per n):")
    say(f"   {'n':>8} {'engine s':>9} {'passes':>6} {'reference s':>11}")
    for a, b in zip(engine, reference):
        say(f"   {a['n']:>8} {a['seconds']:>9.2f} {a['passes']:>6} {b['seconds']:>11.2f}")
    say(
        f"   total: engine {t_engine:.1f} s, reference {t_ref:.1f} s: "
        f"speed-up {t_ref / t_engine:.2f}x (target >= 5x)"
    )
    say(
        f"   accuracy vs reference: max |d cos2| {dcos2:.1e}, max |d mse| {dmse:.1e}, "
        f"max |d eigenvalue| / |theta_1| {deig:.1e}"
    )
    last = engine[-1]
    say(
        f"   largest point n={last['n']}: {last['seconds']:.2f} s "
        f"(paper's code ~12.8 s at d=60, n=216000; aim 1.3 s)"
    )

    say("\n4. memory of the engine sweep (child process peak RSS):")
    say(
        f"   peak {child['peak_bytes'] / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB: "
        f"ratio {child['peak_bytes'] / estimate:.2f} (target <= 1)"
    )
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    say(f"   (this process, with the dense reference: {own / 2**20:.0f} MiB)")
    return 0
