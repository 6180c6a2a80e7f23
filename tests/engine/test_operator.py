import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

import hsl_engine as he
from hsl_engine import _compiled
from hsl_engine._compiled import weigh_rows
from hsl_engine._data import project
from hsl_engine._operator import MomentOperator
from hsl_engine._simd import LiftedPass, cyclic_layout, lifted_pass


def explicit_moment(inputs, y, q, features):
    f = he.lift(inputs, q) if features == "hermite" else inputs
    n, dim = f.shape
    return sum(y[m] * (np.outer(f[m], f[m]) - np.eye(dim)) for m in range(n)) / n


@pytest.mark.parametrize(
    ("q", "d", "features", "form"),
    [
        (2, 6, "hermite", "lifted"),
        (2, 6, "hermite", "matrix"),
        (3, 4, "hermite", "auto"),
        (2, 5, "gaussian", "auto"),
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_matrix_free_equals_dense_from_explicit_features(seed, q, d, features, form, threads):
    rng = np.random.default_rng(seed)
    # more than one block of the q = 2 matrix path (256 rows), of the lifted pass (16 to a
    # few hundred rows, by d) and of the lift path (512); not a multiple of the lifted
    # pass's 4 rows
    n = 701
    dim = math.comb(d + q - 1, q)
    inputs = rng.standard_normal((n, d if features == "hermite" else dim))
    y = rng.standard_normal(n)
    y -= y.mean()
    op = MomentOperator(
        inputs, y, q=q, features=features, backend=he.get_backend("cpu", threads=threads),
        form=form,
    )  # fmt: skip
    reference = explicit_moment(inputs, y, q, features)
    v = rng.standard_normal((dim, 5))
    assert_allclose(op.matmat(v), reference @ v, rtol=1e-11, atol=1e-12)
    assert_allclose(op.dense(), reference, rtol=1e-11, atol=1e-12)
    assert op.passes == 1


@pytest.mark.parametrize("form", ["lifted", "matrix"])
def test_q2_trace_term_matters_even_for_centred_labels(seed, form):
    # The identity component of (x x^T - I) does not cancel (the diagonal features are
    # (x_a^2 - 1)/sqrt 2); dropping it would shift every result by a multiple of I. Check
    # against an identity input.
    rng = np.random.default_rng(seed)
    d, n = 5, 300
    x = rng.standard_normal((n, d))
    y = rng.standard_normal(n)
    y -= y.mean()
    op = MomentOperator(x, y, q=2, features="hermite", backend=he.get_backend("cpu"), form=form)
    eye = he.sym_to_vec(np.eye(d)[None])[0]
    ref = explicit_moment(x, y, 2, "hermite") @ eye
    assert_allclose(op.matmat(eye[:, None])[:, 0], ref, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("form", ["lifted", "matrix"])
def test_float32_operator_is_close_to_float64(seed, form):
    rng = np.random.default_rng(seed)
    d, n = 8, 2000
    x = rng.standard_normal((n, d))
    y = rng.standard_normal(n)
    y -= y.mean()
    be = he.get_backend("cpu")
    v = rng.standard_normal((he.feature_dim(d, 2), 3))
    r64 = MomentOperator(x, y, q=2, features="hermite", backend=be).matmat(v)
    r32 = MomentOperator(
        x.astype(np.float32), y.astype(np.float32), q=2, features="hermite", backend=be,
        form=form,
    ).matmat(v.astype(np.float32))  # fmt: skip
    # float32 GEMMs, float64 sums: the result is float64 and carries only the float32
    # rounding of inputs and products (~1e-7 relative), not of a float32 sum over n samples
    assert r32.dtype == np.float64
    assert_allclose(r32, r64, rtol=0, atol=2e-6 * np.abs(r64).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("m", "k", "d"), [(1, 1, 1), (37, 3, 7), (300, 4, 60), (129, 8, 17)])
def test_compiled_row_step_matches_its_formula(seed, dtype, m, k, d):
    # The Numba step of the CPU q = 2 pass (odd sizes: the vectorised loops' remainders)
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((m, d)).astype(dtype)
    g = rng.standard_normal((k, d, d))
    g = (g + g.transpose(0, 2, 1)).astype(dtype)
    yb = rng.standard_normal(m).astype(dtype)
    trace = np.trace(g, axis1=1, axis2=2).astype(dtype)
    xg = np.einsum("jab,ib->ija", g, xb)  # G_j x_i
    x64, xg64 = xb.astype(np.float64), xg.astype(np.float64)
    w = 0.5 * yb[:, None] * (np.einsum("ija,ia->ij", xg64, x64) - trace[None, :])
    wsum = np.full(k, 1.5)
    got = np.ascontiguousarray(xg)
    weigh_rows(got, xb, yb, trace, wsum)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    scale = np.abs(w).max()
    assert got.dtype == dtype
    assert_allclose(got, w[:, :, None] * x64[:, None, :], rtol=0, atol=tol * scale * 4)
    assert_allclose(wsum, 1.5 + w.sum(axis=0), rtol=0, atol=tol * scale * m)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("m", "k", "d"),
    [(1, 4, 1), (3, 4, 2), (6, 8, 8), (257, 4, 9), (515, 8, 23), (300, 4, 60), (40, 4, 61)],
)
def test_lifted_pass_matches_its_formula(seed, dtype, m, k, d):
    # The explicit-SIMD q = 2 pass on odd sizes: rows not a multiple of its blocks (the
    # zero-weighted rows past the last sample), d below, at and off the vector width (the
    # padded shifts), odd and even d (for even d the last shift's second half is unused),
    # more than one block of float32 sums, vectors in two groups of 4
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d)).astype(dtype)
    y = rng.standard_normal(m).astype(dtype)
    dim = he.feature_dim(d, 2)
    v = rng.standard_normal((k, dim))
    kernel = lifted_pass(d, dtype)
    vc = kernel.vectors(v)
    assert vc.shape == (k, kernel.layout.width) and vc.dtype == dtype
    f = he.lift(x.astype(np.float64), 2)
    vq = vc[:, kernel.layout.positions].astype(np.float64)  # v as the pass reads it
    want = 0.5 + (f.T @ (y.astype(np.float64)[:, None] * (f @ vq.T))).T
    out = np.full(vc.shape, 0.5)  # added to, not overwritten
    kernel(x, y, vc, out)
    got = kernel.coordinates(out)
    # relative to the largest entry: one row's contribution is ~1/sqrt(m) of it, far above
    # the float32 rounding (~3e-7 relative measured at m = 300, d = 60)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert got.dtype == np.float64 and got.shape == (k, dim)
    assert_allclose(got, want, rtol=0, atol=tol * np.abs(want - 0.5).max())
    # a row left out (here the last, in a partial block) would show
    last = y[-1] * np.outer(f[-1] @ vq.T, f[-1])
    assert np.abs(last).max() > 10 * tol * np.abs(want - 0.5).max()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pass_width_pads_d_least(dtype):
    # On a CPU that runs its widest vectors as two halves (AMD Zen 4): those, or half of
    # them where they pad d to fewer numbers. On any other CPU: the widest, always (on Intel
    # AVX-512 half width runs at half the multiply-add peak). The choice depends on d and the
    # CPU alone (d = 120 in float32 with AVX-512 takes 8 lanes on Zen 4, 16 elsewhere).
    from hsl_engine._simd import lanes, pass_lanes, splits_wide_vectors

    wide = lanes(dtype)
    chosen = {}
    for d in range(1, 130):
        got = pass_lanes(d, dtype, split=True)
        padded = {w: -(-d // w) * w for w in (wide, wide // 2) if w >= 2}
        assert padded[got] == min(padded.values()), d
        assert got == wide or padded[got] < padded[wide], d  # the wider on a tie
        assert pass_lanes(d, dtype, split=False) == wide, d
        chosen[d] = got
        if d in (13, 60, 120):
            # the built pass takes this CPU's rule
            want = pass_lanes(d, dtype, split=splits_wide_vectors())
            assert lifted_pass(d, dtype).layout.lanes == want
    if wide >= 4:
        assert chosen[wide + wide // 2] == wide // 2 and chosen[2 * wide] == wide


@pytest.mark.parametrize(("dtype", "lanes"), [(np.float32, 4), (np.float32, 8), (np.float64, 2),
                                              (np.float64, 4)])  # fmt: skip
def test_lifted_pass_for_narrower_vectors_matches_its_formula(seed, dtype, lanes):
    # The vector widths of other CPUs (SSE or NEON: 16 bytes, AVX2: 32), built here: other
    # lanes, so other paddings and block sizes, and the float64 sums added a whole vector at
    # a time
    rng = np.random.default_rng(seed)
    d, m = 13, 203
    x = rng.standard_normal((m, d)).astype(dtype)
    y = rng.standard_normal(m).astype(dtype)
    v = rng.standard_normal((8, he.feature_dim(d, 2)))
    kernel = LiftedPass(d, np.dtype(dtype).name, vector_lanes=lanes)
    assert kernel.layout.lanes == lanes and kernel.layout.padded == -(-d // lanes) * lanes
    vc = kernel.vectors(v)
    out = np.zeros(vc.shape)
    kernel(x, y, vc, out)
    f = he.lift(x.astype(np.float64), 2)
    vq = vc[:, kernel.layout.positions].astype(np.float64)
    want = (f.T @ (y.astype(np.float64)[:, None] * (f @ vq.T))).T
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert_allclose(kernel.coordinates(out), want, rtol=0, atol=tol * np.abs(want).max())
    assert_allclose(kernel.dots(x, vc), f @ vq.T, rtol=0, atol=tol * np.abs(f @ vq.T).max())


@pytest.mark.parametrize("d", [1, 2, 3, 8, 15, 16, 17, 60, 61])
@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_cyclic_layout_holds_each_pair_once(d, lanes):
    # every lifted coordinate (a, b), a <= b, has one position: shift s = (b - a) or
    # d - (b - a), lane a' with {a', (a' + s) mod d} = {a, b}, a' < d; and only the last
    # shift of an even d has unused lanes below d (its pairs would repeat)
    lay = cyclic_layout(d, lanes)
    assert lay.padded % lanes == 0 and d <= lay.padded < d + lanes
    assert lay.width == lay.shifts * lay.padded and lay.shifts == d // 2 + 1
    pos = lay.positions
    assert pos.shape == (d * (d + 1) // 2,) and len(np.unique(pos)) == pos.shape[0]
    pairs = [(a, b) for a in range(d) for b in range(a, d)]
    for (a, b), p in zip(pairs, pos):
        s, lane = lay.shift_and_lane(p)
        assert lane < d and s < lay.shifts and lay.index(s, lane) == p
        assert sorted((lane, (lane + s) % d)) == [a, b]
    # the layout covers 0 .. width - 1 once: lane blocks of `shifts x lanes` numbers
    every = [lay.index(s, a) for a in range(lay.padded) for s in range(lay.shifts)]
    assert sorted(every) == list(range(lay.width))
    # a lane block's numbers are contiguous, shift after shift (the pass reads them so)
    assert lay.index(1, 0) == lanes and lay.index(0, lanes % lay.padded) == (
        lay.shifts * lanes if lay.padded > lanes else 0
    )
    used = {int(p) for p in pos}
    unused_real = [(s, a) for s in range(lay.shifts) for a in range(d)]
    unused_real = [(s, a) for s, a in unused_real if lay.index(s, a) not in used]
    if d % 2 == 0 and d > 0:
        assert unused_real == [(d // 2, a) for a in range(d // 2, d)]
    else:
        assert unused_real == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lifted_pass_rounding_depends_on_its_blocks_only(seed, dtype):
    # The float64 sums take the blocks' sums in row order: a pass over all rows and two
    # passes split at a block boundary into the same sums are the same numbers, bit for bit,
    # and a repeated pass too (no state, no threads inside)
    d = 23
    kernel = lifted_pass(d, dtype)
    rng = np.random.default_rng(seed)
    m = 3 * kernel.rows + 5
    x = rng.standard_normal((m, d)).astype(dtype)
    y = rng.standard_normal(m).astype(dtype)
    vc = kernel.vectors(rng.standard_normal((8, he.feature_dim(d, 2))))
    whole, again, split = (np.zeros(vc.shape) for _ in range(3))
    kernel(x, y, vc, whole)
    kernel(x, y, vc, again)
    cut = 2 * kernel.rows
    kernel(np.ascontiguousarray(x[:cut]), y[:cut].copy(), vc, split)
    kernel(np.ascontiguousarray(x[cut:]), y[cut:].copy(), vc, split)
    assert np.array_equal(whole, again)
    assert np.array_equal(whole, split)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [5, 23, 60])
def test_lifted_pass_on_fewer_vectors_gives_each_vector_the_same_sums(seed, dtype, d):
    # A pass on k vectors runs groups of 4 and then one of the 1 to 3 left, each with its own
    # code (tiles of other shapes, no zero vectors computed). Every vector's sums, and its
    # dot products, must be the same bit for bit whatever group it falls in: here against
    # the same vectors followed by others, in whole groups of 4.
    rng = np.random.default_rng(seed)
    m = 301  # a partial last block
    x = rng.standard_normal((m, d)).astype(dtype)
    y = rng.standard_normal(m).astype(dtype)
    kernel = lifted_pass(d, dtype)
    v = rng.standard_normal((8, he.feature_dim(d, 2)))
    full = kernel.vectors(v)
    want = kernel.sums(full)
    kernel(x, y, full, want)
    want_dots = kernel.dots(x, full)
    for k in range(1, 8):
        vc = kernel.vectors(v[:k])
        assert vc.shape == (k, kernel.layout.width)
        got = kernel.sums(vc)
        kernel(x, y, vc, got)
        assert np.array_equal(got, want[:k]), k
        assert np.array_equal(kernel.dots(x, vc), want_dots[:, :k]), k
    # and the group's work is done: not all zero, and every row counted
    f = he.lift(x.astype(np.float64), 2)
    direct = f.T @ (y.astype(np.float64) * (f @ v[0]))
    tol = 1e-12 if dtype == np.float64 else 2e-5
    assert_allclose(kernel.coordinates(want)[0], direct, rtol=0, atol=tol * np.abs(direct).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [5, 23, 60])
def test_register_tiles_for_16_and_32_registers_give_the_same_numbers(seed, dtype, d):
    # The pass's register tiles follow the CPU's vector registers (`dot_rows`,
    # `weighted_tiles`: 16 with AVX2, 32 with AVX-512); each accumulator sums the same
    # products in the same order whatever its tile, so both builds (either runs here: LLVM
    # spills what does not fit) give the same sums and dot products bit for bit, for every
    # group size
    from hsl_engine._simd import pass_lanes

    rng = np.random.default_rng(seed)
    m = 301
    x = rng.standard_normal((m, d)).astype(dtype)
    y = rng.standard_normal(m).astype(dtype)
    lanes = pass_lanes(d, np.dtype(dtype).name)
    small, large = (LiftedPass(d, np.dtype(dtype).name, lanes, registers=r) for r in (16, 32))
    assert (small.registers, large.registers) == (16, 32)
    for k in (1, 2, 3, 4, 7):
        vc = small.vectors(rng.standard_normal((k, he.feature_dim(d, 2))))
        a, b = small.sums(vc), large.sums(vc)
        small(x, y, vc, a)
        large(x, y, vc, b)
        assert a.any() and np.array_equal(a, b), k
        assert np.array_equal(small.dots(x, vc), large.dots(x, vc)), k


@pytest.mark.parametrize("registers", [16, 32])
def test_register_tiles_fit_their_registers(registers):
    # accumulators plus what a step keeps live: the dots' vectors and one shifted input; a
    # weighted tile's smaller operand side and one of the other; the diagonal's weights or
    # features (the fewer), one of the other and two constants
    from hsl_engine._simd import dot_rows, weighted_tiles

    for group in (1, 2, 3, 4):
        rows = dot_rows(group, registers)
        assert rows * group + group + 1 <= registers, group
        vectors, shifts, blocks = weighted_tiles(group, registers)
        assert 1 <= vectors <= group and shifts >= 1 and blocks >= 1
        assert vectors * shifts + min(vectors, shifts) + 1 <= registers, group
        assert group * blocks + min(group, blocks) + 3 <= registers, group
        if group >= 2:  # enough independent sums for two multiply-add units of latency 4
            assert rows * group >= 8 and vectors * shifts >= 8


def test_lifted_pass_names_what_is_wrong():
    kernel = lifted_pass(5, np.float32)
    x = np.zeros((3, 5), np.float32)
    y = np.zeros(3, np.float32)
    vc = kernel.vectors(np.zeros((4, 15)))
    out = np.zeros(vc.shape)
    with pytest.raises(ValueError, match="float32"):
        kernel(x.astype(np.float64), y, vc, out)
    with pytest.raises(ValueError, match="out must be"):
        kernel(x, y, vc, np.zeros((3, vc.shape[1])))
    with pytest.raises(ValueError, match=r"x must be \(m, 5\)"):
        kernel(np.zeros((3, 4), np.float32), y, vc, out)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel(np.zeros((5, 3), np.float32).T, y, vc, out)
    with pytest.raises(ValueError, match="y must be"):
        kernel(x, np.zeros(4, np.float32), vc, out)
    with pytest.raises(ValueError, match="out must be"):
        kernel(x, y, vc, out.astype(np.float32))
    kernel(x[:0], y[:0], vc, out)  # no rows: nothing added
    assert not out.any()


def test_compiled_row_step_compiles_with_slp_and_leaves_numbas_setting_alone():
    # The engine's Numba kernel compiles with Numba's SLP vectorizer on (its machine code and
    # rounding must not depend on what else the process compiled), and only it does: the
    # setting is as it was before and after, and a new signature (here a read-only array)
    # is compiled by the engine, not left to the dispatcher (which would compile it
    # without SLP).
    import numba

    before = numba.config.SLP_VECTORIZE
    for dtype in (np.float32, np.float64):  # two signatures, whichever tests ran before
        xb = np.random.default_rng(0).standard_normal((9, 5)).astype(dtype)
        xb.setflags(write=False)
        xg = np.ones((9, 4, 5), dtype)
        weigh_rows(xg, xb, np.ones(9, dtype), np.zeros(4, dtype), np.zeros(4))
        assert numba.config.SLP_VECTORIZE == before
    kernel, ready = _compiled.weigh_rows.dispatcher()
    assert set(kernel.overloads) == set(ready)
    # the read-only x of both dtypes compiled by the engine
    assert {t[1].dtype.name for t in ready if not t[1].mutable} == {"float32", "float64"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("m", "k", "d"), [(1, 1, 1), (3, 4, 2), (6, 5, 8), (2049, 11, 23)])
def test_lifted_hidden_features_match_the_lift(seed, dtype, m, k, d):
    # <A_j, F(x_i)> by the pass's first step (`project` on NumPy), against the explicit lift:
    # odd row counts (the rows of the last block past m are not returned), 1 to 3 directions
    # past a group of 4, more than one of project's 2048-row blocks
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d)).astype(dtype)
    dirs = rng.standard_normal((k, he.feature_dim(d, 2)))
    want = he.lift(x.astype(np.float64), 2) @ dirs.T
    got = project(x, dirs, 2)
    tol = 1e-13 if dtype == np.float64 else 2e-6
    assert got.dtype == dtype and got.shape == (m, k) and got.flags.c_contiguous
    assert_allclose(got, want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))
    kernel = lifted_pass(d, dtype)
    dots = kernel.dots(x, kernel.vectors(dirs))
    assert dots.shape == (m, k) and np.array_equal(dots, got)  # `project` is the pass's dots


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lifted_and_matrix_forms_agree_at_fig2_size(seed, dtype):
    # d = 60 (D = 1830, the fig2-cpu presets), 5 vectors (padded to 8 in the lifted pass),
    # two chunks of samples with a partial last one
    rng = np.random.default_rng(seed)
    d, n = 60, 5003
    x = rng.standard_normal((n, d)).astype(dtype)
    y = rng.standard_normal(n).astype(dtype)
    y -= y.mean()
    be = he.get_backend("cpu")
    v = rng.standard_normal((he.feature_dim(d, 2), 5))
    ops = {
        form: MomentOperator(x, y, q=2, features="hermite", backend=be, form=form)
        for form in ("lifted", "matrix")
    }
    lifted, matrix = (ops[form].matmat(v) for form in ("lifted", "matrix"))
    tol = 1e-12 if dtype == np.float64 else 2e-6
    assert_allclose(lifted, matrix, rtol=0, atol=tol * np.abs(matrix).max())
    # each form counts its own work: 4 n D against 4 n d^2 flops per vector
    assert ops["lifted"].flops == 5 * 4.0 * n * he.feature_dim(d, 2)
    assert ops["matrix"].flops == 5 * 4.0 * n * d * d


def test_operator_form_is_checked():
    x, y = np.zeros((8, 3)), np.zeros(8)
    with pytest.raises(ValueError, match="form must be"):
        MomentOperator(x, y, q=2, features="hermite", backend=he.get_backend("cpu"), form="vech")
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:  # the lifted pass is compiled for NumPy arrays only
        with pytest.raises(ValueError, match="NumPy backend only"):
            MomentOperator(
                x, y, q=2, features="hermite", backend=he.get_backend("cpu", backend="torch"),
                form="lifted",
            )  # fmt: skip
    assert MomentOperator(x, y, q=2, features="hermite", backend=he.get_backend("cpu")).form == (
        "lifted"
    )


@pytest.mark.parametrize("form", ["lifted", "matrix"])
def test_a_nan_sample_shows_in_the_operator(form):
    # a bad sample poisons the result instead of vanishing in the compiled step
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    y = rng.standard_normal(500).astype(np.float32)
    x[321, 2] = np.nan
    op = MomentOperator(x, y, q=2, features="hermite", backend=he.get_backend("cpu"), form=form)
    out = op.matmat(rng.standard_normal((he.feature_dim(6, 2), 4)))
    assert np.isnan(out).all()


def test_cuda_is_a_clear_error():
    with pytest.raises(he.DeviceError, match="cuda"):
        he.get_backend("cuda")
