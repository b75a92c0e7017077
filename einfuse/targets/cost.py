"""Roofline estimates that count what a kernel's tiling moves (issue 7; PASS_SPECS.md §4.1).

LLM-Viewer's roofline divides a layer's operations by a peak and its *minimum* bytes by a
bandwidth. einfuse's estimate of one kernel is

    seconds = launch + max(work / F, DRAM bytes / B_dram, cache bytes / B_cache)

- ``work`` is FLOPs done, not FLOPs needed: a contraction computes on whole register tiles (the
  padding of a ragged edge counts), at the FMA rate F scaled by how well the tile keeps the FMA
  pipes busy (enough independent accumulators to hide the FMA latency, few loads per FMA);
  element-wise and reduction work is counted in vector operations (each op's ``vector_ops`` in
  :mod:`einfuse.ir.ops`: ``exp`` is a dozen) at half of F (one vector op per cycle, where an FMA
  is two FLOPs).
- DRAM bytes count an operand once per time the tiling reads it when it does not stay in cache:
  a GEMM's row operand once per column panel when it is larger than the last-level cache, the
  1-pass attention's K and V once per block of query rows when a head's K and V exceed a core's.
- cache bytes are the GEMM's packed column panel, streamed from the core's cache once per
  register tile of rows, and the re-reads that the last-level cache serves.
- the 1-pass attention's work (:func:`attention`) is counted per block of query rows and key
  tile: its two products on their register tiles, the scores' vector work, the per-tile update of
  each row's running values and of the numerator, and the passes over a score tile that no
  longer fits the L1 cache; :func:`attention_tile` picks the key tile by it.
- launch is the measured cost of calling a parallel kernel (a fork and join of the thread pool).

LLM-Viewer's pitfalls (§4.1) are avoided by construction: one convention (an FMA is 2 FLOPs, the
peak is a measured dense GEMM), bytes at each tensor's dtype, heads counted from the IR.
:func:`register_tile` picks a contraction's register tile by this estimate.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..ir import Cascade, Einsum
from ..ir import ops as ir_ops
from ..ir.dtypes import DTYPES
from ..ir.panels import reads_panels
from ..ir.scope import access_vars, declarations, iteration_vars, lhs_vars, reads, reduced_vars, var_ranks

ATTENTION_ROWS = 96   # query rows per block of the 1-pass attention on a CPU (codegen/loop.py): a
                     # multiple of the register tiles' 4 and 6 rows and of a vector's 8 lanes

FMA_LATENCY = 4      # cycles; two FMA pipes, so 8 independent accumulators keep them busy
PARALLEL_FMAS = 8
HEADROOM = 1.2       # ... in theory: with the loads in the same steps, 8 ran at 0.85 of 12 (Zen 3)
INT8_RATE = 2.0      # an int8-dot kernel's multiply-adds a second over float32 FMAs': vpdpbusd does four a lane,
                     # less the nibbles' unpacking (two ops a vector) and the per-block scaling (measured: 2-4x)
GEMV_RATE = 0.4      # a GEMV's share of the FMA rate (an accumulator's load and store per 4 FMAs: 55 and 67
                     # of 150 GFLOP/s at 8 and 16 x 4096 x 4096, Zen 3)
PAGE, TLB_REACH = 4096, 2048 * 4096   # the data TLB maps 2048 pages of 4 KiB (Zen 3's L2 DTLB)
PAGE_WALK = 9e-9     # seconds per TLB miss on a core (26 cycles: fitted at 1 x 4096 x 4096, Zen 3)
ROW_PADDING = 0.5    # the FMA rate of a row tile overhanging a static row count: its row operand is
                     # read under a condition in the reduction loop (6 x 16 on 1024 rows, Zen 3)
ROW_STEP = 8.0       # cycles per query row and key tile: the row's max, running max, correction exp and
                     # denominator (fitted with RESCALE on 8-64 keys at head widths 16 and 64, Zen 3)
RESCALE = 1.2        # cycles per element of the running numerator and key tile: P V's accumulators set,
                     # the numerator reloaded, rescaled and stored
SCORE_PASSES = 5     # passes over a score tile: Q K^T writes it, the max reads it, exp reads and writes, P V reads
TILE_MARGIN = 0.02   # the narrowest key tile estimated within this of the fastest is taken
MARGIN = 0.10        # a register tile replaces the rule of thumb only if estimated this much faster (the
                     # cache term's 32 B/cycle is nominal: AVX-512's (8, 32) vs (4, 64) is a 6 % call)


@dataclass(frozen=True)
class Machine:
    """What the estimate needs of a target: float32 FLOP/s of a large GEMM, DRAM and (all
    cores') cache bytes/s, a core's cache size, vector lanes and registers, the launch cost."""

    flops: float
    dram: float
    cache: float
    cache_bytes: int
    llc_bytes: int
    lanes: int
    registers: int
    launch: float
    cores: int = 1
    l1_bytes: int = 32 << 10

    @property
    def hz(self) -> float:
        """Cycles per second of one core: the FMA rate over two pipes of ``lanes`` FMAs."""
        return self.flops / (self.cores * 2 * 2 * self.lanes)


@dataclass(frozen=True)
class Estimate:
    """One kernel's estimate, its terms, and which of them bounds it."""

    flops: float          # FLOPs needed
    work_seconds: float
    dram_bytes: float
    cache_bytes: float
    seconds: float
    bound: str            # "compute", "memory", "cache" or "launch"

    @property
    def intensity(self) -> float:
        """FLOPs per DRAM byte (the roofline's x axis)."""
        return self.flops / self.dram_bytes if self.dram_bytes else math.inf


def nominal(target: Any) -> Machine:
    """A Machine from the target's own numbers alone (no measurement: the tiles chosen, and so
    the code compiled, do not depend on a noisy benchmark): 3 GHz, two FMA pipes per core, 32
    bytes per cycle per core from the cache, 8 bytes per cycle from DRAM in all."""
    hz = 3e9
    return Machine(flops=target.cores * 2 * 2 * target.vector_lanes * hz, dram=8 * hz, cache=32 * hz * target.cores,
                   cache_bytes=target.cache_bytes, llc_bytes=target.llc_bytes, lanes=target.vector_lanes,
                   registers=target.registers, launch=5e-6, cores=target.cores, l1_bytes=target.l1_bytes)


def measured(target: Any, peaks: Any) -> Machine:
    """A Machine from the host's measured peaks (:func:`einfuse.targets.host_peaks`)."""
    return Machine(flops=peaks.flops, dram=peaks.bandwidth, cache=peaks.cache, cache_bytes=target.cache_bytes,
                   llc_bytes=target.llc_bytes, lanes=target.vector_lanes, registers=target.registers,
                   launch=peaks.launch, cores=target.cores, l1_bytes=target.l1_bytes)


def combine(m: Machine, flops: float, work_seconds: float, dram: float, cache: float, serial: float = 0.0) -> Estimate:
    """The estimate from its terms: launch, plus ``serial`` seconds that overlap nothing, plus the
    slowest of compute, DRAM and cache."""
    terms = {"compute": work_seconds, "memory": dram / m.dram, "cache": cache / m.cache}
    bound = max(terms, key=terms.__getitem__)
    slowest = terms[bound]
    return Estimate(flops, work_seconds, dram, cache, m.launch + serial + slowest,
                    bound if slowest > m.launch else "launch")


def gemm(m: Machine, batch: int, rows: int, cols: int, depth: int, tile: tuple[int, int], extra_flops: float = 0.0,
         dtype_bytes: float = 4, packed: bool = False) -> Estimate:
    """A (batched) ``rows x depth @ depth x cols`` contraction on a ``tile`` = (rows, lanes)
    register tile, column panels packed and reused by every row tile (codegen/schedules/cpu.py);
    ``packed``: the panels were packed at compile time (a weight: passes/layout.pack_weights)."""
    mr, nr = tile
    row_tiles, panels = -(-rows // mr), -(-cols // nr)
    done = 2.0 * batch * row_tiles * mr * panels * nr * depth
    a, b, c = (dtype_bytes * batch * x for x in (rows * depth, depth * cols, rows * cols))
    again = a * (panels - 1)   # (the row operand, read once per column panel)
    in_l2, in_llc = a / batch <= m.cache_bytes, a / batch <= m.llc_bytes
    dram = a + b + c + (0 if in_llc else again)
    cache = dtype_bytes * batch * row_tiles * panels * depth * nr + (again if in_llc and not in_l2 else 0)
    rate = m.flops * tile_efficiency(m, mr, nr) * (ROW_PADDING if rows % mr else 1.0)
    work = done / rate + extra_flops / (m.flops / 2)
    # the panels are copied out first (a phase of its own), reading a few columns of each row of
    # the operand: a TLB miss per row once the operand is past the TLB's reach and its rows a page
    walks = batch * depth * panels if b / batch > TLB_REACH and cols * dtype_bytes >= PAGE else 0
    serial = 0.0 if packed else 2 * b / m.cache + walks * PAGE_WALK / m.cores
    return combine(m, 2.0 * batch * rows * cols * depth + extra_flops, work, dram, cache, serial)


def gemv(m: Machine, rows: int, cols: int, depth: int, extra_flops: float = 0.0, dtype_bytes: float = 4) -> Estimate:
    """A ``rows x depth @ depth x cols`` contraction as a GEMV (codegen/schedules/cpu.py): each
    row of the right operand streamed once, contiguous, into accumulators in L1 (four rows at a
    time: a load and a store per 4 FMAs, ``GEMV_RATE`` of the FMA rate), no packing."""
    flops = 2.0 * rows * cols * depth
    moved = dtype_bytes * (rows * depth + depth * cols + rows * cols)
    work = flops / (m.flops * GEMV_RATE) + extra_flops / (m.flops / 2)
    return combine(m, flops + extra_flops, work, moved, 0.0)


def prefers_gemv(m: Machine, batch: int, rows: int, cols: int, depth: int, packed: bool = False) -> bool:
    """Whether a contraction is run as a GEMV (an unbatched one whose columns split into whole
    vectors per core) because its estimate beats the register tiles' with the panels ``packed``
    at compile time or copied out on every call (1 x 4096 x 4096: GEMV 2.1 ms, tiles 9.2
    packing per call; with packed panels the tiles win from 8 rows of 4096: 3.9 against 4.9).
    A tie (both bound by reading the weight from memory) goes to the GEMV."""
    tiles = gemm(m, 1, rows, cols, depth, register_tile(m, rows, cols), packed=packed)
    return batch == 1 and cols % (m.cores * m.lanes) == 0 and gemv(m, rows, cols, depth).seconds <= tiles.seconds


def tile_efficiency(m: Machine, mr: int, nr: int) -> float:
    """The share of peak FMA rate a ``mr x nr`` register tile sustains: each reduction step
    issues ``mr * vectors`` FMAs (independent only up to the accumulators held) and
    ``mr + vectors`` loads, two of each per cycle; the FMAs hide their latency with some
    ``HEADROOM`` to spare."""
    fmas = mr * -(-nr // m.lanes)
    loads = mr + -(-nr // m.lanes)
    return min(1.0, fmas / (PARALLEL_FMAS * HEADROOM)) * min(1.0, fmas / loads)


def accumulators(registers: int, vectors: int) -> int:
    """How many accumulator registers a tile ``vectors`` wide may take: half the registers
    where that hides the FMA latency (32 registers), else all but the row of the streamed
    operand and one broadcast (16 registers: 4 x 24 holds 12)."""
    half = registers // 2
    return half if half >= PARALLEL_FMAS * HEADROOM else registers - vectors - 1


def rule_vectors(registers: int) -> int:
    """The rule of thumb's register tile width in vectors: 4, or 2 with 16 registers."""
    return 4 if registers >= 32 else 2


def rule_tile(lanes: int, registers: int, cols: int | None) -> tuple[int, int]:
    """The rule of thumb's register tile, (rows, lanes): half the vector registers hold
    accumulators, :func:`rule_vectors` wide, narrower when the output is (a 16-wide attention
    head takes 1 x 16)."""
    vectors = rule_vectors(registers)
    if cols is not None:
        vectors = max(1, min(vectors, -(-cols // lanes)))
    return max(1, registers // 2 // vectors), vectors * lanes


def register_tile(m: Machine, rows: int | None, cols: int | None, depth: int = 256,
                  vectors: int = 4) -> tuple[int, int]:
    """The (rows, lanes) register tile for a ``rows x cols`` output, at most ``vectors`` vectors
    wide: :func:`rule_tile` unless another tile that fits the registers has an estimate more
    than ``MARGIN`` faster. Unknown sizes take 256."""
    rows, cols = rows or 256, cols or 256
    rule = rule_tile(m.lanes, m.registers, cols)
    widest = min(vectors, -(-cols // m.lanes))
    options = [(r, v * m.lanes) for v in range(widest, 0, -1)
               for r in range(1, accumulators(m.registers, v) // v + 1)]
    seconds = {t: gemm(m, 1, rows, cols, depth, t).seconds for t in options + [rule]}
    best = min(options, key=seconds.__getitem__)
    return best if seconds[best] < (1 - MARGIN) * seconds[rule] else rule


SCORE_OPS = ir_ops.OPS["exp"].vector_ops + 3   # vector ops per score: the row max, exp of the difference, the row sum


def attention(m: Machine, heads: int, queries: int, keys: int, head_dim: int, value_dim: int, tile: int,
              score_ops: float = SCORE_OPS, rows: int = ATTENTION_ROWS, score_bytes: float = 4) -> float:
    """Seconds of work of the 1-pass attention (codegen/loop.py) over ``heads`` heads with
    ``tile`` keys per tile: the blocks of ``rows`` queries are shared by the cores, and each
    block goes through every key tile, which costs (in cycles of one core)

    - ``Q K^T`` (rows x tile, padded to whole register tiles) and ``P V`` (rows x value_dim)
      at their register tiles' FMA rate (:func:`tile_efficiency`);
    - ``score_ops`` vector ops per score, two per cycle;
    - ``ROW_STEP`` per row and ``RESCALE`` per element of the running numerator (work done
      once per tile, whatever its width: what makes narrow tiles slow);
    - a score tile (``score_bytes`` per score) larger than the L1 cache: its ``SCORE_PASSES``
      passes from the core's cache (what makes wide tiles slow)."""
    (qr, qc), (vr, vc) = (_block_tile(m, rows, cols) for cols in (tile, value_dim))
    padded = -(-tile // qc) * qc
    fma = rows * padded * head_dim / tile_efficiency(m, qr, qc) + rows * tile * value_dim / tile_efficiency(m, vr, vc)
    cycles = fma / (2 * m.lanes) + rows * tile * score_ops / (2 * m.lanes) + rows * (ROW_STEP + RESCALE * value_dim)
    per_core_cache = m.cache / m.cores / m.hz   # bytes per cycle
    if score_bytes * rows * tile > m.l1_bytes:
        cycles += SCORE_PASSES * score_bytes * rows * tile / per_core_cache
    blocks = heads * -(-queries // rows)
    return -(-blocks // m.cores) * -(-keys // tile) * cycles / m.hz


def attention_tile(m: Machine, queries: int, keys: int, head_dim: int, value_dim: int) -> int:
    """Keys per tile of the 1-pass attention: of the powers of two from one vector up to the keys
    (rounded up) whose working set (K and V rows, the scores and probabilities of a block of
    queries) fits half of a core's cache, the narrowest whose :func:`attention` estimate is
    within ``TILE_MARGIN`` of the lowest (the estimate cannot tell closer ones apart; a narrower
    tile holds less and skips more of a causal mask). One vector if none fits."""
    def fits(t: int) -> bool:
        return 4 * t * (head_dim + value_dim + 2 * ATTENTION_ROWS) <= m.cache_bytes // 2
    options = [m.lanes << k for k in range(16) if (m.lanes << k) < 2 * keys and fits(m.lanes << k)] or [m.lanes]
    seconds = {t: attention(m, 1, queries, keys, head_dim, value_dim, t) for t in options}
    best = min(seconds.values())
    return next(t for t in options if seconds[t] <= (1 + TILE_MARGIN) * best)


def _block_tile(m: Machine, rows: int, cols: int) -> tuple[int, int]:
    """The register tile codegen/loop.py uses for a block of ``rows`` rows: no wider than the
    rule's, its rows dividing them."""
    mr, nr = register_tile(m, rows, cols, vectors=rule_vectors(m.registers))
    while rows % mr:
        mr -= 1
    return mr, nr


def vector_ops(e: Einsum) -> int:
    """Vector instructions per point of ``e``'s iteration space."""
    from ..ir.analysis import map_ops
    return map_ops(e.rhs, lambda op: ir_ops.OPS[op].vector_ops) + (1 if reduced_vars(e) else 0)


def element_bytes(c: Cascade, e: Einsum) -> float:
    """Bytes per element of ``e``'s result and the tensors it reads: the widest of their dtypes."""
    decls = declarations(c)
    return max(DTYPES[decls[name].dtype].bytes for name in [e.lhs.tensor, *(a.tensor for a in reads(e))])


def contraction_dims(c: Cascade, e: Einsum, sizes: dict[str, int]) -> tuple[int, int, int, int] | None:
    """(batch, rows, cols, depth) of a two-operand contraction, or None if ``e`` is not one.
    cols is the innermost output variable; rows the innermost other one the operand reading
    cols does not read, of extent above one where there is one (the register tile's rows, as
    codegen/schedules/cpu.py takes them)."""
    accesses = reads(e)
    reduce = reduced_vars(e)
    out = lhs_vars(e)
    if len(accesses) != 2 or not reduce or len(out) < 2:
        return None
    size = {v: sizes[r] for v, r in var_ranks(c).items() if r in sizes}
    streamed = [a for a in accesses if out[-1] in access_vars(a)]
    if len(streamed) != 1:
        return None
    free = [v for v in out[:-1] if v not in access_vars(streamed[0])]
    longer = [v for v in free if size[v] != 1]   # (an LSTM's batch of one: its steps are the rows)
    row = (longer or free)[-1] if free else out[-2]
    batch = math.prod(size[v] for v in out if v not in (row, out[-1]))
    return batch, size[row], size[out[-1]], math.prod(size[v] for v in reduce)


def points(c: Cascade, e: Einsum, sizes: dict[str, int]) -> int:
    """Points of ``e``'s iteration space at the given rank sizes."""
    ranks = var_ranks(c)
    return math.prod(sizes[ranks[v]] for v in iteration_vars(e))


@dataclass(frozen=True)
class _Parts:
    """What each kind's estimate reads of a kernel: its Einsums, the :func:`contraction_dims` of
    each (None for one that is no contraction), the bytes of its inputs and output, and the
    symbolic sizes bound (symbol -> value)."""

    einsums: list[Einsum]
    dims: list[tuple[int, int, int, int] | None]
    moved: float
    at: dict


def kernel_estimate(c: Cascade, kernel: Any, m: Machine, sizes: dict[str, int]) -> Estimate:
    """The estimate of one kernel (a :class:`~einfuse.ir.kernels.Kernel`) at the given rank sizes,
    by the estimate of its kind (:data:`ESTIMATES`)."""
    from ..ir.analysis import tensors_bytes
    einsums = kernel.einsums(c)
    at = {r.size: sizes[r.name] for r in c.ranks if not isinstance(r.size, int)}
    moved = float(tensors_bytes(c, kernel.inputs + (kernel.output,)).subs(at))
    parts = _Parts(einsums, [contraction_dims(c, e, sizes) for e in einsums], moved, at)
    return ESTIMATES[kernel.kind](c, kernel, m, sizes, parts)


def _tiled_estimate(c: Cascade, kernel: Any, m: Machine, sizes: dict[str, int], p: _Parts) -> Estimate:
    """A contraction kernel (with its epilogue) as :func:`gemm` on the register tile
    :func:`register_tile` picks, or as :func:`gemv` where that is faster; one without a
    contraction as :func:`_streamed_estimate`."""
    if not any(p.dims):
        return _streamed_estimate(c, kernel, m, sizes, p)
    e, (batch, rows, cols, depth) = next((e, d) for e, d in zip(p.einsums, p.dims) if d)
    extra = sum(points(c, e, sizes) * vector_ops(e) for e, d in zip(p.einsums, p.dims) if not d)
    packed, size = reads_panels(e), element_bytes(c, e)
    if prefers_gemv(m, batch, rows, cols, depth, packed):
        return gemv(m, rows, cols, depth, float(extra), size)
    return gemm(m, batch, rows, cols, depth, register_tile(m, rows, cols), float(extra), size, packed)


def _work(c: Cascade, m: Machine, sizes: dict[str, int], p: _Parts) -> tuple[float, float]:
    """(the kernel's operations, their seconds): contractions' FMAs at F, the rest's vector
    operations at F / 2."""
    fma = sum(2.0 * points(c, e, sizes) for e, d in zip(p.einsums, p.dims) if d)
    vector = sum(float(points(c, e, sizes) * vector_ops(e)) for e, d in zip(p.einsums, p.dims) if not d)
    return fma + vector, fma / m.flops + vector / (m.flops / 2)


def _streamed_estimate(c: Cascade, kernel: Any, m: Machine, sizes: dict[str, int], p: _Parts) -> Estimate:
    """Any other kernel, from its work, its inputs and output (from the cache when they are small
    enough to stay in it between kernels)."""
    ops, work = _work(c, m, sizes, p)
    dram, cache = (0.0, p.moved) if p.moved <= m.cache_bytes else (p.moved, 0.0)
    return combine(m, ops, work, dram, cache)


def _loop_estimate(c: Cascade, kernel: Any, m: Machine, sizes: dict[str, int], p: _Parts) -> Estimate:
    """A loop kernel with contractions (the 1-pass attention) as :func:`attention` says, with K
    and V read again by every block of query rows; one without as :func:`_streamed_estimate`."""
    if not any(p.dims):
        return _streamed_estimate(c, kernel, m, sizes, p)
    ops, work = _work(c, m, sizes, p)
    work, heads = _attention_work(c, kernel, p.einsums, p.dims, m, sizes) or (work, next(d for d in p.dims if d)[0])
    again = _reread(c, kernel, sizes, p.at)
    dram, cache = p.moved, 0.0
    if again / heads <= m.cache_bytes:
        cache += again * (_query_blocks(c, kernel, sizes) - 1)
    else:
        dram += again * (_query_blocks(c, kernel, sizes) - 1)
    return combine(m, ops, work, dram, cache)


#: The estimate of each kernel kind (a key of ``ir.kernels.KINDS``).
def _int8_estimate(c: Cascade, kernel: Any, m: Machine, sizes: dict[str, int], p: _Parts) -> Estimate:
    """An ``int8-dot`` kernel (``codegen/int8_dot.py``): its multiply-adds at :data:`INT8_RATE`
    times the FMA rate, its other Einsums' vector operations (the activations' quantization, the
    epilogue) at half that, its inputs (the packed weight's bytes) and output moved once."""
    from ..ir.int8_dot import parts
    dot = next(e for e in p.einsums if parts(c, e) is not None)
    macs = float(points(c, dot, sizes))
    extra = float(sum(points(c, e, sizes) * vector_ops(e) for e in p.einsums if e is not dot))
    return combine(m, 2 * macs + extra, 2 * macs / (m.flops * INT8_RATE) + extra / (m.flops / 2), p.moved, 0.0)


def _grouped_estimate(c: Cascade, kernel: Any, m: Machine, sizes: dict[str, int], p: _Parts) -> Estimate:
    """A ``grouped`` kernel (``codegen/grouped.py``): its FMAs at the FMA rate; its rows, output
    and the weights of as many experts as it has rows (at most all) moved once."""
    from ..ir.analysis import tensors_bytes
    from ..ir.grouped import grouped
    found = grouped(c, p.einsums[0])
    weight = float(tensors_bytes(c, [found.weight]).subs(p.at)) if found else 0.0
    experts = sizes.get(c.tensor(found.weight).ranks[0].rank, 1) if found else 1
    rows = sizes.get(c.tensor(found.x).ranks[0].rank, 1) if found else 1
    moved = p.moved - weight + weight * min(1.0, rows / max(experts, 1))
    fma = float(sum(2.0 * points(c, e, sizes) for e in p.einsums))
    return combine(m, fma, fma / m.flops, moved, 0.0)


def _select_estimate(c: Cascade, kernel: Any, m: Machine, sizes: dict[str, int], p: _Parts) -> Estimate:
    """A ``select`` kernel (``codegen/select.py``): each fiber's elements compared once, scalar, and
    the entries of ``k`` best moved for the ``k (1 + ln(P / k))`` elements expected to enter a fiber
    read in random order; its input and output moved once."""
    from ..ir.select import selection
    found = selection(*p.einsums)
    x, out = (c.tensor(t) for t in (kernel.inputs[0], kernel.output))
    axis = found.axis if found else len(out.ranks) - 1
    elements = math.prod(sizes.get(r.rank, 1) for r in x.ranks)
    length, best = sizes.get(x.ranks[axis].rank, 1), sizes.get(out.ranks[axis].rank, 1)
    fibers = elements / max(length, 1)
    entering = min(length, best * (1 + math.log(max(length / best, 1.0))))
    ops = 4.0 * elements + fibers * entering * 4.0 * best
    return combine(m, ops, ops / (m.flops / (2 * m.lanes)), p.moved, 0.0)


def _decode_estimate(c: Cascade, kernel: Any, m: Machine, sizes: dict[str, int], p: _Parts) -> Estimate:
    """A ``decode`` kernel (``codegen/decode.py``): its inputs (the cache) read once from memory,
    its contractions' FMAs at the FMA rate and its other Einsums' vector operations at half of it."""
    ops, work = _work(c, m, sizes, p)
    return combine(m, ops, work, p.moved, 0.0)


ESTIMATES: dict[str, Callable[[Cascade, Any, Machine, dict[str, int], _Parts], Estimate]] = {
    "": _tiled_estimate, "epilogue": _tiled_estimate, "dequant": _tiled_estimate, "rows": _streamed_estimate,
    "attention": _streamed_estimate, "loop": _loop_estimate, "int8-dot": _int8_estimate,
    "grouped": _grouped_estimate, "select": _select_estimate, "decode": _decode_estimate,
}


def _attention_work(c: Cascade, kernel: Any, einsums: list[Einsum], dims: list, m: Machine,
                    sizes: dict[str, int]) -> tuple[float, int] | None:
    """A loop kernel's work seconds by :func:`attention` and its heads, when it is the 1-pass
    attention: two contractions along a tiled rank, ``Q K^T`` (queries x tile, over the head
    width) then ``P V`` (queries x values, over the tile); the vector ops per score are those of
    its Einsums with one point per score."""
    from ..ir.kernels import stream_levels
    found = [(e, d) for e, d in zip(einsums, dims) if d]
    stream, _ = stream_levels(c, kernel)
    if len(found) != 2 or not stream:
        return None
    (qk, (batch, queries, tile, width)), (_, (_, _, values, _)) = found
    tiles = sizes[stream[0]]
    scores = points(c, qk, sizes) // width
    score_ops = sum(vector_ops(e) for e, d in zip(einsums, dims) if not d and points(c, e, sizes) == scores)
    heads = max(1, batch // tiles)
    return attention(m, heads, queries, tiles * tile, width, values, tile, score_ops,
                     score_bytes=DTYPES[declarations(c)[qk.lhs.tensor].dtype].bytes), heads


def _reread(c: Cascade, kernel: Any, sizes: dict[str, int], at: dict) -> float:
    """Bytes of the loop kernel's inputs indexed by its streamed (key) rank: K and V."""
    from ..ir.analysis import tensors_bytes
    from ..ir.kernels import streamed_inputs
    keyed = streamed_inputs(c, kernel)
    return float(tensors_bytes(c, keyed).subs(at)) if keyed else 0.0


def _query_blocks(c: Cascade, kernel: Any, sizes: dict[str, int]) -> int:
    """Blocks of query rows: the output's next-to-innermost rank over the block height."""
    ranks = declarations(c)[kernel.output].ranks
    return -(-sizes[ranks[-2].rank] // ATTENTION_ROWS) if len(ranks) >= 2 else 1
