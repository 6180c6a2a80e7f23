"""Compiled CPU kernels (Numba): the q = 2 moment operator and hidden features on lifted
coordinates, and the row-wise step between the GEMMs of the q = 2 matrix form.

NumPy runs ``x^T G_j x`` per row and the weighted rows as several passes over (rows, k, d)
temporaries; these loops make one pass while the GEMM's output is in cache. Each is compiled
at its first call, once per dtype, and releases the GIL (the chunk threads run them).
"""

from __future__ import annotations

import functools
import threading

import numpy as np


def compiled(func):
    """``func`` compiled by Numba at its first call (once per dtype), releasing the GIL:
    chunks run in threads. Numba is imported then, not with the package (it takes ~1 s).

    Floating-point reassociation and contraction only (``fastmath`` without its no-NaN and
    no-infinity assumptions), so the sums vectorise and a NaN or an infinity still shows.
    Numba's SLP vectorizer (off by default) is on while these kernels compile, and only
    then: it vectorises straight-line code, the 8-wide blocks of `lifted_q2_pass`'s feature
    rows. Each new signature is compiled under Numba's compiler lock with the setting
    switched on and restored, so a kernel's machine code, and so its rounding, is the same
    in every process, and other Numba code in the process compiles as it would without hsl.
    The machine code is cached on disk where a cache directory is writable; elsewhere each
    process compiles it (about a second). The chunk threads that meet the first call share
    one dispatcher."""
    kernel = None
    made = threading.Lock()
    ready: set = set()  # the argument types compiled with the engine's settings
    seen: set = set()  # cheap keys of the arguments met (typeof takes ~6 us an array)

    @functools.wraps(func)
    def call(*args):
        nonlocal kernel
        if kernel is None:
            with made:
                if kernel is None:
                    import numba

                    flags = {"reassoc", "contract", "nsz", "arcp"}
                    try:
                        kernel = numba.njit(nogil=True, fastmath=flags, cache=True)(func)
                    except RuntimeError:  # no writable cache location
                        kernel = numba.njit(nogil=True, fastmath=flags)(func)
        key = tuple(
            (a.dtype, a.ndim, a.flags.num) if isinstance(a, np.ndarray) else type(a) for a in args
        )
        if key not in seen:
            types = tuple(kernel.typeof_pyval(a) for a in args)
            if types not in ready:
                _compile_vectorised(kernel, types)
                ready.add(types)
            seen.add(key)
        return kernel(*args)

    def dispatcher():
        """The Numba dispatcher (None before the first call) and the argument types it
        compiled with the engine's settings (for tests)."""
        return kernel, frozenset(ready)

    call.py_func = func
    call.dispatcher = dispatcher
    return call


def _compile_vectorised(kernel, types) -> None:
    """Compile (or load from the cache) ``kernel`` for ``types`` with the SLP vectorizer on,
    holding Numba's compiler lock, under which every Numba compilation in the process runs,
    so that no other compilation sees the setting."""
    import numba
    from numba.core.compiler_lock import global_compiler_lock

    with global_compiler_lock:
        saved = numba.config.SLP_VECTORIZE
        numba.config.SLP_VECTORIZE = 1
        try:
            kernel.compile(types)
        finally:
            numba.config.SLP_VECTORIZE = saved


@compiled
def weigh_rows(xg, xb, yb, trace, wsum):
    """In place, row by row: ``xg[i, j] = w_ij x_i`` with ``w_ij = y_i (x_i^T G_j x_i -
    tr G_j) / 2``, where ``xg[i, j] = G_j x_i`` on entry; ``wsum[j] += sum_i w_ij`` in
    float64.

    One read and one write of ``xg`` while it is in cache, where NumPy needed four passes and
    temporaries (measured on one core, d = 60, 1024 rows x 4 vectors: 54-71 us against 163 us
    in float32, 70-98 us against 473 us in float64)."""
    m, k, d = xg.shape
    quad = np.empty(k, xg.dtype)
    for i in range(m):
        for j in range(k):
            s = xg.dtype.type(0.0)
            for a in range(d):
                s += xg[i, j, a] * xb[i, a]
            quad[j] = s
        half_y = xg.dtype.type(0.5) * yb[i]
        for j in range(k):
            w = half_y * (quad[j] - trace[j])
            wsum[j] += w
            for a in range(d):
                xg[i, j, a] = w * xb[i, a]


