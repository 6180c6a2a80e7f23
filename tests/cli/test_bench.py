"""``hsl bench --quick`` end to end: it prints every figure of issue 8's benchmark, and the
figures that do not depend on the machine's speed hold: hsl's accuracy against the dense
``eigh`` of the same C_hat, the streamed run's equality with the stored one, its memory.
(Speed ratios are printed, never asserted: this machine is shared.)"""

import re

import numpy as np
import pytest

from hsl import bench
from hsl_engine._operator import MomentOperator


@pytest.mark.slow  # the quick benchmark: ~1 min on 2 idle cores, two child processes
def test_quick_bench_prints_every_figure_and_hsl_keeps_equal_accuracy(capsys):
    assert bench.main(quick=True) == 0
    out = capsys.readouterr().out
    # the CPU the figures come from, and the pass's vector width on it
    assert re.search(r"^cpu: .+ \(LLVM: \S+; vectors of \d+ float32, \d+ float64", out, re.M)
    for figure in (
        "1. GEMM peak",
        "2. moment operator",
        "k=4 ",
        "k=8 ",
        "lifted",
        "faster per vector",
        "(b) dense per n + eigh",
        "(c) incremental dense + eigh",
        "(d) paper's algorithm, float64",
        "sweep speed-up of hsl:",
        "largest point n=",
        "hsl's lifted operator in float64",
        "4. peak memory",
    ):
        assert figure in out, figure
    row = re.search(
        r"\(a\) hsl\s+[\d.]+ s\s+max\|d cos2\| (\S+)\s+\|d mse\| (\S+)\s+separated eig rel (\S+)",
        out,
    )
    assert row, out
    dcos2, dmse, deig = (float(x) for x in row.groups())
    assert dcos2 <= 1e-3 and dmse <= 1e-3 and deig <= 1e-4
    # the streamed run regenerates every sample per pass and must give the stored run's MSE
    assert "mse equal: True" in out
    peak = re.search(r"streamed \(every sample regenerated per pass\): peak (\d+) MiB", out)
    assert peak and int(peak.group(1)) * 2**20 < 600e6
    assert re.search(r"\d+ passes, converged True", out)


def test_float64_references_read_the_same_samples_in_float64():
    # (b), (d) and the float64 rates read a float64 copy of the sweep's samples (as a float64
    # run keeps its own), not float32 chunks converted at every pass: the same numbers, in
    # chunks of the same rows, so a float64 operator's result does not change
    sw = bench.Sweep(bench.bench_spec(quick=True), threads=1)
    n = sw.spec.sample_sizes()[-2][0]  # not the largest: a prefix of the copy
    view, copy = sw.data.train.view(n), sw.samples(n, np.float64)
    assert copy.n == n and copy.dtype == np.float64 and copy.n_chunks() == view.n_chunks()
    for c in range(view.n_chunks()):
        (x32, y32), (x64, y64) = view.block(c), copy.block(c)
        assert np.array_equal(x64, x32.astype(np.float64)) and np.array_equal(y64, y32)
    v = np.random.default_rng(0).standard_normal((sw.spec.model.feature_dim, 2))
    converted = MomentOperator(view, q=2, features="hermite", backend=sw.backend, dtype=np.float64)
    assert converted._kept is None  # converts every chunk at every pass
    kept = MomentOperator(copy, q=2, features="hermite", backend=sw.backend, dtype=np.float64)
    assert kept._kept is not None
    assert np.array_equal(converted.matmat(v), kept.matmat(v))
