"""Array backends (NumPy on the CPU; PyTorch on the CPU or CUDA) and the chunk reducer.

One code path: the hot loops (sample streams, moment operator, eigensolver basis algebra,
projections, second layer, readout, kernel baselines) are written against the array namespace
``backend.xp`` (array-api-compat) plus the few helpers of `Backend` (device placement, host
copies, keyed device generators). NumPy and PyTorch run the same lines.

On the CPU the hot loop is a sum over chunks of samples. BLAS alone parallelises each GEMM, but
the elementwise work between GEMMs (and the regeneration of streamed samples) is
single-threaded in NumPy; running chunks in threads (NumPy releases the GIL) with
single-threaded BLAS keeps every core busy. The partial sums are added in chunk order, so
results do not depend on the thread count.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import array_api_compat.numpy as np_xp
import numpy as np
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
    """Where and how the hot loop runs: the device, the array library and its threads.

    Attributes
    ----------
    name : str
        The device: ``"cpu"`` or ``"cuda:N"``.
    xp : module
        The array namespace (array-api-compat's NumPy or PyTorch namespace).
    threads : int
        Worker threads for chunk-parallel reductions (NumPy); PyTorch uses its own.
    sample_budget_bytes : float or None
        Memory for training samples kept between passes, per seed; None: the engine default
        (`hsl_engine._data.SAMPLE_BUDGET_BYTES`). Beyond it samples are regenerated.
    library : str
        ``"numpy"`` or ``"torch"``.
    device_streams : bool
        Draw training samples with the device's own generator (PyTorch, chunk-keyed like the
        NumPy streams) instead of NumPy's. On by default on CUDA, where nothing but results
        should cross the bus; on the CPU the NumPy streams are used, so the PyTorch backend
        sees the very samples NumPy sees.
    """

    name: str
    xp: Any
    threads: int
    sample_budget_bytes: float | None = None
    library: str = "numpy"
    device_streams: bool = False

    @property
    def device(self) -> str:
        """The device that computes, as recorded with every point (``"cpu"``, ``"cuda:0"``)."""
        return self.name

    @property
    def array_backend(self) -> str:
        """The array library of the hot loop, as recorded with every point."""
        return self.library

    @property
    def is_torch(self) -> bool:
        return self.library == "torch"

    @property
    def torch_device(self):
        import torch

        return torch.device(self.name)

    # -- arrays -------------------------------------------------------------------------------
    def dtype(self, name) -> Any:
        """The backend's dtype for a NumPy dtype or its name (``"float32"``, ``np.float64``)."""
        key = np.dtype(name).name
        if not self.is_torch:
            return np.dtype(key)
        import torch

        return {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}[key]

    def asarray(self, a, dtype=None):
        """``a`` (NumPy, PyTorch or a scalar/list) as a backend array on its device."""
        if not self.is_torch:
            return np.asarray(a, dtype=None if dtype is None else np.dtype(dtype))
        import torch

        want = None if dtype is None else self.dtype(dtype)
        if isinstance(a, torch.Tensor):
            return a.to(device=self.torch_device, dtype=want or a.dtype)
        host = np.asarray(a)
        if not host.flags.writeable:  # PyTorch wants writable memory to share
            host = host.copy()
        return torch.as_tensor(host, device=self.torch_device, dtype=want)

    def to_numpy(self, a) -> np.ndarray:
        """A host NumPy copy (or view) of a backend array."""
        if self.is_torch and not isinstance(a, np.ndarray):
            return a.detach().to("cpu").numpy()
        return np.asarray(a)

    def zeros(self, shape, dtype=np.float64):
        return self.xp.zeros(shape, dtype=self.dtype(dtype), **self._on())

    def eye(self, n: int, dtype=np.float64):
        return self.xp.eye(n, dtype=self.dtype(dtype), **self._on())

    def _on(self) -> dict[str, Any]:
        return {"device": self.torch_device} if self.is_torch else {}

    def generator(self, seq: np.random.SeedSequence):
        """The device's generator keyed by ``seq`` (NumPy: PCG64; PyTorch: the device's own
        generator, seeded with 63 bits of ``seq``'s state)."""
        if not self.is_torch:
            return np.random.default_rng(seq)
        import torch

        gen = torch.Generator(device=self.torch_device)
        gen.manual_seed(int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        return gen

    def standard_normal(self, gen, shape: tuple[int, ...]):
        """Standard normal float64 draws of ``shape`` from a `generator`."""
        if not self.is_torch:
            return gen.standard_normal(shape)
        import torch

        return torch.randn(shape, generator=gen, dtype=torch.float64, device=self.torch_device)

    def synchronize(self) -> None:
        """Wait for queued device work (timings on CUDA)."""
        if self.is_torch and self.name.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.torch_device)

    # -- parallel reductions --------------------------------------------------------------------
    def map_ordered(self, func: Callable[[int], Any], count: int) -> list[Any]:
        """``[func(i) for i in range(count)]``, computed in ``threads`` threads with
        single-threaded BLAS (each result is the same whatever the thread count). PyTorch
        runs the items in order: its kernels are parallel (CPU threads or the GPU) already."""
        if self.is_torch:
            return [func(i) for i in range(count)]
        with single_threaded_blas():
            if self.threads <= 1 or count <= 1:
                return [func(i) for i in range(count)]
            return _ordered_sum_threads(func, count, [], _append, self.threads)

    def ordered_sum(
        self,
        func: Callable[[int], tuple[Any, ...]],
        count: int,
        initial: tuple[Any, ...] | None = None,
        release: Callable[[tuple[Any, ...]], None] | None = None,
    ) -> tuple[Any, ...]:
        """``sum(func(i) for i in range(count))`` elementwise over tuples of arrays, added to
        ``initial`` if given (NumPy: in place, into its arrays).

        The items run in ``threads`` threads with single-threaded BLAS, but their results are
        added strictly in index order, so the sum is the same bit for bit whatever the thread
        count. At most ``2 * threads`` results wait for their turn (`_ordered_sum_threads`).
        PyTorch adds them in order in this thread. With ``initial`` the additions are
        ``((initial + f(0)) + f(1)) + ...``: a running sum continued over more items rounds as
        one made in a single call. ``release(part)``, if given, is called once each item's
        result has been added (its arrays are free to reuse).
        """
        if count == 0:
            raise ValueError("ordered_sum needs at least one item")
        total = initial

        def add(total, part):
            total = _accumulate(total, part)
            if release is not None:
                release(part)
            return total

        if self.is_torch:
            for i in range(count):
                total = add(total, func(i))
            return total
        if self.threads <= 1 or count == 1:
            # single-threaded BLAS here too: a GEMM's rounding can depend on BLAS threading
            with single_threaded_blas():
                for i in range(count):
                    total = add(total, func(i))
            return total
        with single_threaded_blas():
            return _ordered_sum_threads(func, count, total, add, self.threads)


