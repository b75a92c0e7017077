"""The timing model of ``accel:fusemax``: where each Einsum of a kernel runs, and for how long.

FuseMax (§V, and its artifact's models) binds a cascade's Einsums to two arrays: the 2D array of
``pe_rows x pe_cols`` PEs takes the GEMM-like work, the 1D array of ``vector_pes`` PEs the
element-wise and reduction work; a PE does one MAC, add, max or compare per cycle, and ``exp``
costs ``exp_macs + exp_adds`` of them (a 1D array with an exp unit of its own, as the unfused
baseline's, costs ``vector_exp`` cycles instead). Operands move in ``word_bytes`` words (a narrower dtype, such as a quantized weight's packed integers, in its own bytes).

The binding, per kernel (one kernel is one phase: its inputs come from DRAM, its output goes
back):

* a kernel holding the 1-pass attention loop (FuseMax's Cascade 5) is FuseMax's own binding:
  each Einsum of the loop body that iterates a tile's keys (``QK``, the tile's max, ``exp``, its
  sum, ``P V``) runs on the 2D array; the per-row updates of the running state (running max,
  correction, denominators, the rescaled ``P V``) and the final division run on the 1D array.
  K and V are read once per block of query rows the global buffer holds.
* any other kernel: a contraction (a sum of a product of two operands) runs on the 2D array,
  everything else on the 1D array.

A kernel takes ``max(2D cycles, 1D cycles, DRAM bytes / bytes per cycle)`` (the arrays and the
transfers overlap within a phase); kernels run one after another. Work on the 2D array is
counted as packed onto all PEs (ideal); the emitted C counts the tiles it really issues
(``fm_mac2d``), so padded tiles show there. Filters (causal masks) are not discounted.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..ir import Call, Cascade, Einsum
from ..ir import ops as ir_ops
from ..ir.analysis import element_bytes, map_ops
from ..ir.kernels import KINDS, Kernel
from ..ir.nodes import Loop, walk
from ..ir.scope import declarations, iteration_vars, lhs_vars, loop_vars, reduced_vars, var_ranks
from ..ir.sizes import extent
from .presets import Accelerator



@dataclass(frozen=True)
class Work:
    """One kernel's work: ops on each array and DRAM bytes (sympy expressions of the sizes)."""

    ops_2d: sympy.Expr
    ops_1d: sympy.Expr
    dram_bytes: sympy.Expr


@dataclass(frozen=True)
class Timing:
    """One kernel's (or a cascade's) modelled cycles at bound sizes."""

    cycles_2d: float
    cycles_1d: float
    dram_cycles: float
    latency: float

    def utilisation(self) -> tuple[float, float]:
        """Busy fraction of the 2D and 1D arrays over the latency."""
        return (self.cycles_2d / self.latency if self.latency else 0.0,
                self.cycles_1d / self.latency if self.latency else 0.0)

    def __add__(self, other: "Timing") -> "Timing":
        return Timing(self.cycles_2d + other.cycles_2d, self.cycles_1d + other.cycles_1d,
                      self.dram_cycles + other.dram_cycles, self.latency + other.latency)


def dram_bytes_per_cycle(acc: Accelerator) -> float:
    """DRAM bytes moved per clock cycle."""
    return acc.dram_gib_s * 2 ** 30 / (acc.mhz * 1e6)


def op_cost(op: str, acc: Accelerator, array: str) -> int:
    """PE cycles of one ``op`` on ``array`` ("2d" or "1d"): an op marked ``transcendental`` in
    :mod:`einfuse.ir.ops` costs what ``exp`` does, any other its FLOPs."""
    if ir_ops.OPS[op].transcendental:
        return acc.vector_exp if array == "1d" and acc.vector_exp else acc.exp_macs + acc.exp_adds
    return ir_ops.OPS[op].flops


def contraction(e: Einsum) -> bool:
    """A sum over reduced variables of a product of two operands: a MAC per point."""
    return (bool(reduced_vars(e)) and (e.reduce is None or e.reduce.op == "+") and isinstance(e.rhs, Call)
            and e.rhs.op == "mul" and not any(isinstance(a, Call) for a in e.rhs.args))


def einsum_ops(c: Cascade, e: Einsum, loops: tuple[Loop, ...], acc: Accelerator, array: str) -> sympy.Expr:
    """Ops of ``e`` (over the trips of its loops): points x (map ops, + 1 per point if it reduces,
    a product summed being one MAC)."""
    size, ranks, bound = {r.name: sympy.sympify(r.size) for r in c.ranks}, var_ranks(c), loop_vars(loops)
    points = sympy.Mul(*[size[ranks[v]] for v in iteration_vars(e, bound)], *[size[lp.rank] for lp in loops])
    per_point = 1 if contraction(e) else map_ops(e.rhs, lambda op: op_cost(op, acc, array)) + \
        (1 if reduced_vars(e, bound) else 0)
    return points * per_point


