"""Compiled CPU kernels (Numba): the row-wise step between the GEMMs of the q = 2 matrix form.

NumPy runs ``x^T G_j x`` per row and the weighted rows as several passes over (rows, k, d)
temporaries; this loop makes one pass while the GEMM's output is in cache. It is compiled at
its first call, once per dtype, and releases the GIL (the chunk threads run it). (The lifted
form's pass and the q = 2 hidden features are explicit vector code: `hsl_engine._simd`.)
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
    then: it vectorises straight-line code (engine 0.8.0's lifted pass needed it; the
    setting stays so that a kernel compiles the same way whatever else the process
    compiled). Each new signature is compiled under Numba's compiler lock with the setting
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