def _append(results: list, result) -> list:
    results.append(result)
    return results


def _ordered_sum_threads(func, count: int, total, add, threads: int):
    """``add(... add(add(total, func(0)), func(1)) ..., func(count - 1))`` in ``threads``
    threads: this one and ``threads - 1`` of the pool (`Backend.ordered_sum`, and
    `Backend.map_ordered` with a list for ``total``).

    Each thread takes the next item, computes it, and then adds every result that is next in
    index order (under a lock, so one thread adds at a time): the items are added strictly in
    order without a thread that only collects them. (Until 2026-12-06 the pool ran every item
    and this thread added the results: per item a wake-up of this thread and a hand-over of the
    GIL; a lifted pass's worker waited 36-62 us between two chunks of ~1.4 ms, against a median
    of 11-32 us now, and a pass of 4 vectors at n = 216000 took 1.06x as long: README
    "Performance".)
    A thread waits before taking an item more than ``2 * threads`` ahead of the next to add,
    so at most that many results are held. An error stops every thread taking items and is
    raised here once all have stopped. This thread takes items too, so the sum progresses even
    when every pool thread is busy (a call from inside an item cannot deadlock).
    """
    window = 2 * threads
    state = {"take": 0, "add": 0, "total": total, "error": None}
    ready: dict[int, Any] = {}
    turn = threading.Condition()

    def fail(exc: BaseException) -> None:  # with ``turn`` held: the first error wins
        if state["error"] is None:
            state["error"] = exc
        turn.notify_all()

    def work() -> None:
        while True:
            with turn:
                while state["error"] is None and state["take"] - state["add"] >= window:
                    turn.wait()
                if state["error"] is not None or state["take"] >= count:
                    return
                i = state["take"]
                state["take"] = i + 1
            try:
                part = func(i)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                with turn:
                    fail(exc)
                return
            with turn:
                ready[i] = part
                while state["add"] in ready and state["error"] is None:
                    try:
                        state["total"] = add(state["total"], ready.pop(state["add"]))
                    except BaseException as exc:  # noqa: BLE001
                        fail(exc)
                        break
                    state["add"] += 1
                turn.notify_all()

    helpers = [_pool(threads - 1).submit(work) for _ in range(threads - 1)]
    try:
        work()
    except BaseException as exc:  # an interrupt while waiting: the helpers stop too
        with turn:
            fail(exc)
    for helper in helpers:
        # a helper still queued (its pool thread busy: a call from inside an item) has
        # nothing left to take: withdrawn rather than waited for
        if not helper.cancel():
            helper.result()
    if state["error"] is not None:
        raise state["error"]
    return state["total"]


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