# Rows whose float32 products `lifted_q2_pass` sums before adding them to its float64 sums.
LIFTED_FLUSH_ROWS = 256
# Most bytes of 8 rows' features for `lifted_q2_pass` to add its weighted rows 8 at a time
LIFTED_GROUP_BYTES = 512 * 1024


def lifted_vectors(v, dtype) -> np.ndarray:
    """Rows ``v`` (k, D) as the lifted passes take them: C-contiguous in ``dtype``, k padded
    with zero rows to a multiple of 4 (the passes take vectors four at a time)."""
    k = v.shape[0]
    vt = np.zeros((-(-k // 4) * 4, v.shape[1]), dtype)
    vt[:k] = v
    return vt


def lifted_q2_pass(x, y, vt, out):
    """``out[j] += sum_i y_i (F(x_i) . vt[j]) F(x_i)`` for the q = 2 Hermite features
    ``F(x)`` (`hsl_engine._features.lift`: ``F_aa = (x_a^2 - 1)/sqrt 2``, ``F_ab = x_a x_b``),
    ``out`` float64, the products in the type of ``x``.

    x : (m, d); y : (m,), the operator's labels; vt : (k, D), k a multiple of 4 (pad with
    zero vectors); out : (k, D) float64, added to.

    The two products of the pass on the D = d (d + 1)/2 lifted coordinates instead of d x d
    matrices: 4 D multiply-add flops per row and vector where the matrix form
    (`hsl_engine._operator._q2_chunk_numpy`) takes 4 d^2, ~1.97x fewer at d = 60. Four rows
    at a time, their features are written into an L1-sized buffer (8-wide blocks, each
    block's overrun rewritten by the next segment) and one loop over the D coordinates takes
    their 16 dot products with 4 vectors while they are in L1. Then one loop adds the
    weighted rows to 4 vectors' sums, 8 rows at a time (two fours) where their features fit
    in `LIFTED_GROUP_BYTES`, else 4: one read and one write of the sums per 8 rows (that
    loop alone 100 against 82 GFLOP/s on one core in float32; the whole pass 0.99-1.07x
    as fast at d = 60, 1.04-1.14x at d = 120 and 180, 0.86-0.98x at d = 250, where 8 rows'
    features leave L2).
    Either way the numbers are those of engine 0.8.0's four-row pass, bit for bit on this
    machine. The sums of float32 products are added to ``out`` every `LIFTED_FLUSH_ROWS`
    rows; the rounding depends on the rows alone, not on threads.
    """
    # 8 rows a group up to d = 180 in float32, 127 in float64 (see above)
    group = 8 if 8 * (vt.shape[1] + 8) * x.itemsize <= LIFTED_GROUP_BYTES else 4
    _lifted_q2(x, y, vt, out, np.empty((0, 0), x.dtype), group)


def lifted_q2_features(x, vt, dots):
    """``dots[i, j] = F(x_i) . vt[j]``, in the type of ``x``: the q = 2 hidden features
    ``<A_j, F(x_i)>`` (`hsl_engine._data.project`) by the first half of `lifted_q2_pass`.

    x : (m, d); vt : (k, D), k a multiple of 4; dots : (m, k), written.
    """
    # no labels: the pass stops before it would weigh the rows
    _lifted_q2(x, np.empty(0, x.dtype), vt, np.empty((0, 0)), dots, 4)


@compiled
def _lifted_q2(x, y, vt, out, dots, group):
    """`lifted_q2_pass` (``dots`` empty) or `lifted_q2_features` (``dots`` of shape (m, k):
    the dot products are stored and nothing is added to ``out``), ``group`` (4 or 8) rows
    at a time."""
    features_only = dots.shape[0] > 0
    m, d = x.shape
    kp, dim = vt.shape
    dt = x.dtype.type
    inv = dt(1.0 / np.sqrt(2.0))
    one = dt(1.0)
    rows = np.zeros((group, dim + 8), x.dtype)  # the rows' features (+ a block's overrun)
    xpad = np.zeros((group, d + 8), x.dtype)
    part = np.zeros((0 if features_only else kp, dim), x.dtype)
    w = np.zeros((group, 0 if features_only else kp), x.dtype)  # the rows' weights
    u1, u2, u3, u4 = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4)
    u5, u6, u7, u8 = np.uint64(5), np.uint64(6), np.uint64(7), np.uint64(8)
    since = 0
    for r0 in range(0, m, group):
        for g in range(0, group, 4):
            # features of 4 rows, then their dot products while the rows are in L1
            for r in range(g, g + 4):
                xr = xpad[r]
                if r0 + r < m:
                    for a in range(d):
                        xr[a] = x[r0 + r, a]
                else:  # past the last row: zero features
                    xr[:] = 0.0
                f = rows[r]
                # features of one row, segment a = (a, a..d-1), in unsigned indices (no
                # wraparound code) and 8 loads before 8 stores, so the blocks vectorise
                p = np.uint64(0)
                for a in range(d):
                    ua = np.uint64(a)
                    xa = xr[ua]
                    length = np.uint64(d - a)
                    t0 = np.uint64(0)
                    while t0 < length:
                        q = ua + t0
                        o = p + t0
                        e0, e1, e2, e3 = xr[q], xr[q + u1], xr[q + u2], xr[q + u3]
                        e4, e5, e6, e7 = xr[q + u4], xr[q + u5], xr[q + u6], xr[q + u7]
                        f[o] = xa * e0
                        f[o + u1] = xa * e1
                        f[o + u2] = xa * e2
                        f[o + u3] = xa * e3
                        f[o + u4] = xa * e4
                        f[o + u5] = xa * e5
                        f[o + u6] = xa * e6
                        f[o + u7] = xa * e7
                        t0 += u8
                    f[p] = (xa * xa - one) * inv
                    p += length
            f0, f1, f2, f3 = rows[g], rows[g + 1], rows[g + 2], rows[g + 3]
            for j0 in range(0, kp, 4):
                v0, v1, v2, v3 = vt[j0], vt[j0 + 1], vt[j0 + 2], vt[j0 + 3]
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = dt(0.0)
                s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = dt(0.0)
                for c in range(dim):
                    a0, a1, a2, a3 = f0[c], f1[c], f2[c], f3[c]
                    b0, b1, b2, b3 = v0[c], v1[c], v2[c], v3[c]
                    s00 += a0 * b0
                    s01 += a0 * b1
                    s02 += a0 * b2
                    s03 += a0 * b3
                    s10 += a1 * b0
                    s11 += a1 * b1
                    s12 += a1 * b2
                    s13 += a1 * b3
                    s20 += a2 * b0
                    s21 += a2 * b1
                    s22 += a2 * b2
                    s23 += a2 * b3
                    s30 += a3 * b0
                    s31 += a3 * b1
                    s32 += a3 * b2
                    s33 += a3 * b3
                if features_only:
                    for r in range(min(4, m - r0 - g)):
                        dots[r0 + g + r, j0] = (s00, s10, s20, s30)[r]
                        dots[r0 + g + r, j0 + 1] = (s01, s11, s21, s31)[r]
                        dots[r0 + g + r, j0 + 2] = (s02, s12, s22, s32)[r]
                        dots[r0 + g + r, j0 + 3] = (s03, s13, s23, s33)[r]
                    continue
                w[g, j0], w[g, j0 + 1], w[g, j0 + 2], w[g, j0 + 3] = s00, s01, s02, s03
                w[g + 1, j0], w[g + 1, j0 + 1], w[g + 1, j0 + 2], w[g + 1, j0 + 3] = (
                    s10, s11, s12, s13
                )  # fmt: skip
                w[g + 2, j0], w[g + 2, j0 + 1], w[g + 2, j0 + 2], w[g + 2, j0 + 3] = (
                    s20, s21, s22, s23
                )  # fmt: skip
                w[g + 3, j0], w[g + 3, j0 + 1], w[g + 3, j0 + 2], w[g + 3, j0 + 3] = (
                    s30, s31, s32, s33
                )  # fmt: skip
        if features_only:
            continue
        for r in range(group):
            yw = y[r0 + r] if r0 + r < m else dt(0.0)
            for j in range(kp):
                w[r, j] *= yw
        f0, f1, f2, f3 = rows[0], rows[1], rows[2], rows[3]
        for j0 in range(0, kp, 4):
            w00, w01, w02, w03 = w[0, j0], w[0, j0 + 1], w[0, j0 + 2], w[0, j0 + 3]
            w10, w11, w12, w13 = w[1, j0], w[1, j0 + 1], w[1, j0 + 2], w[1, j0 + 3]
            w20, w21, w22, w23 = w[2, j0], w[2, j0 + 1], w[2, j0 + 2], w[2, j0 + 3]
            w30, w31, w32, w33 = w[3, j0], w[3, j0 + 1], w[3, j0 + 2], w[3, j0 + 3]
            h0, h1, h2, h3 = part[j0], part[j0 + 1], part[j0 + 2], part[j0 + 3]
            if group == 4:
                for c in range(dim):
                    a0, a1, a2, a3 = f0[c], f1[c], f2[c], f3[c]
                    h0[c] += w00 * a0 + w10 * a1 + w20 * a2 + w30 * a3
                    h1[c] += w01 * a0 + w11 * a1 + w21 * a2 + w31 * a3
                    h2[c] += w02 * a0 + w12 * a1 + w22 * a2 + w32 * a3
                    h3[c] += w03 * a0 + w13 * a1 + w23 * a2 + w33 * a3
                continue
            # 8 rows: one read and one write of the sums per 8 rows
            f4, f5, f6, f7 = rows[4], rows[5], rows[6], rows[7]
            w40, w41, w42, w43 = w[4, j0], w[4, j0 + 1], w[4, j0 + 2], w[4, j0 + 3]
            w50, w51, w52, w53 = w[5, j0], w[5, j0 + 1], w[5, j0 + 2], w[5, j0 + 3]
            w60, w61, w62, w63 = w[6, j0], w[6, j0 + 1], w[6, j0 + 2], w[6, j0 + 3]
            w70, w71, w72, w73 = w[7, j0], w[7, j0 + 1], w[7, j0 + 2], w[7, j0 + 3]
            for c in range(dim):
                a0, a1, a2, a3 = f0[c], f1[c], f2[c], f3[c]
                a4, a5, a6, a7 = f4[c], f5[c], f6[c], f7[c]
                h0[c] += (w00 * a0 + w10 * a1 + w20 * a2 + w30 * a3) + (
                    w40 * a4 + w50 * a5 + w60 * a6 + w70 * a7
                )
                h1[c] += (w01 * a0 + w11 * a1 + w21 * a2 + w31 * a3) + (
                    w41 * a4 + w51 * a5 + w61 * a6 + w71 * a7
                )
                h2[c] += (w02 * a0 + w12 * a1 + w22 * a2 + w32 * a3) + (
                    w42 * a4 + w52 * a5 + w62 * a6 + w72 * a7
                )
                h3[c] += (w03 * a0 + w13 * a1 + w23 * a2 + w33 * a3) + (
                    w43 * a4 + w53 * a5 + w63 * a6 + w73 * a7
                )
        since += group
        if since >= LIFTED_FLUSH_ROWS or r0 + group >= m:
            for j in range(kp):
                pj, oj = part[j], out[j]
                for c in range(dim):
                    oj[c] += pj[c]
                    pj[c] = 0.0
            since = 0
