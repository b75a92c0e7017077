"""One Einsum of a loop kernel's body over a block of rows, mixed into
:class:`~einfuse.codegen.loop.LoopBuilder`: each Einsum is one loop nest over the block's rows
and its own variables,

* a contraction as a register tile (rows unrolled x its innermost output variable vectorized,
  sized by :meth:`~einfuse.targets.Target.register_tile`; the reduction outside them:
  ``QK``'s scores along the keys, ``P V`` along the head dimension), optionally stored through
  the map that consumes it (its epilogue);
* a row reduction in vector-wide partial results reduced through register shuffles (with the
  map it reads in the same pass: the scaled scores and their max; ``exp`` and its sum);
* an element-wise map vectorized innermost (over the block's rows when it has one value per row).
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from ..errors import CompileError
from ..ir import Einsum
from ..ir.scope import reduced_vars
from ..targets.cost import rule_tile, rule_vectors
from .loop_frames import Entered, LoopFrame, Nest
from .op_lowering import const, nan_max, nan_min

IDENTITY = {"+": 0.0, "max": -math.inf, "min": math.inf}
_COMBINE = {"+": lambda a, b: a + b, "max": nan_max, "min": nan_min}   # (nan as torch.amax: see op_lowering.nan_max)


class EinsumNests:
    """The loop nests of one Einsum over the block (the rows, the values and the stores are
    :class:`~einfuse.codegen.loop.LoopBuilder`'s)."""

    def emit(self, e: Einsum, env: dict[str, Any], bound: frozenset[str], epilogue: Einsum | None = None) -> None:
        """``e`` over the block: a loop nest over the block's rows and its own variables (a
        contraction's ``epilogue``: see :meth:`.LoopBuilder.epilogue`)."""
        if e.populate is not None:
            raise CompileError(f"kernel {self.k.name}: no code generation for '{e.lhs.tensor}' inside a loop")
        own = self.own_vars(e, bound)
        red = reduced_vars(e, bound)
        if not red:  # (a map of one value per row is vectorized over the block's rows)
            with self.nest(env, own, vector=own[-1:] or [self.block]) as at:
                self.store(e, at, self.value(e, at))
            return
        if own:
            self.contraction(e, env, own, red, epilogue)
        else:
            self.row_reduction(e, env, red)
        if self.filters(e):  # a reduction is filtered once it is complete
            with self.nest(env, own, vector=own[-1:]) as at:
                self.store(e, at, self.load_lhs(e, at), masked=True)

    def contraction(self, e: Einsum, env: dict[str, Any], own: list[str], red: list[str],
                    epilogue: Einsum | None = None) -> None:
        """A register tile: rows (as many as ``register_tile`` gives) x the innermost output
        variable, the reduction outside; stored through the map ``epilogue`` if there is one."""
        op = self.reduce_op(e)
        extent = self.var_extent(own[-1])
        unroll, width, chunks = self.tile_shape(extent)
        with ExitStack() as stack:   # the tile's rows, then its other output variables
            group = stack.enter_context(LoopFrame(T.serial, self.row_count // unroll))
            at = dict(env)
            kind = T.parallel if self.across_columns else T.serial   # (the first column loop)
            for v in own[:-1]:
                at[v] = stack.enter_context(LoopFrame(kind, self.sizes.expr(self.var_extent(v))))
                kind = T.serial
            chunk = stack.enter_context(LoopFrame(kind, chunks)) if chunks > 1 else None
            span = (chunk, width) if chunk is not None else None
            # the accumulators: a buffer of the tile's own, so LLVM keeps it in registers whatever
            # else the kernel writes (accumulated in the block's buffer, they were stored on
            # every step once: 2x slower)
            acc = T.decl_buffer([unroll, extent], self.dtype(e), scope="local") if isinstance(extent, int) else None
            with self.tile(at, group, unroll, own[-1], span) as point:
                self.accumulate(e, point, acc, const(IDENTITY[op], self.dtype(e)))
            with ExitStack() as reduction:
                for v in red:
                    at[v] = reduction.enter_context(LoopFrame(T.serial, self.sizes.expr(self.var_extent(v))))
                with self.tile(at, group, unroll, own[-1], span) as point:
                    current = self.load_lhs(e, point) if acc is None else acc[point["@tile"]]
                    self.accumulate(e, point, acc, _COMBINE[op](current, self.value(e, point)))
            if acc is not None:
                with self.tile(at, group, unroll, own[-1], span) as point:
                    if epilogue is None:
                        self.store(e, point, acc[point["@tile"]])
                    else:
                        self.held[e.lhs.tensor] = acc[point["@tile"]]
                        self.store(epilogue, point, self.value(epilogue, point))
                        del self.held[e.lhs.tensor]

    def tile_shape(self, extent: Any) -> tuple[int, int, int]:
        """A contraction's register tile over an innermost output variable of ``extent``: (the
        rows unrolled, the columns, how many chunks of those columns make the variable)."""
        # at most as wide as the rule's tile: a 4 x 24 tile (all 16 AVX2 registers) spilled its
        # accumulators here, where its row operand is broadcast from the block's buffers
        # (96-wide heads: 2.3x slower than 6 x 16)
        widest = rule_vectors(self.target.registers) if self.lanes > 1 else 4
        unroll, width = self.target.register_tile(extent if isinstance(extent, int) else None, self.row_count,
                                      vectors=widest)
        if isinstance(extent, int) and extent > width and extent % width:   # (whole chunks only, below)
            unroll, width = rule_tile(self.lanes, self.target.registers, extent)
        while self.row_count % unroll:
            unroll -= 1
        # a row wider than the register tile (a 64-wide head on AVX2's 16-lane tile) is done in
        # column chunks of the tile's width, each with its reduction: its accumulators then fit
        # the registers (all 64 columns of 4 rows took 32 registers of 16 and spilled)
        chunks = extent // width if isinstance(extent, int) and extent > width and extent % width == 0 else 1
        return unroll, width, chunks

    def accumulate(self, e: Einsum, point: dict[str, Any], acc: Any, value: Any) -> None:
        """``value`` into the tile's accumulators, or into ``e``'s buffer when there are none."""
        if acc is None:
            self.store(e, point, value)
        else:
            T.buffer_store(acc, value, point["@tile"])

    def tile(self, env: dict[str, Any], group: Any, unroll: int, vector: str, span: tuple[Any, int] | None = None) -> Any:
        """The points of a register tile: ``unroll`` rows of the row group ``group`` (unrolled)
        x the variable ``vector`` (vectorized when static), or of its ``span`` = (chunk,
        width): the columns ``chunk * width`` onwards."""
        stack = ExitStack()
        row = stack.enter_context(LoopFrame(T.unroll, unroll))
        extent = self.var_extent(vector) if span is None else span[1]
        if isinstance(extent, int) and 1 < self.lanes < extent and extent % self.lanes == 0:
            # whole vectors, unrolled: a loop vectorized over 24 lanes becomes LLVM vectors it
            # splits with shuffles (96-wide heads ran 5.7x slower than torch's SDPA)
            vectors = stack.enter_context(LoopFrame(T.unroll, extent // self.lanes))
            lanes = vectors * self.lanes + stack.enter_context(LoopFrame(self.vectorized, self.lanes))
        else:
            lanes = stack.enter_context(LoopFrame(self.vectorized if isinstance(extent, int) else T.serial,
                                              self.sizes.expr(extent)))
        column = lanes if span is None else span[0] * span[1] + lanes
        at = {**env, vector: column, "@row": group * unroll + row, "@tile": [row, column]}
        at[self.block] = self.row_at(at["@row"])
        return Entered(stack, at)

    def row_reduction(self, e: Einsum, env: dict[str, Any], red: list[str], first: Einsum | None = None) -> None:
        """A reduction to one value per row, through a vector of partial results when the
        innermost reduced variable has a static extent the vector width divides; ``first``, the
        map it reads (see ``fused``), is computed in the same loop."""
        op, work = self.reduce_op(e), self.dtype(e)
        lanes = self.lanes
        extent = self.var_extent(red[-1])
        if not isinstance(extent, int) or lanes == 1 or extent % lanes:
            with self.nest(env, [], vector=[]) as at:
                self.store(e, at, const(IDENTITY[op], work))
            with self.nest(env, red, vector=[]) as at:
                self.store(e, at, _COMBINE[op](self.load_lhs(e, at), self.value(e, at)))
            return
        grouped = self.row_count % lanes == 0   # (then rows are reduced across, a vector of rows at a time)
        parts = T.decl_buffer([self.row_count if grouped else 1, lanes], work, scope="local")
        with self.nest(env, [], vector=[]) as at:
            slot = at["@row"] if grouped else tirx.const(0, "int64")
            with LoopFrame(self.vectorized, lanes) as j:
                T.buffer_store(parts, const(IDENTITY[op], work), [slot, j])
            with ExitStack() as stack:
                inner = dict(at)
                for v in red[:-1]:
                    inner[v] = stack.enter_context(LoopFrame(T.serial, self.sizes.expr(self.var_extent(v))))
                j0 = stack.enter_context(LoopFrame(T.serial, extent // lanes))
                j1 = stack.enter_context(LoopFrame(self.vectorized, lanes))
                inner[red[-1]] = j0 * lanes + j1
                if first is not None:
                    self.store(first, inner, self.value(first, inner))
                T.buffer_store(parts, _COMBINE[op](parts[slot, j1], self.value(e, inner)), [slot, j1])
            if not grouped:
                self.store(e, at, _horizontal(op, tirx.BufferLoad(parts, [0, tirx.Ramp(0, 1, lanes)]), lanes))
        if grouped:
            self.rows_reduced(e, env, parts, lanes)

    def rows_reduced(self, e: Einsum, env: dict[str, Any], parts: Any, lanes: int) -> None:
        """``e``'s rows from their partial vectors (``parts``, one per row), ``lanes`` rows at a
        time: a transposing tree of shuffles leaves one row's result in each lane (the halves of
        one row at a time were a chain of dependent steps per row, 15 % of ViT's attention)."""
        op, work = self.reduce_op(e), self.dtype(e)
        result = T.decl_buffer([self.row_count], work, scope="local")
        with LoopFrame(T.serial, self.row_count // lanes) as g:
            rows = [tirx.BufferLoad(parts, [g * lanes + k, tirx.Ramp(0, 1, lanes)]) for k in range(lanes)]
            T.buffer_store(result, _across(op, rows, lanes), [tirx.Ramp(g * lanes, 1, lanes)])
        with self.nest(env, [], vector=[self.block]) as at:
            self.store(e, at, result[at["@row"]])

    def nest(self, env: dict[str, Any], order: list[str], vector: list[str]) -> Any:
        """A context giving the environment inside loops over the block's rows then ``order``;
        a static ``vector`` variable is vectorized."""
        return Nest(self, env, order, vector)


def _across(op: str, vectors: list[Any], lanes: int) -> Any:
    """The ``op``-reduction of each of ``lanes`` vectors, as one vector (lane k: vector k's).
    Each step pairs vectors holding ``rows`` rows of ``part`` partial results each and combines
    their halves: one vector of twice the rows, half the partials."""
    rows = 1
    while len(vectors) > 1:
        part = lanes // rows
        half = part // 2

        def pick(offset: int) -> list[Any]:
            return [tirx.IntImm("int32", source * lanes + r * part + offset + k)
                    for source in (0, 1) for r in range(rows) for k in range(half)]
        vectors = [_COMBINE[op](tirx.Shuffle([a, b], pick(0)), tirx.Shuffle([a, b], pick(half)))
                   for a, b in zip(vectors[::2], vectors[1::2])]
        rows *= 2
    return vectors[0]


def _horizontal(op: str, vector: Any, lanes: int) -> Any:
    """The ``op``-reduction of a vector's lanes as a tree of halves in registers: log2(lanes)
    vector steps, not lanes-1 dependent scalar ones (halves stored and reloaded through memory
    stalled on store forwarding)."""
    while lanes > 1:
        lanes //= 2
        low = tirx.Shuffle([vector], [tirx.IntImm("int32", k) for k in range(lanes)])
        high = tirx.Shuffle([vector], [tirx.IntImm("int32", lanes + k) for k in range(lanes)])
        vector = _COMBINE[op](low, high)
    return vector
