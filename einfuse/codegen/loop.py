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
* each Einsum is one loop nest over the block's rows and its own variables (:mod:`.loop_einsum`:
  a contraction as a register tile, a row reduction through register shuffles, a map
  vectorized); a map and the row reduction reading it share one pass (the scaled scores and
  their max; ``exp`` and its sum), and a contraction read only by the map after it is stored
  through that map;
* tiles a mask hides are skipped and tiles every point of which passes the loop's filters run a
  copy of the body without them (:mod:`.loop_tiles`).

Values follow the IR's semantics through :class:`~einfuse.codegen.lower.KernelBuilder`'s
expression lowering: filtered or out-of-range reads read their tensor's fill, filtered writes
store it (a key past the sequence's end is ``-inf`` in the scores). Its loops are
:mod:`.loop_frames`' frames.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..errors import CompileError
from ..ir import Cascade, Einsum, IVar, Loop
from ..ir.dtypes import DTYPES
from ..ir.kernels import Kernel
from ..ir.nodes import Access, walk
from ..ir.scope import lhs_vars, reads, reduced_vars
from ..targets import Target
from ..targets.cost import ATTENTION_ROWS
from .loop_einsum import IDENTITY, EinsumNests
from .loop_frames import Entered, LoopFrame
from .loop_tiles import TileTests
from .lower import KernelBuilder, SizeVars, work_dtype
from .op_lowering import cast, const, fold


class LoopBuilder(TileTests, EinsumNests, KernelBuilder):
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
        """The variables indexing every Einsum's output, in the output's order, less those along
        which an Einsum reads what the loop writes at another point (a recurrence's
        ``HG[t,b,g,h] = HS[t,b,j] * W[g,h,j]`` reads all of ``HS[t,b,:]``: ``h`` is no row)."""
        rows = [v for v in lhs_vars(self.k.writes[0]) if v != self.loop.var]
        for e in self.init + self.body:
            rows = [v for v in rows if v in lhs_vars(e)]
        rows = [v for v in rows if not self.read_across(v)]
        if not rows:
            raise CompileError(f"kernel {self.k.name}: no variable indexes every Einsum of the loop")
        return rows

    def read_across(self, v: str) -> bool:
        """Whether an Einsum reads a tensor the loop writes, where its writer has ``v``, at
        another index."""
        at = {e.lhs.tensor: [ix.expr == IVar(v) for ix in e.lhs.indices] for e in self.init + self.body}
        return any(at[a.tensor][i] and ix.expr != IVar(v)
                   for e in self.body + list(self.k.writes) for a in reads(e) if a.tensor in at
                   for i, ix in enumerate(a.indices))

    @property
    def per_step(self) -> bool:
        """Whether the output is indexed by the loop's variable (a recurrence's every step,
        ``Y[b,t,h] = HS[t+1,b,h]``): it is then stored at the end of each step."""
        return self.loop.var in lhs_vars(self.k.writes[0])

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
                if name == self.k.output:
                    for v in self.sizes.loose(self.c, self.k):
                        T.arg(v.name, v)
                d = self.decls[name]
                self.buffers[name] = T.arg(name, T.buffer(self.shape(d), DTYPES[d.dtype].tvm))
            extents = [self.sizes.expr(self.var_extent(v)) for v in outer]
            blocks = tirx.floordiv(self.sizes.expr(extent) + (rows - 1), rows)
            static = [self.var_extent(v) for v in outer] + [extent]
            self.one_block = all(isinstance(n, int) for n in static) and math.prod(static) <= rows
            with self.launch(fold(lambda a, b: a * b, extents + [blocks]), rows) as (p, first):
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
        one parallel loop over the blocks, each block's rows emitted together; with one block
        only, a serial loop, its products parallel over their columns instead (see
        ``across_columns``)."""
        stack = ExitStack()
        stack.enter_context(T.sblock("root"))
        kind = T.serial if self.across_columns else T.parallel
        return Entered(stack, (stack.enter_context(LoopFrame(kind, blocks)), tirx.const(0, "int64")))

    @property
    def across_columns(self) -> bool:
        """Whether each step's products run in parallel over their column groups: when all rows
        are one block (an LSTM of batch 1), which would leave every core but one idle."""
        return self.one_block and self.target.cores > 1

    def emit_block(self, env: dict[str, Any], start: Any) -> None:
        """One block of rows: local buffers, the initial state, the loop, the output."""
        for name in self.k.internal:
            if name not in self.recomputed:
                self.allocate(name, self.row_count)
        last = self.sizes.expr(self.var_extent(self.block)) - 1
        self.row_at = lambda r: tirx.min(start + r, last)  # the overhang repeats row N-1
        for e in self.init:
            self.emit(e, env, frozenset())
        with LoopFrame(T.serial, self.sizes.expr(self.var_extent(self.loop.var))) as t:
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
            if self.per_step:
                self.emit(self.k.writes[0], inner, frozenset({self.loop.var}))
        if not self.per_step:
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

    # ---- values -----------------------------------------------------------------------------------

    def value(self, e: Einsum, env: dict[str, Any]) -> Any:
        value, valid = self.expr(e.rhs, env, self.dtype(e))
        op = self.reduce_op(e)
        if valid is not None and op in ("max", "min") and reduced_vars(e, frozenset({self.loop.var})):
            value = tirx.Select(valid, value, const(IDENTITY[op], self.dtype(e)))
        return value

    def store(self, e: Einsum, env: dict[str, Any], value: Any, masked: bool | None = None) -> None:
        """``value`` stored at ``e``'s output point; a point its filter drops gets the fill (for a
        reduction, only in the pass after it: ``masked``)."""
        d = self.decls[e.lhs.tensor]
        if masked is None:
            masked = not reduced_vars(e, frozenset({self.loop.var}))
        conds = [self.cond(c, env) for c in self.filters(e)] if masked else []
        if conds:
            value = tirx.Select(fold(tirx.And, conds), value, const(d.fill, self.dtype(e)))
        T.buffer_store(self.buffers[e.lhs.tensor], cast(value, DTYPES[d.dtype].tvm), self.indices(e.lhs, env))

    def filters(self, e: Einsum) -> list[Any]:
        """``e``'s output filters, less those this tile is known to pass (see ``full``)."""
        return [c for ix in e.lhs.indices for c in ix.filter if c not in self.proven]

    def load_lhs(self, e: Einsum, env: dict[str, Any]) -> Any:
        return tirx.BufferLoad(self.buffers[e.lhs.tensor], self.indices(e.lhs, env))

    def read(self, a: Access, env: dict[str, Any], work: str) -> tuple[Any, Any]:
        if a.tensor in self.held:
            return cast(self.held[a.tensor], work), None
        if a.tensor in self.recomputed:
            w = self.recomputed[a.tensor]
            at = {ix.expr.name: self.index(read.expr, env)[0] for ix, read in zip(w.lhs.indices, a.indices)}
            value = cast(self.expr(w.rhs, at, self.dtype(w))[0], work)
        elif a.tensor in self.layout:
            value = cast(tirx.BufferLoad(self.buffers[a.tensor], self.indices(a, env)), work)
        else:
            return super().read(a, env, work)
        checks = [self.cond(c, env) for ix in a.indices for c in ix.filter]
        if not checks:
            return value, None
        valid = fold(tirx.And, checks)
        return tirx.Select(valid, value, const(self.decls[a.tensor].fill, work)), valid

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
        return work_dtype(self.decls[e.lhs.tensor].dtype, [self.decls[a.tensor].dtype for a in reads(e)])

    def var_extent(self, v: str) -> Any:
        return self.rank_size[self.ranks[v]]
