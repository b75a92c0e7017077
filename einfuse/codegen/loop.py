"""Lower a ``for`` loop kernel (FuseMax's 1-pass attention) to one scheduled TIR function.

TE cannot express a loop that carries state across iterations (this TVM's ``create_prim_func``
rejects ``te.scan``), so the kernel is built directly as TIR with TVM's IR builder, already
scheduled:

* the *rows* are the variables that index every Einsum's output (attention's batch, head and
  query); the last is split into blocks of ``block_rows`` rows, and one parallel loop runs over
  the others and the blocks (the last block re-computes row N-1 where the block overhangs);
* every tensor the loop writes lives in a per-block local buffer: its row dimension becomes the
  row within the block, the tile dimension of a per-tile tensor is dropped (it is recomputed each
  iteration), and a running tensor (iterative rank, ``RM[t+1] = max(RM[t], ...)``) keeps two
  slots, ``t % 2`` and ``(t+1) % 2``;
* each Einsum is one loop nest over the block's rows and its own variables: a contraction as a
  register tile (rows unrolled x its innermost output variable vectorized, sized by
  :func:`~einfuse.codegen.schedules.cpu.register_tile`; the reduction outside them: ``QK``'s
  scores along the keys, ``P V`` along the head dimension), a row reduction in vector-wide
  partial results reduced through register shuffles, an element-wise map vectorized innermost
  (over the block's rows when it has one value per row); a map and the row reduction reading it
  share one pass (the scaled scores and their max; ``exp`` and its sum);
* tiles a mask hides are skipped (``live``, ``masked_max``) and tiles every point of which passes
  the loop's filters run a copy of the body without them (``full``).

Values follow the IR's semantics through :class:`~einfuse.codegen.lower.KernelBuilder`'s
expression lowering: filtered or out-of-range reads read their tensor's fill, filtered writes
store it (a key past the sequence's end is ``-inf`` in the scores).
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..errors import CompileError
from ..ir import Cascade, Einsum, IBin, IConst, ISym, IVar, Loop
from ..ir.dtypes import DTYPES
from ..ir.nodes import Access, walk
from ..ir.scope import index_atoms, lhs_vars, reads, reduced_vars
from ..targets import ATTENTION_ROWS, Target
from ..ir.kernels import Kernel
from ..targets.cost import rule_tile, rule_vectors
from .lower import KernelBuilder, SizeVars, _work_dtype
from .op_lowering import _cast, _const, _fold, nan_max, nan_min
from .schedules.cpu import register_tile


_IDENTITY = {"+": 0.0, "max": -math.inf, "min": math.inf}
_COMBINE = {"+": lambda a, b: a + b, "max": nan_max, "min": nan_min}   # (nan as torch.amax: see op_lowering.nan_max)


class LoopBuilder(KernelBuilder):
    """Builds a ``loop`` kernel (see :func:`~einfuse.passes.group_kernels.group_kernels`) as a PrimFunc."""

    def __init__(self, c: Cascade, kernel: Kernel, sizes: SizeVars, target: Target) -> None:
        super().__init__(c, kernel, sizes)
        self.target = target
        self.loop = next(s for s in c.stmts if isinstance(s, Loop)
                         and any(e.lhs.tensor in kernel.internal for e, _ in walk(s.body)))
        self.body = [e for e, _ in walk(self.loop.body)]
        inside = set(kernel.internal)
        outside = [s for s in c.stmts if isinstance(s, Einsum) and s.lhs.tensor in inside]
        self.init = [s for s in outside if any(r.iterative for r in self.decls[s.lhs.tensor].ranks)]
        self.recomputed = {s.lhs.tensor: s for s in outside if s not in self.init}  # computed where read
        self.rows = self.row_vars()
        self.body = self.sunk(self.body)
        self.in_place = self.updated_in_place()
        self.buffers: dict[str, Any] = {}
        self.layout: dict[str, list[str]] = {}
        self.proven: frozenset = frozenset()   # filters the tile being emitted passes everywhere
        self.held: dict[str, Any] = {}           # tensors whose value at the point is in registers

    vectorized = staticmethod(T.vectorized)   # how loops over vector lanes are emitted
    block_rows = ATTENTION_ROWS   # query rows per block: K and V tiles serve 96 rows (64: 1.1x slower on AVX2)

    def updated_in_place(self) -> set[str]:
        """The running tensors that the loop reads only where it writes their next value, at the
        same point (``RNV[t+1,r,f] = PV[r,f] + RNV[t,r,f] * F[r]``): one slot holds both values,
        as each point is read just before it is overwritten (the numerator's two 64 x 64 slots
        took all of a 32 KiB L1)."""
        out = set()
        for e in self.body:
            name = e.lhs.tensor
            d = self.decls[name]
            if not any(r.iterative for r in d.ranks):
                continue
            readers = [x for x in self.body if any(a.tensor == name for a in reads(x))]
            others = [ix for ix, r in zip(e.lhs.indices, d.ranks) if not r.iterative]
            if readers == [e] and all([ix for ix, r in zip(a.indices, d.ranks) if not r.iterative] == others
                                      for a in reads(e) if a.tensor == name):
                out.add(name)
        return out

    def sunk(self, body: list[Einsum]) -> list[Einsum]:
        """``body`` with each contraction moved down to just before the first Einsum that reads
        it, where nothing in between writes what it reads or writes: ``P V`` then sits beside the
        rescale that consumes it (see :meth:`epilogue`)."""
        out = list(body)
        for e in body:
            if not self.own_vars(e, frozenset({self.loop.var})) or not reduced_vars(e):
                continue
            k = out.index(e)
            readers = [j for j in range(k + 1, len(out)) if any(a.tensor == e.lhs.tensor for a in reads(out[j]))]
            touched = {a.tensor for a in reads(e)} | {e.lhs.tensor}
            if readers and not any(x.lhs.tensor in touched for x in out[k + 1:readers[0]]):
                out.insert(readers[0] - 1, out.pop(k))
        return out

    @property
    def lanes(self) -> int:
        """float32 lanes of a vector: the width of row reductions' partial results."""
        return self.target.vector_lanes

    def own_vars(self, e: Einsum, bound: frozenset[str]) -> list[str]:
        """``e``'s output variables besides the rows and the ``bound`` ones (the loop's)."""
        return [v for v in lhs_vars(e) if v not in self.rows and v not in bound]

    def row_vars(self) -> list[str]:
        """The variables indexing every Einsum's output, in the output's order."""
        rows = lhs_vars(self.k.writes[0])
        for e in self.init + self.body:
            rows = [v for v in rows if v in lhs_vars(e)]
        if not rows:
            raise CompileError(f"kernel {self.k.name}: no variable indexes every Einsum of the loop")
        return rows

    # ---- the function ---------------------------------------------------------------------------

    def prim_func(self) -> tirx.PrimFunc:
        """The kernel as a PrimFunc with parameters (inputs..., output)."""
        *outer, block = self.rows
        extent = self.var_extent(block)
        rows = min(self.block_rows, extent) if isinstance(extent, int) else self.block_rows
        self.block, self.row_count = block, rows
        with IRBuilder() as ib, T.prim_func():
            T.func_name(self.k.name)
            for name in self.k.inputs + (self.k.output,):
                d = self.decls[name]
                self.buffers[name] = T.arg(name, T.buffer(self.shape(d), DTYPES[d.dtype].tvm))
            extents = [self.sizes.expr(self.var_extent(v)) for v in outer]
            blocks = tirx.floordiv(self.sizes.expr(extent) + (rows - 1), rows)
            with self.launch(_fold(lambda a, b: a * b, extents + [blocks]), rows) as (p, first):
                # the block varies fastest: each thread's share of the parallel loop then
                # holds early and late query blocks alike (a causal mask skips more in early ones)
                start, p = tirx.floormod(p, blocks) * rows + first, tirx.floordiv(p, blocks)
                env = {}
                for v, ext in reversed(list(zip(outer, extents))):
                    env[v], p = tirx.floormod(p, ext), tirx.floordiv(p, ext)
                self.emit_block(env, start)
        return ib.get()

    def launch(self, blocks: Any, rows: int) -> Any:
        """A context over the blocks of rows, giving (the block, the first row it emits in it):
        one parallel loop over the blocks, each block's rows emitted together."""
        stack = ExitStack()
        stack.enter_context(T.sblock("root"))
        return _Entered(stack, (stack.enter_context(_loop(T.parallel, blocks)), tirx.const(0, "int64")))

    def emit_block(self, env: dict[str, Any], start: Any) -> None:
        """One block of rows: local buffers, the initial state, the loop, the output."""
        for name in self.k.internal:
            if name not in self.recomputed:
                self.allocate(name, self.row_count)
        last = self.sizes.expr(self.var_extent(self.block)) - 1
        self.row_at = lambda r: tirx.min(start + r, last)  # the overhang repeats row N-1
        for e in self.init:
            self.emit(e, env, frozenset())
        with _loop(T.serial, self.sizes.expr(self.var_extent(self.loop.var))) as t:
            inner = {**env, self.loop.var: t}
            self.stage(inner)
            live = self.live(inner)
            if live is None:
                self.emit_tile(inner)
            else:
                with T.If(live):
                    with T.Then():
                        self.emit_tile(inner)
                    with T.Else():
                        self.carry(t)
        self.emit(self.k.writes[0], env, frozenset())

    def stage(self, env: dict[str, Any]) -> None:
        """Work at the start of each tile, before any row decides to skip it (none on a CPU; a
        GPU block copies the tile's K and V to shared memory here)."""

    def emit_tile(self, env: dict[str, Any]) -> None:
        """One tile: the body without the filters every point of it passes, when that holds."""
        full = self.full(env)
        if full is None:
            self.emit_body(env)
            return
        with T.If(full[0]):
            with T.Then():
                self.proven = full[1]
                self.emit_body(env)
                self.proven = frozenset()
            with T.Else():
                self.emit_body(env)

    def emit_body(self, env: dict[str, Any], body: list[Einsum] | None = None) -> None:
        """The loop's body; a map and the row reduction after it that reads it share one pass.
        After the tile's row maxima (see ``masked_max``) the rest runs only if one is above
        ``-inf``: a tile a mask hides from every row of the block (a causal mask written as an
        additive bias) changes no running value, like the tiles ``live`` skips."""
        bound = frozenset({self.loop.var})
        body = self.body if body is None else body
        k = 0
        while k < len(body):
            e, after = body[k], body[k + 1] if k + 1 < len(body) else None
            if after is not None and self.fused(e, after, bound):
                self.row_reduction(after, env, reduced_vars(after, bound), first=e)
                e, k = after, k + 2
            elif after is not None and self.epilogue(e, after, bound, body[k + 2:]):
                self.emit(e, env, bound, epilogue=after)
                e, k = after, k + 2
            else:
                self.emit(e, env, bound)
                k += 1
            if body is self.body and self.masked_max(e, body[:k]) and k < len(body):
                with T.If(self.any_above(e.lhs.tensor)):
                    with T.Then():
                        self.emit_body(env, body[k:])
                    with T.Else():
                        self.carry(env[self.loop.var])
                return

    def masked_max(self, e: Einsum, done: list[Einsum]) -> bool:
        """Whether ``e`` takes each row's max over the tile of a tensor whose absent points are
        ``-inf``, with no running tensor written yet (so skipping the rest is carrying them)."""
        written = [self.layout.get(d.lhs.tensor, []) for d in done]
        return (e.reduce is not None and e.reduce.op == "max" and not any("slot" in r for r in written)
                and all(self.decls[a.tensor].fill == -math.inf for a in reads(e))
                and set(self.layout.get(e.lhs.tensor, [])) <= {"row", "drop"})

    def any_above(self, name: str) -> Any:
        """Whether a row of the block has its ``name`` (one value per row) other than ``-inf``
        (above it, or ``nan``: a ``nan`` score reaches every running value)."""
        flag = T.decl_buffer([1], "float32", scope="local")
        T.buffer_store(flag, _const(0.0, "float32"), [0])
        with _loop(T.serial, self.row_count) as r:
            masked = tirx.EQ(tirx.BufferLoad(self.buffers[name], [r]), _const(-math.inf, "float32"))
            T.buffer_store(flag, tirx.Select(masked, flag[0], _const(1.0, "float32")), [0])
        return flag[0] > _const(0.0, "float32")

    def fused(self, e: Einsum, after: Einsum, bound: frozenset[str]) -> bool:
        """Whether ``after`` reduces, one row at a time, along the one variable the map ``e`` adds
        to the rows (``BQK[r,i]`` then ``LM[r] = max over i``; ``SLN`` then ``SLD``), reads ``e``,
        and the vector width divides that variable's static extent."""
        own = self.own_vars(e, bound)
        red = reduced_vars(after, bound)
        extent = self.var_extent(red[0]) if len(red) == 1 else None
        return (not reduced_vars(e, bound) and e.populate is None and after.populate is None and own == red
                and not self.own_vars(after, bound)
                and not any(ix.filter for ix in after.lhs.indices)
                and any(a.tensor == e.lhs.tensor for a in reads(after))
                and isinstance(extent, int) and self.lanes > 1 and extent % self.lanes == 0)

    def epilogue(self, e: Einsum, after: Einsum, bound: frozenset[str], rest: list[Einsum]) -> bool:
        """Whether the map ``after`` is the only reader of the contraction ``e`` and reads it at
        ``e``'s output point (``RNV[t+1,r,f] = PV[r,f] + RNV[t,r,f] * F[r]``): it is then applied to
        ``e``'s register tile as the tile is stored, and ``e`` itself never reaches memory."""
        own = self.own_vars(e, bound)
        name = e.lhs.tensor
        return (bool(own) and isinstance(self.var_extent(own[-1]), int) and bool(reduced_vars(e, bound))
                and e.populate is None and after.populate is None
                and not any(ix.filter for ix in e.lhs.indices) and not reduced_vars(after, bound)
                and self.own_vars(after, bound) == own
                and [a.indices for a in reads(after) if a.tensor == name] == [e.lhs.indices]
                and not any(a.tensor == name for x in [*rest, *self.k.writes] for a in reads(x)))

    def live(self, env: dict[str, Any]) -> Any:
        """When this tile may hold a point of the masked scores, or None if every tile may.

        The masked scores are a filtered tensor with empty value ``-inf`` (a causal mask's
        ``QK[t,s,i: t*T+i<=s]``). In FuseMax's cascade a tile of them that is ``-inf`` everywhere
        changes no running value (``exp(-inf) = 0``, ``max`` ignores it), so it is skipped."""
        tests = [self.bound_test(c, env, every=False) for c in self.tile_filters(masked_only=True)]
        return _fold(tirx.And, tests) if tests else None

    def full(self, env: dict[str, Any]) -> tuple[Any, frozenset] | None:
        """When every point of this tile passes the loop's tile-dependent filters (all tiles
        but a ragged last one; the tiles below a causal mask's diagonal), and those filters:
        the body is then emitted a second time without them (no compare and select per score)."""
        conds = self.tile_filters(masked_only=False)
        if not conds:
            return None
        return _fold(tirx.And, [self.bound_test(c, env, every=True) for c in conds]), frozenset(conds)

    def tile_filters(self, masked_only: bool) -> list[Any]:
        """The body's output filters that depend on the tile and whose sides never decrease as a
        variable grows (``t*T+i < N``, ``t*T+i <= s``); ``masked_only``: those of ``-inf`` tensors."""
        out = []
        for e in self.body:
            if masked_only and self.decls[e.lhs.tensor].empty != -math.inf:
                continue
            out += [c for ix in e.lhs.indices for c in ix.filter
                    if self.loop.var in _vars(c.lhs) | _vars(c.rhs) and c.cmp in ("<", "<=", ">", ">=")
                    and _monotone(c.lhs) and _monotone(c.rhs)]
        return out

    def bound_test(self, c: Any, env: dict[str, Any], every: bool) -> Any:
        """Whether the comparison ``c`` holds at some point of the tile and block (its smaller
        side's least value against the larger side's greatest) or, ``every``, at all of them."""
        small, big = (c.lhs, c.rhs) if c.cmp in ("<", "<=") else (c.rhs, c.lhs)
        low = self.index(small, self.corner(env, -1 if every else 0))[0]
        high = self.index(big, self.corner(env, 0 if every else -1))[0]
        return low < high if c.cmp in ("<", ">") else low <= high

    def corner(self, env: dict[str, Any], end: int) -> dict[str, Any]:
        """``env`` with the block's first (``end`` 0) or last (-1) row and every other free
        variable at its first or last value."""
        out = dict(env)
        for v, rank in self.ranks.items():
            if v not in out:
                out[v] = tirx.const(0, "int64") if end == 0 else self.sizes.expr(self.rank_size[rank]) - 1
        out[self.block] = self.row_at(0 if end == 0 else self.row_count - 1)
        return out

    def carry(self, t: Any) -> None:
        """A skipped tile: every running tensor's next slot is its current one."""
        for name, roles in self.layout.items():
            if "slot" not in roles or name in self.in_place:
                continue
            buf = self.buffers[name]
            with ExitStack() as stack:
                idx = [stack.enter_context(_loop(self.vectorized if k == len(buf.shape) - 1 else T.serial, n))
                       for k, n in enumerate(buf.shape) if k > 0]
                T.buffer_store(buf, tirx.BufferLoad(buf, [tirx.floormod(t, 2)] + idx),
                               [tirx.floormod(t + 1, 2)] + idx)

    def allocate(self, name: str, rows: int) -> None:
        """A local buffer for a tensor the loop writes, with each dimension's role in ``layout``."""
        d = self.decls[name]
        (w,) = [e for e in self.init + self.body if e.lhs.tensor == name][:1]
        roles, shape = [], []
        for ix, r in zip(w.lhs.indices, d.ranks):
            x = ix.expr
            if isinstance(x, IVar) and (x.name in self.rows or x.name == self.loop.var) and x.name != self.block:
                roles.append("drop")
            elif r.iterative:
                roles.append("slot"), shape.append(1 if name in self.in_place else 2)
            elif isinstance(x, IVar) and x.name == self.block:
                roles.append("row"), shape.append(rows)
            else:
                size = self.rank_size[r.rank]
                if not isinstance(size, int):
                    raise CompileError(f"kernel {self.k.name}: {name}'s rank {r.rank} is not static")
                roles.append("keep"), shape.append(size)
        self.layout[name] = roles
        self.buffers[name] = T.decl_buffer(shape, DTYPES[d.dtype].tvm, scope="local")

    # ---- one Einsum -----------------------------------------------------------------------------

    def emit(self, e: Einsum, env: dict[str, Any], bound: frozenset[str], epilogue: Einsum | None = None) -> None:
        """``e`` over the block: a loop nest over the block's rows and its own variables (a
        contraction's ``epilogue``: see :meth:`epilogue`)."""
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
        # at most as wide as the rule's tile: a 4 x 24 tile (all 16 AVX2 registers) spilled its
        # accumulators here, where its row operand is broadcast from the block's buffers
        # (96-wide heads: 2.3x slower than 6 x 16)
        widest = rule_vectors(self.target.registers) if self.lanes > 1 else 4
        unroll, width = register_tile(self.target, extent if isinstance(extent, int) else None, self.row_count,
                                      vectors=widest)
        if isinstance(extent, int) and extent > width and extent % width:   # (whole chunks only, below)
            unroll, width = rule_tile(self.lanes, self.target.registers, extent)
        while self.row_count % unroll:
            unroll -= 1
        # a row wider than the register tile (a 64-wide head on AVX2's 16-lane tile) is done in
        # column chunks of the tile's width, each with its reduction: its accumulators then fit
        # the registers (all 64 columns of 4 rows took 32 registers of 16 and spilled)
        chunks = extent // width if isinstance(extent, int) and extent > width and extent % width == 0 else 1
        with ExitStack() as stack:   # the tile's rows, then its other output variables
            group = stack.enter_context(_loop(T.serial, self.row_count // unroll))
            at = dict(env)
            for v in own[:-1]:
                at[v] = stack.enter_context(_loop(T.serial, self.sizes.expr(self.var_extent(v))))
            chunk = stack.enter_context(_loop(T.serial, chunks)) if chunks > 1 else None
            span = (chunk, width) if chunk is not None else None
            # the accumulators: a buffer of the tile's own, so LLVM keeps it in registers whatever
            # else the kernel writes (accumulated in the block's buffer, they were stored on
            # every step once: 2x slower)
            acc = T.decl_buffer([unroll, extent], self.dtype(e), scope="local") if isinstance(extent, int) else None
            with self.tile(at, group, unroll, own[-1], span) as point:
                self.accumulate(e, point, acc, _const(_IDENTITY[op], self.dtype(e)))
            with ExitStack() as reduction:
                for v in red:
                    at[v] = reduction.enter_context(_loop(T.serial, self.sizes.expr(self.var_extent(v))))
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
        row = stack.enter_context(_loop(T.unroll, unroll))
        extent = self.var_extent(vector) if span is None else span[1]
        if isinstance(extent, int) and 1 < self.lanes < extent and extent % self.lanes == 0:
            # whole vectors, unrolled: a loop vectorized over 24 lanes becomes LLVM vectors it
            # splits with shuffles (96-wide heads ran 5.7x slower than torch's SDPA)
            vectors = stack.enter_context(_loop(T.unroll, extent // self.lanes))
            lanes = vectors * self.lanes + stack.enter_context(_loop(self.vectorized, self.lanes))
        else:
            lanes = stack.enter_context(_loop(self.vectorized if isinstance(extent, int) else T.serial,
                                              self.sizes.expr(extent)))
        column = lanes if span is None else span[0] * span[1] + lanes
        at = {**env, vector: column, "@row": group * unroll + row, "@tile": [row, column]}
        at[self.block] = self.row_at(at["@row"])
        return _Entered(stack, at)

    def row_reduction(self, e: Einsum, env: dict[str, Any], red: list[str], first: Einsum | None = None) -> None:
        """A reduction to one value per row, through a vector of partial results when the
        innermost reduced variable has a static extent the vector width divides; ``first``, the
        map it reads (see ``fused``), is computed in the same loop."""
        op, work = self.reduce_op(e), self.dtype(e)
        lanes = self.lanes
        extent = self.var_extent(red[-1])
        if not isinstance(extent, int) or lanes == 1 or extent % lanes:
            with self.nest(env, [], vector=[]) as at:
                self.store(e, at, _const(_IDENTITY[op], work))
            with self.nest(env, red, vector=[]) as at:
                self.store(e, at, _COMBINE[op](self.load_lhs(e, at), self.value(e, at)))
            return
        grouped = self.row_count % lanes == 0   # (then rows are reduced across, a vector of rows at a time)
        parts = T.decl_buffer([self.row_count if grouped else 1, lanes], work, scope="local")
        with self.nest(env, [], vector=[]) as at:
            slot = at["@row"] if grouped else tirx.const(0, "int64")
            with _loop(self.vectorized, lanes) as j:
                T.buffer_store(parts, _const(_IDENTITY[op], work), [slot, j])
            with ExitStack() as stack:
                inner = dict(at)
                for v in red[:-1]:
                    inner[v] = stack.enter_context(_loop(T.serial, self.sizes.expr(self.var_extent(v))))
                j0 = stack.enter_context(_loop(T.serial, extent // lanes))
                j1 = stack.enter_context(_loop(self.vectorized, lanes))
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
        with _loop(T.serial, self.row_count // lanes) as g:
            rows = [tirx.BufferLoad(parts, [g * lanes + k, tirx.Ramp(0, 1, lanes)]) for k in range(lanes)]
            T.buffer_store(result, _across(op, rows, lanes), [tirx.Ramp(g * lanes, 1, lanes)])
        with self.nest(env, [], vector=[self.block]) as at:
            self.store(e, at, result[at["@row"]])

    def nest(self, env: dict[str, Any], order: list[str], vector: list[str]) -> Any:
        """A context giving the environment inside loops over the block's rows then ``order``;
        a static ``vector`` variable is vectorized."""
        return _Nest(self, env, order, vector)

    # ---- values -----------------------------------------------------------------------------------

    def value(self, e: Einsum, env: dict[str, Any]) -> Any:
        value, valid = self.expr(e.rhs, env, self.dtype(e))
        op = self.reduce_op(e)
        if valid is not None and op in ("max", "min") and reduced_vars(e, frozenset({self.loop.var})):
            value = tirx.Select(valid, value, _const(_IDENTITY[op], self.dtype(e)))
        return value

    def store(self, e: Einsum, env: dict[str, Any], value: Any, masked: bool | None = None) -> None:
        """``value`` stored at ``e``'s output point; a point its filter drops gets the fill (for a
        reduction, only in the pass after it: ``masked``)."""
        d = self.decls[e.lhs.tensor]
        if masked is None:
            masked = not reduced_vars(e, frozenset({self.loop.var}))
        conds = [self.cond(c, env) for c in self.filters(e)] if masked else []
        if conds:
            value = tirx.Select(_fold(tirx.And, conds), value, _const(d.fill, self.dtype(e)))
        T.buffer_store(self.buffers[e.lhs.tensor], _cast(value, DTYPES[d.dtype].tvm), self.indices(e.lhs, env))

    def filters(self, e: Einsum) -> list[Any]:
        """``e``'s output filters, less those this tile is known to pass (see ``full``)."""
        return [c for ix in e.lhs.indices for c in ix.filter if c not in self.proven]

    def load_lhs(self, e: Einsum, env: dict[str, Any]) -> Any:
        return tirx.BufferLoad(self.buffers[e.lhs.tensor], self.indices(e.lhs, env))

    def read(self, a: Access, env: dict[str, Any], work: str) -> tuple[Any, Any]:
        if a.tensor in self.held:
            return _cast(self.held[a.tensor], work), None
        if a.tensor in self.recomputed:
            w = self.recomputed[a.tensor]
            at = {ix.expr.name: self.index(read.expr, env)[0] for ix, read in zip(w.lhs.indices, a.indices)}
            value = _cast(self.expr(w.rhs, at, self.dtype(w))[0], work)
        elif a.tensor in self.layout:
            value = _cast(tirx.BufferLoad(self.buffers[a.tensor], self.indices(a, env)), work)
        else:
            return super().read(a, env, work)
        checks = [self.cond(c, env) for ix in a.indices for c in ix.filter]
        if not checks:
            return value, None
        valid = _fold(tirx.And, checks)
        return tirx.Select(valid, value, _const(self.decls[a.tensor].fill, work)), valid

    def indices(self, a: Access, env: dict[str, Any]) -> list[Any]:
        """Where ``a`` is stored: the output's global indices, or a local buffer's (see ``allocate``)."""
        if a.tensor not in self.layout:
            return [self.index(ix.expr, env)[0] for ix in a.indices]
        out = []
        for ix, role in zip(a.indices, self.layout[a.tensor]):
            if role == "slot":
                out.append(tirx.const(0, "int64") if a.tensor in self.in_place else
                           tirx.floormod(self.index(ix.expr, env)[0], 2))
            elif role == "row":
                if ix.expr != IVar(self.block):
                    raise CompileError(f"kernel {self.k.name}: {a.tensor} is read at another row")
                out.append(env["@row"])
            elif role == "keep":
                out.append(self.index(ix.expr, env)[0])
        return out

    def extents(self, name: str) -> list[Any]:
        return list(self.buffers[name].shape)

    def load(self, name: str, idx: list[Any]) -> Any:
        return tirx.BufferLoad(self.buffers[name], idx)

    def reduce_op(self, e: Einsum) -> str:
        return e.reduce.op if e.reduce else "+"

    def dtype(self, e: Einsum) -> str:
        return _work_dtype(self.decls[e.lhs.tensor].dtype, [self.decls[a.tensor].dtype for a in reads(e)])

    def var_extent(self, v: str) -> Any:
        return self.rank_size[self.ranks[v]]


class _Nest:
    """Loops over a block's rows and some variables, entered as one context (see ``nest``)."""

    def __init__(self, b: LoopBuilder, env: dict[str, Any], order: list[str], vector: list[str]) -> None:
        self.b, self.env, self.order, self.vector = b, env, order, vector
        self.stack = ExitStack()

    def __enter__(self) -> dict[str, Any]:
        b, env, enter = self.b, dict(self.env), self.stack.enter_context
        env["@row"] = enter(_loop(b.vectorized if self.vector == [b.block] else T.serial, b.row_count))
        for v in self.order:
            extent = b.var_extent(v)
            kind = b.vectorized if v in self.vector and isinstance(extent, int) else T.serial
            env[v] = enter(_loop(kind, b.sizes.expr(extent)))
        env[b.block] = b.row_at(env["@row"])
        return env

    def __exit__(self, *exc: object) -> None:
        self.stack.__exit__(*exc)


def serial_launch(blocks: Any, rows: int) -> "_Entered":
    """A context over the blocks of rows and a block's rows as two serial loops, giving (the
    block, the row): one row at a time, for code that runs where the rows are not threads."""
    stack = ExitStack()
    stack.enter_context(T.sblock("root"))
    block, row = stack.enter_context(_loop(T.serial, blocks)), stack.enter_context(_loop(T.serial, rows))
    return _Entered(stack, (block, row))


class _Entered:
    """A context that has entered its frames already and gives ``value``."""

    def __init__(self, stack: ExitStack, value: Any) -> None:
        self.stack, self.value = stack, value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        self.stack.__exit__(*exc)


class _loop:
    """A loop frame of ``kind`` over ``[0, extent)``; entering gives its variable as int64 (TIR's
    loop variables are int32, the kernel's index arithmetic is int64)."""

    def __init__(self, kind: Any, extent: Any) -> None:
        extent = tirx.const(extent, "int64") if isinstance(extent, int) else extent
        if isinstance(extent, tirx.IntImm):
            extent = tirx.const(int(extent.value), "int32")
        self.frame = kind(0, tirx.Cast("int32", extent) if str(extent.ty) != "int32" else extent)

    def __enter__(self) -> Any:
        return tirx.Cast("int64", self.frame.__enter__())

    def __exit__(self, *exc: object) -> None:
        self.frame.__exit__(*exc)


def _vars(x: Any) -> set[str]:
    return {a.name for a in index_atoms(x) if isinstance(a, IVar)}


def _monotone(x: Any) -> bool:
    """Whether an index expression never decreases when a variable grows (sums and products of
    variables, sizes and non-negative constants)."""
    if isinstance(x, (IVar, ISym)):
        return True
    if isinstance(x, IConst):
        return x.value >= 0
    return isinstance(x, IBin) and x.op in ("+", "*") and _monotone(x.a) and _monotone(x.b)


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
