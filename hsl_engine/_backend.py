"""Array backend and the parallel chunk reducer of the hot loop.

NumPy is the only backend shipped today; asking for ``cuda`` fails with a clear `DeviceError`.
The chunk kernels (`hsl_engine._operator`, the sample streams) call NumPy directly since
engine 0.2; ``xp`` is kept for the feature maps, and a GPU backend would route those kernels
and the chunk loop below through it.

On the CPU the hot loop is a sum over chunks of samples. BLAS alone parallelises each GEMM, but
the elementwise work between GEMMs (and the regeneration of streamed samples) is
single-threaded in NumPy; running chunks in threads (NumPy releases the GIL) with
single-threaded BLAS keeps every core busy. The partial sums are added in chunk order, so
results do not depend on the thread count.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import array_api_compat.numpy as np_xp
from threadpoolctl import ThreadpoolController

from ._errors import DeviceError

_CONTROLLER: ThreadpoolController | None = None
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _controller() -> ThreadpoolController:
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Backend:
    """Where and how the hot loop runs.

    Attributes
    ----------
    name : str
        ``"cpu"`` (NumPy).
    xp : module
        The array namespace.
    threads : int
        Worker threads for chunk-parallel reductions.
    sample_budget_bytes : float or None
        Memory for training samples kept between passes, per seed; None: the engine default
        (`hsl_engine._data.SAMPLE_BUDGET_BYTES`). Beyond it samples are regenerated.
    """

    name: str
    xp: Any
    threads: int
    sample_budget_bytes: float | None = None

    @property
    def device(self) -> str:
        """The device that computes, as recorded with every point (``"cpu"``)."""
        return self.name

    @property
    def array_backend(self) -> str:
        """The array library of the hot loop, as recorded with every point (``"numpy"``)."""
        return "numpy"

    def map_ordered(self, func: Callable[[int], Any], count: int) -> list[Any]:
        """``[func(i) for i in range(count)]``, computed in ``threads`` threads with
        single-threaded BLAS (each result is the same whatever the thread count)."""
        with single_threaded_blas():
            if self.threads <= 1 or count <= 1:
                return [func(i) for i in range(count)]
            return list(_pool(self.threads).map(func, range(count)))

    def ordered_sum(self, func: Callable[[int], tuple[Any, ...]], count: int) -> tuple[Any, ...]:
        """``sum(func(i) for i in range(count))`` elementwise over tuples of arrays.

        The items run in ``threads`` threads with single-threaded BLAS, but their results are
        added strictly in index order, so the sum is the same bit for bit whatever the thread
        count. At most ``2 * threads`` items are in flight (results wait for their turn).
        """
        if count == 0:
            raise ValueError("ordered_sum needs at least one item")
        if self.threads <= 1 or count == 1:
            # single-threaded BLAS here too: a GEMM's rounding can depend on BLAS threading
            with single_threaded_blas():
                total = func(0)
                for i in range(1, count):
                    total = _add(total, func(i))
            return total
        pool = _pool(self.threads)
        window = 2 * self.threads
        with single_threaded_blas():
            pending = [pool.submit(func, i) for i in range(min(window, count))]
            total = None
            for i in range(count):
                part = pending[i].result()
                pending[i] = None  # free the result once added
                if i + window < count:
                    pending.append(pool.submit(func, i + window))
                total = part if total is None else _add(total, part)
        return total


_BLAS_LOCK = threading.Lock()
_BLAS_DEPTH = 0
_BLAS_LIMIT: Any = None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS limited to one thread while any caller is inside (re-entrant, thread-safe).

    Every per-chunk computation runs under it, so its rounding never depends on how many
    threads BLAS would have used; the parallelism comes from the chunk threads instead.
    """
    global _BLAS_DEPTH, _BLAS_LIMIT
    with _BLAS_LOCK:
        if _BLAS_DEPTH == 0:
            _BLAS_LIMIT = _controller().limit(limits=1, user_api="blas")
        _BLAS_DEPTH += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_DEPTH -= 1
            if _BLAS_DEPTH == 0:
                _BLAS_LIMIT.restore_original_limits()
                _BLAS_LIMIT = None


def _add(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x + y for x, y in zip(a, b))


def _pool(size: int) -> ThreadPoolExecutor:
    # one long-lived pool per size: starting threads on every operator pass costs ~5 ms
    pool = _POOLS.get(size)
    if pool is None:
        pool = _POOLS[size] = ThreadPoolExecutor(size, thread_name_prefix="hsl-chunk")
    return pool


def get_backend(
    device: str, *, threads: int | None = None, sample_budget_bytes: float | None = None
) -> Backend:
    """Resolve a spec's ``device`` to a backend.

    Raises
    ------
    DeviceError
        For ``"cuda"``: this release has no GPU backend.
    """
    if device in ("auto", "cpu"):
        return Backend("cpu", np_xp, threads or available_cores(), sample_budget_bytes)
    if device == "cuda":
        raise DeviceError(
            "device 'cuda' is not available: this hsl_engine release ships the NumPy (CPU) "
            "backend only; use device 'cpu' or 'auto'"
        )
    raise DeviceError(f"unknown device {device!r}; expected 'auto', 'cpu' or 'cuda'")
