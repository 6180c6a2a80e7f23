"""The q = 2 moment operator's CPU pass as explicit vector code: LLVM IR built with llvmlite
(Numba's code generator, so no compiler is needed) and compiled for this CPU at first use.

Why not Numba: its loops are vectorised by LLVM's auto-vectoriser, which on this kind of CPU
picks 256-bit vectors, cannot keep a tile of accumulators in registers across two loops, and
so made the lifted pass write every row's features to memory and read them back twice (the
pass was bound by L1/L2 traffic at 20-40 % of the GEMM peak; see README "Performance"). Here
the vector width, the register tiles and the order of every floating-point operation are
written out, so the pass needs no reassociation flags and rounds the same way on every run.

**Cyclic layout.** The kernels do not use the lifted coordinates' segment order (``(a, a),
(a, a + 1), ... (a, d - 1)`` for each a) but a cyclic one: shift ``s = 0 .. d // 2`` holds
the products ``x_a x_((a + s) mod d)`` for ``a = 0 .. d - 1``, padded with zero vector entries
to ``dp`` (a multiple of the vector width). Every shift is then the same length, and its
features are one elementwise product of the row with itself shifted by s: no short segments,
no remainder loops, and the features never touch memory. Shift 0 is the Hermite diagonal
``(x_a^2 - 1)/sqrt 2``; for even d the last shift holds each of its pairs twice, and only the
first half is used. A vector is stored lane block by lane block (all shifts of lanes 0 ..
lanes - 1, then of the next lanes), so the pass reads each block's slice contiguously.
`CyclicLayout.positions` maps the segment order to this layout (the operator scatters its
vectors into it and gathers the result back, about D k numbers a pass).

**The pass** (`LiftedPass`), over blocks of ``rows`` samples (their inputs, each repeated to
``dp + d // 2`` entries so that a shifted row is a plain vector load, fit in L1 up to d of
about 120; larger d keeps `MIN_BLOCK_ROWS` rows, whose inputs sit in L2):

The vectors go in groups of 4, then one group of the 1 to 3 left with code of its own (tiles
of fewer vectors and more shifts or lane blocks): a pass on k vectors does the work of k.
Each block starts by copying its rows' inputs, repeated, into scratch (whole vectors; rows
past the last sample are zeros); up to d = `PREFETCH_MAX_D`, its dot products prefetch the
next block's inputs, a few cache lines per register tile of rows.

The register tiles below are those for 32 vector registers (AVX-512, ARM); with 16 (AVX2,
AVX) they are smaller, so that nothing spills (`dot_rows`, `weighted_tiles`). No tile shape
changes a number: every accumulator sums the same products in the same order.

1. dot products ``F(x_i) . v_j``, 4 vectors at a time, one lane block at a time (the 4
   vectors' slice of that block over all shifts stays in L1 while the block's rows use it),
   6 rows at a time (2 with 16 registers): ``t_rj = sum_s x_r(a + s) v_j(s, a)`` in 24
   (8) vector accumulators (per shift 4 loads of the vectors, then per row one shifted
   input and 4 fused multiply-adds), then ``x_r(a) t_rj`` and the diagonal's term go into
   the rows' vector sums, kept between lane blocks; one tree sum per row and vector at the
   end;
2. the weights ``w_ij = y_i (F(x_i) . v_j)`` (labels beyond the last sample are 0);
3. the weighted rows ``sum_r w_rj x_r(a) x_r(a + s)``: the diagonal (shift 0) in tiles of
   4 lane blocks x 4 vectors (2 x 4 with 16 registers); the other shifts lane block by lane
   block, first ``u_rj = w_rj x_r(a)`` for every row (into scratch, in L1), then tiles of 6
   shifts x 4 vectors, 24 accumulators over the block's rows (with 16 registers: 6 shifts x
   2 vectors, 12 accumulators, twice), rows innermost: per row the tile's loads of ``u``
   and of the shifted input, then fused multiply-adds and no other arithmetic; each tile
   then added into the float64 sums. (Engine 0.9.0 formed ``x_r(a) x_r(a + s)`` per row
   and lane block and multiplied it by the weights: one product per 4 multiply-adds, so that
   step ran at 65-68 % of one core's FMA peak against 72 % now; see README "Performance".)

Sums of products over a block's rows, and the dot products over D, are in the input type
(float32 or float64), each lane in a fixed order; the float64 sums take the blocks in row
order. So the numbers depend on the rows given (blocks start at the first), and on the CPU's
vector width and d, which fix the lanes (`pass_lanes`): not on threads, on the run, or on
what else the process compiled. Measured on one core of the development machine (d = 60,
16384 rows, 4 vectors; README "Performance"): engine 0.9.0's pass was 2.0-2.6x as fast as
engine 0.8.0's Numba pass in float32, 1.6-2.3x in float64, and 1.7-2.2x at d = 120 to 400;
engine 0.10.0's weighted rows make it 1.03-1.08x faster again on one core and 1.00-1.11x on
two (d = 60 to 400), and its width rule 1.05x where it takes half the width. Engine 0.11.0,
measured on one core of an Intel Xeon (Emerald Rapids, two 512-bit FMA units): 64-byte
aligned arrays, the lane-block layout, blocks of at least 64 rows and the full width on
CPUs that do not split it make the pass 1.14-1.19x (d = 60 float32) to 2.1-2.5x (d = 400)
faster than 0.10.0's there (two interleaved runs); a group of 1 to 3 vectors costs
0.55-0.8x a group of 4. On an AMD EPYC Zen 3 (AVX2: 16 registers of 8 float32), the tiles
for 32 registers spilled accumulators to the stack in every inner loop; the tiles for 16
made one core's pass 1.7-2.1x faster (d = 60 float32, 4 vectors, 42.7 against 73.0
GFLOP/s; d = 120 to 400 both types 1.9-2.1x), the same numbers bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass

import numpy as np

# Bytes of input rows a block keeps (in L1 with the kernel's other data)
BLOCK_INPUT_BYTES = 28 * 1024
# A block has at least this many rows, so that adding its sums into the float64 vectors
# (kp x D numbers read and written once a block) stays a small part of the work. With 16,
# d = 250-400 (11-16 rows of inputs in L1) spent as much on those additions as on the
# multiply-adds; with 64 (inputs in L2) one core ran 1.27-1.5x faster there (d = 400 float32
# 113 against 75 GFLOP/s, 96 rows 119, 128 rows 109), the same at d = 60 and 120.
MIN_BLOCK_ROWS = 64

# Up to this d, the dots of a block prefetch the next block's inputs (`LiftedPass`): a block's
# work is short there, and its rows' inputs, read from a chunk in L3 or memory when the block
# starts, stalled the pass. Measured on an Intel Xeon (two 512-bit multiply-add units), two
# threads over 53 distinct chunks, the same numbers bit for bit, best of 9 interleaved: d = 60
# float32 1.05x (258 -> 270 GFLOP/s), float64 1.06x, d = 120 1.04x (both types), d = 200
# 1.03-1.04x; d = 300 float32 1.00x, d = 400 float64 0.97-1.01x, float32 0.98x (likely
# because a block's work is long there and its inputs already come from L2; not measured).
PREFETCH_MAX_D = 200

# Every array the pass loads whole vectors from, other than its shifted inputs, starts on a
# 64-byte boundary (a cache line, and one AVX-512 register), so those loads never straddle two
# lines. NumPy gives 16-byte alignment only. Measured on one core of an Intel Xeon (Emerald
# Rapids, whose 512-bit loads that straddle lines cost about twice as much), d = 60, float32,
# 4 vectors, interleaved: 116 against 94 GFLOP/s for arrays 16 or 48 bytes past a line.
ALIGNMENT = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data start on an `ALIGNMENT`-byte boundary."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + count * dtype.itemsize].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype) -> np.ndarray:
    """`aligned_empty`, filled with zeros."""
    out = aligned_empty(shape, dtype)
    out.fill(0)
    return out


def vector_bytes() -> int:
    """The widest vector registers of this CPU, in bytes (64 with AVX-512, 32 with AVX, 16
    otherwise: SSE, NEON)."""
    import llvmlite.binding as ll

    features = ll.get_host_cpu_features()
    if features.get("avx512f"):
        return 64
    if features.get("avx"):
        return 32
    return 16


@functools.cache
def vector_registers() -> int:
    """Vector registers of this CPU: 32 with AVX-512 (or on ARM), 16 with AVX2/AVX or SSE."""
    import llvmlite.binding as ll

    if ll.get_host_cpu_features().get("avx512f") or not _is_x86():
        return 32
    return 16


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


# Accumulators of a register tile with 32 vector registers: with the tile's operands (at most
# 4 vectors and one shifted input) 29 registers live. Tiles of 16 loaded 0.5 vectors per
# multiply-add, tiles of 24 0.42: on one core of an Intel Xeon (two 512-bit multiply-add
# units) the pass ran 1.02-1.06x faster (d = 60 float32 4 vectors 143 -> 148 GFLOP/s, float64
# 74 -> 77, d = 400 float64 79 -> 84; interleaved runs, the same numbers bit for bit).
TILE_ACCUMULATORS = 24


def dot_rows(group: int, registers: int) -> int:
    """Rows per register tile of the dot products for a group of 1 to 4 vectors: with 32
    registers `TILE_ACCUMULATORS` // group (6 rows for 4 vectors: 24 accumulators, 4 vectors
    and one shifted input live); 8 for one vector (8 independent sums keep both multiply-add
    units busy through their 4-cycle latency; more were not faster: the one-vector group is
    bound by its loads); with 16 registers 2 rows for 4 vectors (8 accumulators, 4 vectors
    and one input live: 13), else 4. Rows past the block's last whole tile run in a smaller
    one."""
    if group == 1:
        return 8
    if registers >= 32:
        return TILE_ACCUMULATORS // group
    return 2 if group == 4 else 4


def weighted_tiles(group: int, registers: int) -> tuple[int, int, int]:
    """Register tiles of the weighted rows for a group of 1 to 4 vectors: (vectors per tile
    of the shifts, shifts per such tile, lane blocks per tile of the diagonal).

    With 32 registers, `TILE_ACCUMULATORS`: the group's vectors x 24 / group shifts (the
    diagonal, a small part of the work, in tiles of 16 / group lane blocks). With 16: the
    shifts in tiles of 12 accumulators (a group of 4 as two tiles of 2 vectors x 6 shifts:
    12 + 2 vectors' u + one shifted input live), the diagonal in tiles of 8 (its Hermite
    feature needs two constants and a product per lane block and row)."""
    if registers >= 32:
        return group, TILE_ACCUMULATORS // group, 16 // group
    if group == 3:
        return 3, 3, 2
    vectors = 2 if group == 4 else group
    return vectors, 12 // vectors, 8 // group


@functools.cache
def lanes(dtype_name: str) -> int:
    """Numbers of ``dtype`` per vector register on this CPU."""
    return vector_bytes() // np.dtype(dtype_name).itemsize


# CPUs (LLVM's names) that execute their widest vectors as two halves, so that half-width
# vectors reach the same multiply-add peak: AMD Zen 4 (AVX-512 as two 256-bit halves)
SPLIT_WIDE_CPUS = frozenset({"znver4"})


@functools.cache
def splits_wide_vectors() -> bool:
    """Whether this CPU runs its widest vectors as two halves (`SPLIT_WIDE_CPUS`)."""
    import llvmlite.binding as ll

    return ll.get_host_cpu_name() in SPLIT_WIDE_CPUS


def pass_lanes(d: int, dtype_name: str, split: bool | None = None) -> int:
    """Numbers per vector of the pass for inputs of dimension d: this CPU's widest registers,
    or, on a CPU that runs them as two halves (``split``; default `splits_wide_vectors`), half
    that width where it pads d to fewer numbers (d = 120 in float32 with AVX-512: 120 numbers
    a shift against 128; d = 60 in float64: 60 against 64).

    Measured on one core, 4 vectors, the two widths interleaved:
    - AMD EPYC Zen 4 (AVX-512 as two 256-bit halves; best of 40): half width 1.05x faster at
      d = 120 float32 and d = 60 float64; where both widths pad alike (d = 60 float32,
      d = 120 and 400 float64) the wider was as fast or faster (up to 1.4x);
    - Intel Xeon Emerald Rapids (two full 512-bit multiply-add units; best of 20): the full
      width 1.41-1.64x faster at d = 120 float32, d = 60 float32 and float64, d = 400
      float64, padding or not.
    The choice depends on d and the CPU only, so the numbers stay deterministic."""
    wide = lanes(dtype_name)
    half = wide // 2
    if split is None:
        split = splits_wide_vectors()
    if split and half >= 2 and -(-d // half) * half < -(-d // wide) * wide:
        return half
    return wide


@dataclass(frozen=True)
class CyclicLayout:
    """The cyclic padded layout of the q = 2 lifted coordinates for inputs of dimension d.

    Attributes
    ----------
    d, lanes : int
    padded : int
        ``dp``: each shift's length, d rounded up to a multiple of ``lanes``.
    shifts : int
        ``d // 2 + 1``.
    width : int
        ``shifts * padded``: the length of a vector in this layout.
    positions : ndarray, shape (D,)
        Position in this layout of each lifted coordinate in segment order
        (`hsl_engine._features.lift`).

    A vector is stored lane block by lane block: block ``a // lanes`` holds every shift's
    numbers for lanes ``a`` of that block, shift after shift (`index`). So the slice that the
    pass reads for one lane block is contiguous. (Shift-major order, ``s * dp + a``, put it at
    a stride of ``dp`` numbers: at d = 120 in float32 every load of a 4-vector slice fell in
    the same sixteenth of the L1 sets. Lane-block order made the pass 1.19x faster there on one
    core of an Intel Xeon, the same numbers bit for bit; README "Performance".)
    """

    d: int
    lanes: int
    padded: int
    shifts: int
    width: int
    positions: np.ndarray

    def index(self, s: int, a: int) -> int:
        """Position of shift s, lane a (``0 <= a < padded``)."""
        return _index(s, a, self.lanes, self.shifts)

    def shift_and_lane(self, p: int) -> tuple[int, int]:
        """The inverse of `index`: (s, a) at position p."""
        block, rest = divmod(int(p), self.shifts * self.lanes)
        s, lane = divmod(rest, self.lanes)
        return s, block * self.lanes + lane


@functools.cache
def cyclic_layout(d: int, lanes_: int) -> CyclicLayout:
    padded = -(-d // lanes_) * lanes_
    shifts = d // 2 + 1
    positions = np.empty(d * (d + 1) // 2, np.int64)
    i = 0
    for a in range(d):
        positions[i] = _index(0, a, lanes_, shifts)  # the diagonal: shift 0
        i += 1
        for b in range(a + 1, d):
            s = b - a
            if s < d - s or (s == d - s and a < s):
                positions[i] = _index(s, a, lanes_, shifts)  # x_a x_(a + s)
            else:
                positions[i] = _index(d - s, b, lanes_, shifts)  # x_b x_(b + d - s mod d)
            i += 1
    positions.setflags(write=False)
    return CyclicLayout(d, lanes_, padded, shifts, shifts * padded, positions)


def _index(s: int, a: int, lanes_: int, shifts: int) -> int:
    # lane block a // lanes, then shift s, then lane a % lanes
    return (a // lanes_ * shifts + s) * lanes_ + a % lanes_


def block_rows(d: int, dtype_name: str, vector_lanes: int | None = None) -> int:
    """Rows per block: their repeated inputs in `BLOCK_INPUT_BYTES`, a multiple of 4, at least
    `MIN_BLOCK_ROWS`."""
    lay = cyclic_layout(d, vector_lanes or pass_lanes(d, dtype_name))
    row_bytes = _row_stride(lay) * np.dtype(dtype_name).itemsize
    return max(MIN_BLOCK_ROWS, (BLOCK_INPUT_BYTES // row_bytes) // 4 * 4)


def _row_stride(lay: CyclicLayout) -> int:
    # a block row: the input repeated over dp + shifts entries (shifted loads reach
    # dp - 1 + shifts - 1), rounded up to whole vectors
    return -(-(lay.padded + lay.shifts) // lay.lanes) * lay.lanes


class LiftedPass:
    """``out[j] += sum_i y_i (F(x_i) . v[j]) F(x_i)`` in the cyclic layout (module docstring),
    compiled for inputs of dimension ``d`` in ``dtype``.

    Call with x : (m, d) C-contiguous; y : (m,); v : (kp, width) C-contiguous, any kp >= 1
    (in groups of 4, then the 1 to 3 left, each group's own code), zero at the layout's
    unused positions; out : (kp, width) float64, added to (its
    unused positions receive sums of no meaning). x, y and v in ``dtype``. Releases the GIL.
    Any alignment works; v and out from `vectors` and `sums` (64-byte aligned) run fastest.
    """

    def __init__(
        self,
        d: int,
        dtype_name: str,
        vector_lanes: int | None = None,
        registers: int | None = None,
    ):
        import llvmlite.binding as ll

        if np.dtype(dtype_name) not in (np.float32, np.float64):
            raise ValueError(f"the lifted pass runs in float32 or float64, not {dtype_name}")
        self.d = d
        self.dtype = np.dtype(dtype_name)
        # numbers per vector: `pass_lanes` (from this CPU's registers) unless given (the tests
        # build the widths of other CPUs too; LLVM splits a vector wider than the registers)
        self.layout = cyclic_layout(d, vector_lanes or pass_lanes(d, dtype_name))
        self.rows = block_rows(d, dtype_name, self.layout.lanes)
        self.stride = _row_stride(self.layout)
        # register tiles for this CPU's vector registers unless given (the tests build both;
        # the tiles' shapes do not change a number)
        self.registers = registers or vector_registers()
        _initialise_llvm()
        source = _build(self.layout, self.dtype, self.rows, self.stride, self.registers)
        module = ll.parse_assembly(str(source))
        module.verify()
        machine = ll.Target.from_default_triple().create_target_machine(
            cpu=ll.get_host_cpu_name(), features=ll.get_host_cpu_features().flatten(), opt=3
        )
        builder = ll.create_pass_builder(machine, ll.create_pipeline_tuning_options(3))
        builder.getModulePassManager().run(module, builder)
        self._engine = ll.create_mcjit_compiler(module, machine)  # owns the machine code
        self._engine.finalize_object()
        pointer = ctypes.c_void_p
        signature = ctypes.CFUNCTYPE(None, *[pointer] * 2, ctypes.c_int64, pointer,
                                     ctypes.c_int64, *[pointer] * 4)  # fmt: skip
        # CFUNCTYPE calls release the GIL: chunks run in threads
        self._pass = signature(self._engine.get_function_address("lifted_q2_pass"))
        self._dots = signature(self._engine.get_function_address("lifted_q2_dots"))
        self._local = threading.local()  # per-thread scratch (`_scratch`)

    def __call__(self, x: np.ndarray, y: np.ndarray, v: np.ndarray, out: np.ndarray) -> None:
        self._check(x, v)
        if y.dtype != self.dtype or y.shape != (x.shape[0],) or not y.flags.c_contiguous:
            raise ValueError(f"y must be C-contiguous {self.dtype} of shape ({x.shape[0]},)")
        if out.dtype != np.float64 or out.shape != v.shape or not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous float64 of v's shape")
        if x.shape[0] == 0:
            return
        inputs, sums, weights = self._scratch(v.shape[0])
        self._pass(x.ctypes.data, y.ctypes.data, x.shape[0], v.ctypes.data, v.shape[0],
                   out.ctypes.data, inputs, weights, sums)  # fmt: skip

    def vectors(self, rows) -> np.ndarray:
        """Vectors given as rows (k, D) in segment order, in the pass's layout and type:
        shape (k, width)."""
        rows = np.asarray(rows)
        out = aligned_zeros((rows.shape[0], self.layout.width), self.dtype)
        out[:, self.layout.positions] = rows
        return out

    def coordinates(self, out: np.ndarray) -> np.ndarray:
        """The pass's sums (kp, width) back in segment order: shape (kp, D)."""
        return out[:, self.layout.positions]

    def dots(self, x: np.ndarray, v: np.ndarray) -> np.ndarray:
        """``F(x_i) . v[j]``, shape (m, kp), in the pass's type: its first step alone (the
        q = 2 hidden features, `hsl_engine._data.project`)."""
        self._check(x, v)
        m, kp = x.shape[0], v.shape[0]
        # whole blocks: the rows past m (zero inputs) write their dots into the padding
        out = np.empty((-(-m // self.rows) * self.rows, kp), self.dtype)
        if m:
            inputs, sums, _ = self._scratch(0)
            self._dots(x.ctypes.data, None, m, v.ctypes.data, kp, None,
                       inputs, out.ctypes.data, sums)  # fmt: skip
        return out[:m]

    def _scratch(self, kp: int) -> tuple[int, int, int]:
        """Addresses of this thread's scratch (kept between calls: making it afresh cost
        ~20 us a call, against ~1 us of filling a block): a block's repeated inputs, its rows'
        vector sums of 4 dot products (then the rows' u = w x(a) of one lane block and 4
        vectors, the same size) and, with ``kp`` > 0, the rows' weights of kp vectors."""
        mine = getattr(self._local, "scratch", None)
        if mine is None:
            inputs = aligned_empty((self.rows, self.stride), self.dtype)
            sums = aligned_empty((self.rows, 4, self.layout.lanes), self.dtype)
            mine = self._local.scratch = {"arrays": (inputs, sums), "weights": {}}
            mine["at"] = (inputs.ctypes.data, sums.ctypes.data)
        weights = 0
        if kp:
            array = mine["weights"].get(kp)
            if array is None:
                array = mine["weights"][kp] = aligned_empty((self.rows, kp), self.dtype)
            weights = array.ctypes.data
        return (*mine["at"], weights)

    def sums(self, v: np.ndarray) -> np.ndarray:
        """Zero float64 sums for the vectors v (kp, width) of `vectors`, aligned like them."""
        return aligned_zeros(v.shape, np.float64)

    def _check(self, x: np.ndarray, v: np.ndarray) -> None:
        if x.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"x and v must be {self.dtype}")
        if x.ndim != 2 or x.shape[1] != self.d or v.ndim != 2 or v.shape[1] != self.layout.width:
            raise ValueError(f"x must be (m, {self.d}) and v (kp, {self.layout.width})")
        if not (x.flags.c_contiguous and v.flags.c_contiguous):
            raise ValueError("x and v must be C-contiguous")


_made = threading.Lock()


@functools.cache
def _cached(d: int, dtype_name: str) -> LiftedPass:
    return LiftedPass(d, dtype_name)


def lifted_pass(d: int, dtype) -> LiftedPass:
    """The compiled pass for dimension d and dtype (built once per process: 0.43-0.58 s
    measured at d = 60 to 400, three times engine 0.10.0's 0.15-0.22 s for the code of groups
    of 1 to 3 vectors)."""
    with _made:  # one compilation per signature, whatever the threads
        return _cached(int(d), np.dtype(dtype).name)


@functools.cache
def _initialise_llvm() -> None:
    import llvmlite.binding as ll

    ll.initialize_native_target()
    ll.initialize_native_asmprinter()


def _build(lay: CyclicLayout, dtype: np.dtype, rows: int, stride: int, registers: int):
    """The LLVM module of `LiftedPass` (see the module docstring for the algorithm)."""
    import llvmlite.binding as ll
    import llvmlite.ir as ir

    i64, i32 = ir.IntType(64), ir.IntType(32)
    scalar = ir.FloatType() if dtype == np.float32 else ir.DoubleType()
    lanes_, size = lay.lanes, dtype.itemsize
    vec = ir.VectorType(scalar, lanes_)
    # the float64 sums are added a register at a time: half a float32 vector of 16 lanes,
    # else a whole vector
    half = 8 if lanes_ * size > 32 and size == 4 else lanes_
    vec64 = ir.VectorType(ir.DoubleType(), half)
    module = ir.Module(name="hsl_lifted_q2")
    module.triple = ll.get_process_triple()
    fma = ir.Function(module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{lanes_}f{8 * size}")
    byte = ir.IntType(8)
    prefetch_type = ir.FunctionType(ir.VoidType(), [byte.as_pointer(), i32, i32, i32])
    prefetch = ir.Function(module, prefetch_type, "llvm.prefetch.p0")

    def emit(name: str, dots_only: bool) -> None:
        """The pass, or with ``dots_only`` its first step writing the dot products of each
        row to ``w`` (whole blocks of rows; no labels, no weighted rows)."""
        ptr, ptr64 = scalar.as_pointer(), ir.DoubleType().as_pointer()
        fn = ir.Function(
            module,
            ir.FunctionType(ir.VoidType(), [ptr, ptr, i64, ptr, i64, ptr64, ptr, ptr, ptr]),
            name,
        )
        fn.attributes.add("nounwind")
        x, y, m, v, kp, out, xin, w, part = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        d, shifts, width, blocks = lay.d, lay.shifts, lay.width, lay.padded // lanes_
        zero = ir.Constant(vec, [0.0] * lanes_)
        one = ir.Constant(vec, [1.0] * lanes_)
        inv_sqrt2 = ir.Constant(vec, [float(1.0 / np.sqrt(2.0))] * lanes_)
        nothing = ir.Constant(scalar, 0.0)

        def k(value: int):
            return ir.Constant(i64, int(value))

        def load(base, index):
            return b.load(b.bitcast(b.gep(base, [index]), vec.as_pointer()), align=size)

        def splat(value):
            one_lane = b.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(i32, 0))
            mask = ir.Constant(ir.VectorType(i32, lanes_), [0] * lanes_)
            return b.shuffle_vector(one_lane, ir.Constant(vec, ir.Undefined), mask)

        def lanes_sum(value):
            n = lanes_
            while n > 1:  # a fixed tree: halves added
                h = n // 2
                lo = b.shuffle_vector(
                    value, value, ir.Constant(ir.VectorType(i32, h), list(range(h)))
                )
                hi = b.shuffle_vector(
                    value, value, ir.Constant(ir.VectorType(i32, h), list(range(h, n)))
                )
                value = b.fadd(lo, hi)
                n = h
            return b.extract_element(value, ir.Constant(i32, 0))

        def hermite(xa):
            return b.fmul(b.fsub(b.fmul(xa, xa), one), inv_sqrt2)

        def loop(start, stop, step, carried, body, name):
            """``for i in range(start, stop, step)`` carrying SSA values; body(i, values) returns
            the next values; returns the values at the exit."""
            before = b.block
            head = b.append_basic_block(name + ".head")
            inside = b.append_basic_block(name + ".body")
            after = b.append_basic_block(name + ".exit")
            b.branch(head)
            b.position_at_end(head)
            i = b.phi(i64)
            i.add_incoming(start, before)
            phis = []
            for value in carried:
                phi = b.phi(value.type)
                phi.add_incoming(value, before)
                phis.append(phi)
            b.cbranch(b.icmp_signed("<", i, stop), inside, after)
            b.position_at_end(inside)
            new = body(i, phis)
            end = b.block
            i.add_incoming(b.add(i, step), end)
            for phi, value in zip(phis, new):
                phi.add_incoming(value, end)
            b.branch(head)
            b.position_at_end(after)
            return phis

        def position(s, ab):
            """Offset in a vector of shift s, lane block ab: `_index` (lane block, then shift)."""
            return b.mul(b.add(b.mul(ab, k(shifts)), s), k(lanes_))

        whole_groups = b.and_(kp, k(-4))  # vectors in groups of 4; then the 1 to 3 left

        def in_groups(body, name):
            """``body(j0, 4)`` for each group of 4 vectors, then ``body(j0, kp % 4)`` for the
            rest: code for each group size, so that a pass on 1 to 3 vectors (or the last of
            5 to 7) does only their work. Each vector's sums are the same whatever its group."""

            def full(j0, _):
                body(j0, 4)
                return []

            loop(k(0), whole_groups, k(4), [], full, name)
            left = b.sub(kp, whole_groups)
            for group in (1, 2, 3):
                with b.if_then(b.icmp_signed("==", left, k(group))):
                    body(whole_groups, group)

        def prefetch_next_block(start, r4, tile, ab):
            """Prefetch the inputs of rows r4 .. r4 + tile - 1 of the next block: at lane
            block ab, the lines ab, ab + blocks, ... of each such row (so the lane blocks
            share a row's lines between them; a line past the row's end belongs to the next
            row, which prefetches it too, and a prefetch of a cached line costs little; so
            does a second group's). Past the last sample the addresses lie beyond x: a
            prefetch never faults, and nothing reads them."""
            elements = 64 // size  # of a cache line
            lines = -(-d * size // 64) + 1  # that a row of d numbers can touch
            for r in range(tile):
                row = b.add(b.add(start, k(rows)), b.add(r4, k(r)))
                for i in range(-(-lines // blocks)):
                    at = b.add(b.mul(row, k(d)), b.mul(b.add(k(i * blocks), ab), k(elements)))
                    address = b.bitcast(b.gep(x, [at]), byte.as_pointer())
                    # read, keep in every cache level, data
                    b.call(prefetch, [address, ir.Constant(i32, 0), ir.Constant(i32, 3),
                                      ir.Constant(i32, 1)])  # fmt: skip

        def block(start, _):
            live_rows = b.sub(m, start)

            def copy(r, _):  # row r of the block: its input repeated, a copy every d entries
                source = b.mul(b.add(start, r), k(d))
                target = b.mul(r, k(stride))
                for first in range(0, stride, d):
                    count = min(d, stride - first)
                    if count < lanes_:  # one by one
                        for i in range(count):
                            value = b.load(b.gep(x, [b.add(source, k(i))]))
                            b.store(value, b.gep(xin, [b.add(target, k(first + i))]))
                        continue
                    # whole vectors, the last one ending at count (overlapping the one
                    # before it where count is not a multiple of the width: the same
                    # numbers written twice, no scalar tail)
                    spans = list(range(0, count - lanes_ + 1, lanes_))
                    if count % lanes_:
                        spans.append(count - lanes_)
                    for i in spans:
                        at = b.gep(xin, [b.add(target, k(first + i))])
                        b.store(
                            load(x, b.add(source, k(i))),
                            b.bitcast(at, vec.as_pointer()),
                            align=size,
                        )
                return []

            def clear_row(r, _):  # rows past the last sample: zeros (their labels are 0)
                target = b.mul(r, k(stride))
                for i in range(0, stride, lanes_):
                    at = b.gep(xin, [b.add(target, k(i))])
                    b.store(zero, b.bitcast(at, vec.as_pointer()), align=size)
                return []

            live = b.select(b.icmp_signed("<", live_rows, k(rows)), live_rows, k(rows))
            loop(k(0), live, k(1), [], copy, "fill")
            loop(live, k(rows), k(1), [], clear_row, "fill.zero")

            # dot products, 4 vectors at a time: lane block by lane block (the vectors' slice
            # of one block, all shifts, stays in L1 while every row of the block uses it),
            # `dot_rows` rows at a time, their vector sums kept in `part` between lane blocks
            def dots_vectors(j0, group):
                """The dots of vectors j0 .. j0 + group - 1 (group = 4, or the 1 to 3 left)."""
                vec_base = [b.mul(b.add(j0, k(j)), k(width)) for j in range(group)]
                tile = dot_rows(group, registers)

                def clear(i, _):
                    b.store(zero, b.bitcast(b.gep(part, [b.mul(i, k(lanes_))]), vec.as_pointer()))
                    return []

                loop(k(0), k(4 * rows), k(1), [], clear, "dots.clear")

                def lane_block(ab, _):
                    offset = b.mul(ab, k(lanes_))
                    vv0 = [load(v, b.add(vec_base[j], position(k(0), ab))) for j in range(group)]

                    def dots_rows(r4, _, tile=tile):
                        row_base = [b.mul(b.add(r4, k(r)), k(stride)) for r in range(tile)]
                        if d <= PREFETCH_MAX_D:
                            prefetch_next_block(start, r4, tile, ab)

                        # the shifted products: t_rj = sum_s x_r(a + s) v_j(s, a); then
                        # x_r(a) t_rj (one product per lane block, not per shift), after
                        # the diagonal's term
                        def shift(s, t):
                            at = position(s, ab)
                            vv = [load(v, b.add(vec_base[j], at)) for j in range(group)]
                            new = []
                            for r in range(tile):  # one shifted input live at a time
                                xs = load(xin, b.add(b.add(row_base[r], offset), s))
                                new += [
                                    b.call(fma, [xs, vv[j], t[group * r + j]]) for j in range(group)
                                ]
                            return new

                        t = loop(k(1), k(shifts), k(1), [zero] * (tile * group), shift, "dots.s")
                        for r in range(tile):  # (x_r(a) loaded here: no registers held)
                            xa = load(xin, b.add(row_base[r], offset))
                            f = hermite(xa)
                            for j in range(group):
                                slot = b.mul(b.add(b.mul(b.add(r4, k(r)), k(4)), k(j)), k(lanes_))
                                p = b.bitcast(b.gep(part, [slot]), vec.as_pointer())
                                acc = b.call(fma, [f, vv0[j], b.load(p, align=size)])
                                acc = b.call(fma, [xa, t[group * r + j], acc])
                                b.store(acc, p, align=size)
                        return []

                    whole = rows - rows % tile  # then the rest (rows is a multiple of 4)
                    loop(k(0), k(whole), k(tile), [], dots_rows, "dots.r")
                    if rows % tile:
                        dots_rows(k(whole), [], rows % tile)
                    return []

                loop(k(0), k(blocks), k(1), [], lane_block, "dots.ab")

                def finish(row, _):
                    sums = []
                    for j in range(group):
                        slot = b.mul(b.add(b.mul(row, k(4)), k(j)), k(lanes_))
                        p = b.bitcast(b.gep(part, [slot]), vec.as_pointer())
                        sums.append(lanes_sum(b.load(p, align=size)))
                    if dots_only:  # row start + row of the output
                        at = b.mul(b.add(start, row), kp)
                        for j in range(group):
                            b.store(sums[j], b.gep(w, [b.add(at, b.add(j0, k(j)))]))
                        return []
                    live = b.icmp_signed("<", row, live_rows)
                    label = b.load(b.gep(y, [b.add(start, b.select(live, row, k(0)))]))
                    label = b.select(live, label, nothing)
                    for j in range(group):
                        b.store(
                            b.fmul(sums[j], label),
                            b.gep(w, [b.add(b.mul(row, kp), b.add(j0, k(j)))]),
                        )
                    return []

                loop(k(0), k(rows), k(1), [], finish, "dots.sum")
                return []

            in_groups(dots_vectors, "dots.j")
            if dots_only:
                return []

            def add_sums(total, at):
                """Add a register of sums (in the input type) into the float64 sums at ``at``."""
                for h in range(0, lanes_, half):
                    part_ = total  # float64: half is the whole vector
                    if size == 4:  # float32: lanes h .. h + half, widened
                        mask = ir.Constant(ir.VectorType(i32, half), list(range(h, h + half)))
                        part_ = b.fpext(b.shuffle_vector(total, total, mask), vec64)
                    p = b.bitcast(b.gep(out, [b.add(at, k(h))]), vec64.as_pointer())
                    b.store(b.fadd(b.load(p, align=8), part_), p, align=8)

            def weighted_tile(group, count, operands, at, name):
                """group x count accumulators over the block's rows, ``acc[j][t] += a_j c_t``
                with ``(a, c) = operands(r)`` for row r, each then added into the float64 sums
                at ``at(j, t)``."""

                # the smaller side's operands live, the other's one at a time (so that the
                # tile fits 16 registers too): the order the multiply-adds are written in
                pairs = [(j, t) for j in range(group) for t in range(count)]
                if group <= count:
                    pairs.sort(key=lambda jt: (jt[1], jt[0]))

                def row(r, acc):
                    a, c = operands(r)
                    new = list(acc)
                    for j, t in pairs:
                        new[count * j + t] = b.call(fma, [a[j], c[t], acc[count * j + t]])
                    return new

                acc = loop(k(0), k(rows), k(1), [zero] * (group * count), row, name)
                for j in range(group):
                    for t in range(count):
                        add_sums(acc[count * j + t], at(j, t))

            def diagonal_tile(j0, group, ab0, count):
                """Weighted rows of shift 0, the Hermite diagonal: lane blocks ab0 .. ab0 +
                count - 1, vectors j0 .. j0 + group - 1 (the weights times the feature per
                row)."""

                def operands(r):
                    base = b.mul(r, k(stride))
                    f = [
                        hermite(load(xin, b.add(base, b.mul(b.add(ab0, k(t)), k(lanes_)))))
                        for t in range(count)
                    ]
                    weights = b.mul(r, kp)
                    ws = [
                        splat(b.load(b.gep(w, [b.add(weights, b.add(j0, k(j)))])))
                        for j in range(group)
                    ]
                    return ws, f

                def at(j, t):
                    return b.add(b.mul(b.add(j0, k(j)), k(width)), position(k(0), b.add(ab0, k(t))))

                weighted_tile(group, count, operands, at, "rows")

            def shift_tile(j0, first, group, ab, s0, count):
                """Weighted rows of shifts s0 .. s0 + count - 1 at lane block ab, vectors j0 +
                first .. j0 + first + group - 1: sum_r u_rj(a) x_r(a + s), with u_rj = w_rj
                x_r(a) in ``part`` (slot ``first + j`` of row r)."""
                offset = b.mul(ab, k(lanes_))

                def operands(r):
                    base = b.add(b.mul(r, k(stride)), offset)
                    slots = [
                        b.mul(b.add(b.mul(r, k(4)), k(first + j)), k(lanes_)) for j in range(group)
                    ]
                    us = [load(part, slot) for slot in slots]
                    return us, [load(xin, b.add(base, b.add(s0, k(t)))) for t in range(count)]

                def at(j, t):
                    vector = b.add(j0, k(first + j))
                    return b.add(b.mul(vector, k(width)), position(b.add(s0, k(t)), ab))

                weighted_tile(group, count, operands, at, "rows.s")

            def weighted_vectors(j0, group):
                """The weighted rows of vectors j0 .. j0 + group - 1, in the register tiles of
                `weighted_tiles` (each accumulator's sum is the same whatever its tile)."""
                per_tile, across, tile_blocks = weighted_tiles(group, registers)
                # the diagonal (shift 0): tiles of lane blocks, the Hermite feature per row
                tile_blocks = min(tile_blocks, blocks)
                whole = blocks - blocks % tile_blocks
                if whole:

                    def full(ab0, _):
                        diagonal_tile(j0, group, ab0, tile_blocks)
                        return []

                    loop(k(0), k(whole), k(tile_blocks), [], full, "tiles")
                if blocks % tile_blocks:
                    diagonal_tile(j0, group, k(whole), blocks % tile_blocks)

                # the other shifts: lane block by lane block, u_rj = w_rj x_r(a) once per row
                # (into ``part``), then tiles of shifts x vectors over the rows
                def lane_block(ab, _):
                    offset = b.mul(ab, k(lanes_))

                    def weigh(r, _):
                        xa = load(xin, b.add(b.mul(r, k(stride)), offset))
                        for j in range(group):
                            wt = splat(b.load(b.gep(w, [b.add(b.mul(r, kp), b.add(j0, k(j)))])))
                            slot = b.mul(b.add(b.mul(r, k(4)), k(j)), k(lanes_))
                            p = b.bitcast(b.gep(part, [slot]), vec.as_pointer())
                            b.store(b.fmul(xa, wt), p, align=size)
                        return []

                    loop(k(0), k(rows), k(1), [], weigh, "weigh")
                    others = shifts - 1
                    whole = others - others % across
                    for first in range(0, group, per_tile):  # the group's vectors, per_tile at once
                        some = min(per_tile, group - first)
                        if whole:

                            def full(s0, _, first=first, some=some):
                                shift_tile(j0, first, some, ab, s0, across)
                                return []

                            loop(k(1), k(1 + whole), k(across), [], full, "shift.tiles")
                        if others % across:
                            shift_tile(j0, first, some, ab, k(1 + whole), others % across)
                    return []

                loop(k(0), k(blocks), k(1), [], lane_block, "weighted.ab")
                return []

            in_groups(weighted_vectors, "weighted.j")
            return []

        loop(k(0), m, k(rows), [], block, "block")
        b.ret_void()

    emit("lifted_q2_pass", False)
    emit("lifted_q2_dots", True)
    return module