def _accumulate(total: tuple[Any, ...] | None, part: tuple[Any, ...]) -> tuple[Any, ...]:
    """``total + part`` elementwise, written into ``total``'s NumPy arrays where the sum keeps
    their type (the same rounding as ``x + y``, without a fresh array per item). The first
    part is copied: ``func`` may hand out arrays it keeps."""
    if total is None:
        return tuple(x.copy() if isinstance(x, np.ndarray) else x for x in part)
    out = []
    for x, y in zip(total, part):
        if isinstance(x, np.ndarray) and np.result_type(x, y) == x.dtype:
            np.add(x, y, out=x)
            out.append(x)
        else:
            out.append(x + y)
    return tuple(out)


def _pool(size: int) -> ThreadPoolExecutor:
    # one long-lived pool per size: starting threads on every operator pass costs ~5 ms
    pool = _POOLS.get(size)
    if pool is None:
        pool = _POOLS[size] = ThreadPoolExecutor(size, thread_name_prefix="hsl-chunk")
    return pool


def to_host(a) -> np.ndarray:
    """A NumPy copy (or view) of a NumPy or PyTorch array, wherever it lives."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):
        return a.detach().to("cpu").numpy()
    return np.asarray(a)


# NumPy 2 is an array API namespace itself: the hot loop calls it directly, without the
# compatibility layer's Python wrappers (measured ~7 % of a q = 2 operator pass at d = 60)
NUMPY_XP = np if hasattr(np, "astype") and hasattr(np.linalg, "vector_norm") else np_xp


def numpy_backend(threads: int | None = None) -> Backend:
    """The NumPy (CPU) backend."""
    return Backend("cpu", NUMPY_XP, threads or available_cores())


def torch_available() -> bool:
    """Whether PyTorch can be imported here (the ``gpu`` extra)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# Device files a Linux machine with a GPU that PyTorch could use has: NVIDIA's driver
# (/dev/nvidiactl, also inside containers given a GPU), WSL 2's GPU paravirtualisation
# (/dev/dxg), AMD's ROCm (/dev/kfd, whose PyTorch builds answer as torch.cuda)
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")


def gpu_absent() -> bool:
    """True where this is Linux and none of `GPU_DEVICE_FILES` exists: no GPU PyTorch could
    use, known without importing PyTorch (1-2 s, which every ``hsl run`` with device
    ``auto`` paid on a CPU-only machine). Elsewhere (macOS, Windows) False: ask PyTorch."""
    return sys.platform.startswith("linux") and not any(
        os.path.exists(path) for path in GPU_DEVICE_FILES
    )


