"""The ``grouped`` kernel: ``H[p,n] = W[G[p],n,d] * X[p,d]``, each row times its own expert's
weights (:mod:`einfuse.ir.grouped`), as TIR (issue 22).

Rows come in *runs* of equal ``G`` (``passes/moe.py`` sorts a prefill's rows by expert; a
decoding step's few rows are runs of one). One PrimFunc, ``(inputs..., H)``, in two parts:

1. the runs: one serial pass over ``G`` writing where each run starts (``R + 1`` int32s);
2. parallel over tiles of ``NV`` vectors of ``L`` output columns; in each, run after run, the
   run's expert's weight panel (``D x NV*L``, stored ``[E, d, n]`` by ``transpose-weights``) is
   read once from memory and then from cache by every register tile of ``MR`` rows of the run
   (``MR x NV`` accumulator vectors: ``x[p, d]`` broadcast, one weight vector per ``NV``, an FMA
   each). A run's last tile overlaps the one before it (its rows are clamped to the run's last),
   as a ragged column tile does its columns: the values written twice are the same.

Only the weights of experts that have rows are read: a decoding step reads ``k`` experts'.
"""
from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..errors import CompileError
from ..ir import Cascade
from ..ir.grouped import grouped, panel_columns
from ..ir.kernels import Kernel
from ..targets import Target
from .lower import SizeVars

MAX_ROWS = {16: 6, 8: 4}   # MR by lanes: 24 of 32 zmm, 8 of 16 ymm accumulators (ir.grouped.panel_columns)


def grouped_function(c: Cascade, k: Kernel, sizes: SizeVars, target: Target) -> tirx.PrimFunc:
    """Kernel ``k`` (of kind ``grouped``) as a PrimFunc for ``target``."""
    found = grouped(c, k.writes[0]) if len(k.writes) == 1 else None
    if found is None or not found.transposed:
        raise CompileError(f"kernel {k.name}: not a grouped contraction over weights stored [E, d, n]")
    shape = sizes.shapes(c, k)
    lanes = target.vector_lanes
    mr, nv = MAX_ROWS.get(lanes, 4), panel_columns(lanes) // lanes
    rows, depth = shape[found.x]
    n = found.columns(shape[found.weight])
    if found.panel and found.panel != nv * lanes:
        raise CompileError(f"kernel {k.name}: weight panels of {found.panel} columns, not the tile's {nv * lanes}")
    with IRBuilder() as ib, T.prim_func():
        args = sizes.arguments(c, k, shape)
        h = T.decl_buffer((rows, n), "float32", data=args[k.output].data)   # (bmm's trailing size-1 dimension dropped)
        starts = T.decl_buffer((rows + 1,), "int32", scope="global")
        count = T.decl_buffer((1,), "int32", scope="global")
        _runs(args[found.groups], rows, starts, count)
        tile = Tile(mr, nv, lanes, n, depth, bool(found.panel))
        with T.parallel(0, (n + tile.cols - 1) // tile.cols) as t, T.serial(0, count[0]) as run:
            lo, hi = starts[run], starts[run + 1]
            expert = T.bind(tirx.Cast("int64", args[found.groups][lo]))
            with T.serial(0, (hi - lo + mr - 1) // mr) as m0:
                tile.emit([tirx.min(lo + m0 * mr + i, hi - 1) for i in range(mr)], t, expert,
                          args[found.x], args[found.weight], h)
    return ib.get()


def _runs(groups: Any, rows: Any, starts: Any, count: Any) -> None:
    """``starts[i]``: the first row of run ``i``, ``starts[count] = rows``."""
    T.buffer_store(count, tirx.const(0, "int32"), [0])
    with T.serial(0, rows) as p:
        with T.If(tirx.Or(p == 0, groups[tirx.max(p, 1) - 1] != groups[p])):
            with T.Then():
                T.buffer_store(starts, tirx.Cast("int32", p), [count[0]])
                T.buffer_store(count, count[0] + 1, [0])
    T.buffer_store(starts, tirx.Cast("int32", rows), [count[0]])


class Tile:
    """A register tile: ``MR`` rows x ``NV`` vectors of ``L`` columns, over the whole depth."""

    def __init__(self, mr: int, nv: int, lanes: int, n: int, depth: Any, panels: bool) -> None:
        if n < lanes:
            raise CompileError(f"grouped kernel: {n} output columns, fewer than a vector's {lanes}")
        self.mr, self.lanes, self.n, self.depth, self.panels = mr, lanes, n, depth, panels
        self.nv = max(1, min(nv, n // lanes))
        self.cols = self.nv * lanes

    def column(self, t: Any, v: int) -> Any:
        """The first column of vector ``v`` of tile ``t`` (the last tile's clamped to fit)."""
        return tirx.min(t * self.cols + v * self.lanes, self.n - self.lanes)

    def weight(self, w: Any, expert: Any, t: Any, d: Any, v: int) -> Any:
        """Vector ``v`` of the weights of tile ``t`` at depth ``d``."""
        if self.panels:
            return w[expert, t, d, tirx.Ramp(v * self.lanes, 1, self.lanes)]
        return w[expert, d, tirx.Ramp(self.column(t, v), 1, self.lanes)]

    def emit(self, rows: list[Any], t: Any, expert: Any, x: Any, w: Any, h: Any) -> None:
        L = self.lanes
        acc = T.decl_buffer((self.mr, self.nv, L), "float32", scope="global")
        for i in range(self.mr):
            for v in range(self.nv):
                T.buffer_store(acc, tirx.Broadcast(tirx.const(0.0, "float32"), L), [i, v, tirx.Ramp(0, 1, L)])
        with T.serial(0, self.depth) as d:
            weights = [T.bind(self.weight(w, expert, t, d, v)) for v in range(self.nv)]
            for i, row in enumerate(rows):
                xb = T.bind(tirx.Broadcast(x[row, d], L))
                for v in range(self.nv):
                    T.buffer_store(acc, acc[i, v, tirx.Ramp(0, 1, L)] + xb * weights[v], [i, v, tirx.Ramp(0, 1, L)])
        for i, row in enumerate(rows):
            for v in range(self.nv):
                T.buffer_store(h, acc[i, v, tirx.Ramp(0, 1, L)], [row, tirx.Ramp(self.column(t, v), 1, L)])