def kernel_einsums(c: Cascade, kernel: Kernel) -> list[tuple[Einsum, tuple[Loop, ...]]]:
    """The kernel's Einsums with their enclosing loops, in program order."""
    inside = set(kernel.internal) | {kernel.output}
    return [(e, loops) for e, loops in walk(c.stmts) if e.lhs.tensor in inside]


def placement(c: Cascade, kernel: Kernel) -> dict[int, str]:
    """The array ("2d"/"1d") of each of the kernel's Einsums, by position in :func:`kernel_einsums`."""
    items = kernel_einsums(c, kernel)
    initialised = {e.lhs.tensor for e, loops in items if not loops}
    carried = {v for e, loops in items if loops and e.lhs.tensor in initialised for v in lhs_vars(e)}
    out = {}
    for i, (e, loops) in enumerate(items):
        if loops:   # FuseMax's binding: a tile's per-key work on the 2D array, per-row state on the 1D
            out[i] = "2d" if set(iteration_vars(e, loop_vars(loops))) - carried else "1d"
        else:
            out[i] = "2d" if contraction(e) and not KINDS[kernel.kind].loop else "1d"
    return out


def _elements(c: Cascade, name: str) -> sympy.Expr:
    size = {r.name: sympy.sympify(r.size) for r in c.ranks}
    return sympy.Mul(*[extent(size[r.rank], r.iterative) for r in declarations(c)[name].ranks])


def kernel_work(c: Cascade, kernel: Kernel, acc: Accelerator, counted: frozenset[int] = frozenset()) -> Work:
    """What ``kernel`` does on each array and moves through DRAM, less the work of the Einsums at
    the positions (in :func:`kernel_einsums`) in ``counted``: those the emitted code's intrinsics
    charge themselves."""
    items, where = kernel_einsums(c, kernel), placement(c, kernel)
    ops = {"2d": sympy.Integer(0), "1d": sympy.Integer(0)}
    for i, (e, loops) in enumerate(items):
        if i not in counted:
            ops[where[i]] += einsum_ops(c, e, loops, acc, where[i])
    decls = declarations(c)
    moved = sum((_elements(c, n) * _element_bytes(decls[n].dtype, acc) for n in (*kernel.inputs, kernel.output)),
                sympy.Integer(0))
    if KINDS[kernel.kind].loop:
        moved += _rereads(c, kernel, items, acc) * acc.word_bytes
    return Work(sympy.expand(ops["2d"]), sympy.expand(ops["1d"]), sympy.expand(moved))


def _element_bytes(dtype: str, acc: Accelerator) -> sympy.Expr:
    """DRAM bytes of one element: a word, or less for a narrower dtype (a quantized weight's
    packed integers, its float16 scales)."""
    return sympy.Min(acc.word_bytes, element_bytes(dtype))


def _rereads(c: Cascade, kernel: Kernel, items: list, acc: Accelerator) -> sympy.Expr:
    """Elements of K and V (the inputs indexed by the keys the loop streams) read again for every
    further block of query rows that fits in the global buffer with its Q rows and output rows."""
    from ..ir.kernels import streamed_inputs
    size, ranks = {r.name: sympy.sympify(r.size) for r in c.ranks}, var_ranks(c)
    rows = [v for v in lhs_vars(kernel.writes[0]) if all(v in lhs_vars(e) for e, _ in items)]
    row = size[ranks[rows[-1]]]                       # query rows per head
    heads = sympy.Mul(*[size[ranks[v]] for v in rows[:-1]])
    streamed = streamed_inputs(c, kernel)
    kept = [n for n in kernel.inputs if n not in streamed] + [kernel.output]
    per_row = sum((_elements(c, n) for n in kept), sympy.Integer(0)) / (heads * row)
    blocks = sympy.ceiling(row * per_row * acc.word_bytes / acc.buffer_bytes)
    return (blocks - 1) * sum((_elements(c, n) for n in streamed), sympy.Integer(0))


def timing(work: Work, acc: Accelerator, at: dict | None = None) -> Timing:
    """The kernel's cycles with its sizes bound by ``at`` (symbol name -> value)."""
    at = at or {}
    subs = {x: at[x.name] for part in work.__dict__.values() for x in part.free_symbols if x.name in at}
    c2d = float(work.ops_2d.subs(subs)) / (acc.pe_rows * acc.pe_cols)
    c1d = float(work.ops_1d.subs(subs)) / acc.vector_pes
    dram = float(work.dram_bytes.subs(subs)) / dram_bytes_per_cycle(acc)
    return Timing(c2d, c1d, dram, max(c2d, c1d, dram))


def cascade_timing(c: Cascade, acc: Accelerator, at: dict | None = None) -> list[tuple[str, Timing]]:
    """Each kernel of ``c`` (grouped) with its modelled timing."""
    return [(k.name, timing(kernel_work(c, k, acc), acc, at)) for k in c.groups]