def cuda_devices() -> int:
    """CUDA devices PyTorch sees here (0 without PyTorch or without a GPU; on Linux without
    a GPU's device files, `gpu_absent`, PyTorch is not imported)."""
    if gpu_absent() or not torch_available():
        return 0
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def cuda_memory_bytes(index: int = 0) -> int | None:
    """Total memory of CUDA device ``index``, or None where there is none."""
    if cuda_devices() <= index:
        return None
    import torch

    return int(torch.cuda.get_device_properties(index).total_memory)


def resolve_device(device: str) -> str:
    """A spec's ``device`` made concrete: ``auto`` is ``cuda:0`` where CUDA is available,
    else ``cpu``; ``cuda`` is ``cuda:0``. Raises `DeviceError` for a CUDA device this
    machine does not have."""
    if device == "auto":
        return "cuda:0" if cuda_devices() > 0 else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        index = int(device.partition(":")[2] or 0)
        if not torch_available():
            raise DeviceError(
                f"device {device!r} needs PyTorch with CUDA, which is not installed here "
                "(install the 'gpu' extra on a machine with an NVIDIA GPU), or use device "
                "'cpu' or 'auto'"
            )
        count = cuda_devices()
        if count == 0:
            raise DeviceError(
                f"device {device!r} is not available: PyTorch sees no CUDA device on this "
                "machine; use device 'cpu' or 'auto'"
            )
        if index >= count:
            raise DeviceError(
                f"device {device!r} is not available: this machine has {count} CUDA "
                f"device(s), cuda:0..cuda:{count - 1}"
            )
        return f"cuda:{index}"
    raise DeviceError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def get_backend(
    device: str = "auto",
    *,
    backend: str = "auto",
    threads: int | None = None,
    sample_budget_bytes: float | None = None,
    device_streams: bool | None = None,
    tf32: bool = False,
) -> Backend:
    """Resolve a spec's ``device`` and ``solver.backend`` to a backend.

    ``backend="auto"`` is NumPy on the CPU and PyTorch on CUDA. ``device_streams`` (default:
    on for CUDA only) draws training samples with the device's generator.

    Raises
    ------
    DeviceError
        For a CUDA device this machine lacks, NumPy asked to run on CUDA, or PyTorch asked
        for where it is not installed.
    """
    # NumPy runs on the CPU only: with it, "auto" is the CPU even where CUDA is present
    name = "cpu" if (backend == "numpy" and device == "auto") else resolve_device(device)
    library = backend if backend != "auto" else ("torch" if name.startswith("cuda") else "numpy")
    if library == "numpy":
        if name != "cpu":
            raise DeviceError(f"backend 'numpy' runs on the CPU only, not on {name!r}")
        return replace(numpy_backend(threads), sample_budget_bytes=sample_budget_bytes)
    if library != "torch":
        raise DeviceError(f"unknown backend {backend!r}; expected 'auto', 'numpy' or 'torch'")
    if not torch_available():
        raise DeviceError(
            "backend 'torch' needs PyTorch, which is not installed here: "
            "pip install 'hsl[gpu]' (or torch==2.13.0 for the CPU build)"
        )
    import array_api_compat.torch as torch_xp
    import torch

    if name.startswith("cuda"):
        # TF32 only when a spec asks for it: it rounds float32 products to ~1e-3
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)
    streams = name.startswith("cuda") if device_streams is None else bool(device_streams)
    return Backend(
        name,
        torch_xp,
        threads or available_cores(),
        sample_budget_bytes,
        library="torch",
        device_streams=streams,
    )


def spec_backend(spec, **kwargs) -> Backend:
    """The backend a spec asks for (``device``, ``solver.backend``, ``solver.tf32``)."""
    return get_backend(spec.device, backend=spec.solver.backend, tf32=spec.solver.tf32, **kwargs)
