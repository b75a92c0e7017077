"""The ``decode`` kernel (:mod:`einfuse.ir.decode`): a decode step's attention over the cache as
flash-decoding, in TIR.

One PrimFunc in two parallel phases:

1. Chunks. The cache's keys are split into chunks of ``CHUNK``; one task per chunk for all the
   query rows (at most ``ROWS`` of them: a task then reads whole cache rows, every head's, in
   order: 1.1-1.4x faster than a task per head at 16K cached tokens here), or per chunk and per
   combination of the row variables that index the cache (a key/value head: the query rows of
   its group are the task's inner rows, so each cached head is read once for them). A task reads
   its chunk once, a block of ``BLOCK`` keys at a time: each inner row's scores (the ``QK``
   contraction as vector multiply-adds over the width, then the element-wise chain ``S`` as the
   IR writes it), the block's max, the running max ``m`` and the running sums
   ``d = sum exp(S - m)`` and ``n[f] = sum exp(S - m) V[f]`` rebased when ``m`` grows (FuseMax's
   1-pass cascade over the chunk). It leaves ``(m, d, n)`` in a workspace.
2. Rows. Per row, the group's row-level Einsums in program order, each evaluated as written
   (the step's own keys' scores, ``TOP``, the output), where ``MAX`` is the chunks' largest
   ``m`` and ``DEN``, ``NUM`` the chunks' sums rebased on ``TOP``: ``sum_c d_c exp(m_c - TOP)``.

A chunk whose keys are all masked by absent (``-inf``) scores leaves ``m = -inf`` and adds nothing
(its factor is 0, not ``exp(-inf - -inf)``); a NaN score reaches ``d``, so the row is NaN, as in eager.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..errors import CompileError
from ..ir import Access, Cascade, Einsum
from ..ir.decode import DecodeAttention, decode_attentions
from ..ir.kernels import Kernel
from ..ir.scope import access_vars, lhs_vars, reads, reduced_vars
from .loop_frames import LoopFrame, unravel
from .lower import KernelBuilder, SizeVars
from .op_lowering import const, lower_op, nan_max, nan_ne

F32 = "float32"
CHUNK = 256     # keys per task
BLOCK = 16      # keys scored at once (a vector of them)
LANES = 8       # the width's vector for the scores' multiply-adds
ROWS = 16       # at most this many query rows in all: one task per chunk for all of them


def kernel_decode(c: Cascade, k: Kernel) -> DecodeAttention:
    """The decode attention kernel ``k`` (of kind ``decode``) computes."""
    found = [d for d in decode_attentions(c) if d.output == k.output]
    if len(found) != 1:
        raise CompileError(f"kernel {k.name}: not a decode attention (ir/decode.py)")
    return found[0]


def decode_function(c: Cascade, k: Kernel, sizes: SizeVars) -> tirx.PrimFunc:
    """Kernel ``k`` (of kind ``decode``) as a PrimFunc."""
    return _Decode(c, k, sizes, kernel_decode(c, k)).prim_func()


class _Decode(KernelBuilder):
    """The two phases, with the IR's expressions evaluated by :class:`KernelBuilder` over buffers."""

    def __init__(self, c: Cascade, k: Kernel, sizes: SizeVars, d: DecodeAttention) -> None:
        super().__init__(c, k, sizes)
        self.d = d
        self.writer = {e.lhs.tensor: e for e, _ in c.einsums() if e.lhs.tensor in d.group}
        self.rows = lhs_vars(d.maximum)
        self.width = reduced_vars(d.qk)[0]
        self.values = [v for v in lhs_vars(d.num) if v not in self.rows]
        for v in self.rows + [self.width] + self.values:
            if not isinstance(self.extent(v), int):
                raise CompileError(f"kernel {k.name}: decode attention over a symbolic {v}")
        cache_vars = {v for a in (d.value, *[a for a in reads(d.qk) if d.key in access_vars(a)]) for v in access_vars(a)}
        together = self.count(self.rows) <= ROWS   # (then a task reads whole cache rows)
        self.outer = [] if together else [v for v in self.rows if v in cache_vars]
        self.inner = [v for v in self.rows if v not in self.outer]
        self.qk_value: Any = None   # (the current row and key's QK, while its scores are evaluated)
        self.tmp: dict[str, Any] = {}   # (a task's scratch buffers)
        self.ones = {v: tirx.const(0, "int64") for v, r in self.ranks.items() if self.rank_size[r] == 1}
        self.buffers: dict[str, Any] = {}
        self.local: dict[str, Any] = {}   # row-level temps: one row's values
        self.rebased: tuple | None = None   # (the row's env, its chunks' rebase factors)

    def extent(self, v: str) -> Any:
        return self.rank_size[self.ranks[v]]

    def count(self, names: list[str]) -> int:
        return math.prod(self.extent(v) for v in names)

    # ---- reading tensors -------------------------------------------------------------------

    def extents(self, name: str) -> list[Any]:
        return list(self.buffers[name].shape)

    def load(self, name: str, idx: list[Any]) -> Any:
        return tirx.BufferLoad(self.buffers[name], idx)

    def read(self, a: Access, env: dict[str, Any], work: str) -> tuple[Any, Any]:
        if a.tensor in self.local:
            own = lhs_vars(self.writer[a.tensor])
            idx = [tirx.const(0, "int64") if v in self.rows or self.extent(v) == 1 else self.index(ix.expr, env)[0]
                   for v, ix in zip(own, a.indices)]
            return tirx.BufferLoad(self.local[a.tensor], idx), None
        if a.tensor == self.d.qk.lhs.tensor:
            return self.qk_value, None
        if a.tensor in self.d.keyed:
            w = self.writer[a.tensor]
            inner = {**env, **{v: self.index(ix.expr, env)[0] for v, ix in zip(lhs_vars(w), a.indices)}}
            return self.expr(w.rhs, inner, work)
        return super().read(a, env, work)

    # ---- the function ----------------------------------------------------------------------

    def prim_func(self) -> tirx.PrimFunc:
        shape = self.sizes.shapes(self.c, self.k)
        with IRBuilder() as ib, T.prim_func():
            self.buffers = self.sizes.arguments(self.c, self.k, shape)
            length = self.sizes.expr(self.extent(self.d.key))
            chunks = tirx.floordiv(length + CHUNK - 1, CHUNK)
            tasks, inner, width = self.count(self.outer), self.count(self.inner), self.count(self.values)
            with T.sblock("root"):
                ws = (T.decl_buffer([tasks, chunks, inner], "float32", scope="global"),
                      T.decl_buffer([tasks, chunks, inner], "float32", scope="global"),
                      T.decl_buffer([tasks, chunks, inner, width], "float32", scope="global"),
                      T.decl_buffer([tasks, chunks, inner], "float32", scope="global"))   # (m, d, n, rebase)
                with LoopFrame(T.parallel, tasks * chunks) as job:
                    self.chunk(T.bind(tirx.floordiv(job, chunks)), T.bind(tirx.floormod(job, chunks)), length, ws)
                with LoopFrame(T.parallel, tasks) as task:
                    with LoopFrame(T.serial, inner) as row:
                        env = {**self.ones, **_unravel(task, self.outer, self.extent),
                               **_unravel(row, self.inner, self.extent)}
                        self.row(env, (task, row), chunks, ws)
        return ib.get()

    def chunk(self, task: Any, chunk: Any, length: Any, ws: tuple) -> None:
        """Phase 1 for one task and chunk: ``(m, d, n)`` of each inner row into the workspace."""
        inner, width = self.count(self.inner), self.count(self.values)
        m, den = T.decl_buffer([inner], F32, scope="local"), T.decl_buffer([inner], F32, scope="local")
        num = T.decl_buffer([inner, width], F32, scope="local")
        scores = T.decl_buffer([inner, BLOCK], F32, scope="local")
        lanes = LANES if self.extent(self.width) % LANES == 0 else 1
        self.tmp = {"dot": T.decl_buffer([inner, lanes], F32, scope="local"),   # (declared once per task:
                    "best": T.decl_buffer([1], F32, scope="local"),              # not in the loops)
                    "p": T.decl_buffer([BLOCK], F32, scope="local"),
                    "acc": T.decl_buffer([width], F32, scope="local")}
        with LoopFrame(T.serial, inner) as r:
            T.buffer_store(m, const(-math.inf, F32), [r])
            T.buffer_store(den, const(0.0, F32), [r])
            with LoopFrame(T.vectorized, width) as f:
                T.buffer_store(num, const(0.0, F32), [r, f])
        start = T.bind(chunk * CHUNK)
        end = T.bind(tirx.min(start + CHUNK, length))
        outer = {**self.ones, **{v: T.bind(x) for v, x in _unravel(task, self.outer, self.extent).items()}}
        with LoopFrame(T.serial, CHUNK // BLOCK) as block:
            first = T.bind(start + block * BLOCK)
            with T.If(first < end):
                with T.Then():
                    with LoopFrame(T.serial, BLOCK) as j:
                        key = T.bind(tirx.min(first + j, length - 1))
                        self.scores(outer, key, first + j < end, scores, j)
                    with LoopFrame(T.serial, inner) as r:
                        env = {**outer, **_unravel(r, self.inner, self.extent)}
                        self.absorb(env, first, length, (m, den, num, r, scores))
        with LoopFrame(T.serial, inner) as r:
            T.buffer_store(ws[0], m[r], [task, chunk, r])
            T.buffer_store(ws[1], den[r], [task, chunk, r])
            with LoopFrame(T.vectorized, width) as f:
                T.buffer_store(ws[2], num[r, f], [task, chunk, r, f])

    def scores(self, outer: dict[str, Any], key: Any, inside: Any, scores: Any, j: Any) -> None:
        """``S`` of every inner row at one key into ``scores[:, j]`` (``-inf`` unless ``inside``
        the chunk): ``QK`` as vector multiply-adds over the width, the rows' products
        interleaved (independent chains), summed, then the element-wise chain as the IR writes it
        (reading ``QK`` gives the sum)."""
        width, inner = self.extent(self.width), self.count(self.inner)
        acc = self.tmp["dot"]
        lanes = int(acc.shape[1])
        with LoopFrame(T.serial, inner) as r:
            with LoopFrame(T.vectorized, lanes) as v:
                T.buffer_store(acc, const(0.0, F32), [r, v])
        with LoopFrame(T.serial, width // lanes) as step:
            with LoopFrame(T.unroll, inner) as r:
                env = {**outer, **_unravel(r, self.inner, self.extent), self.d.key: key}
                with LoopFrame(T.vectorized, lanes) as v:
                    term = self.expr(self.d.qk.rhs, {**env, self.width: step * lanes + v}, F32)[0]
                    T.buffer_store(acc, acc[r, v] + term, [r, v])
        with LoopFrame(T.serial, inner) as r:
            total = acc[r, 0]
            for v in range(1, lanes):
                total = total + acc[r, v]
            self.qk_value = T.bind(total)
            env = {**outer, **_unravel(r, self.inner, self.extent), self.d.key: key}
            T.buffer_store(scores, tirx.Select(inside, self.read(self.d.scores, env, F32)[0], const(-math.inf, F32)), [r, j])

    def absorb(self, env: dict[str, Any], first: Any, length: Any, state: tuple) -> None:
        """Fold one inner row's block of scores into its running ``(m, d, n)``."""
        m, den, num, r, scores = state
        width = self.count(self.values)
        best = self.tmp["best"]
        T.buffer_store(best, m[r], [0])
        with LoopFrame(T.serial, BLOCK) as j:
            T.buffer_store(best, nan_max(best[0], scores[r, j]), [0])
        new = T.bind(best[0])
        with T.If(_present(new)):   # (NaN enters: it makes d NaN)
            with T.Then():
                old = T.bind(m[r])
                keep = T.bind(tirx.Select(_present(old), _exp(old - new), const(0.0, F32)))
                p = self.tmp["p"]
                with LoopFrame(T.vectorized, BLOCK) as j:
                    T.buffer_store(p, _exp(scores[r, j] - new), [j])
                total = p[0]
                for j in range(1, BLOCK):
                    total = total + p[j]
                T.buffer_store(den, den[r] * keep + total, [r])
                T.buffer_store(m, new, [r])
                acc = self.tmp["acc"]   # (the row's n over the block)
                with LoopFrame(T.vectorized, width) as f:
                    T.buffer_store(acc, num[r, f] * keep, [f])
                with LoopFrame(T.unroll, BLOCK) as j:
                    at = {**env, self.d.key: tirx.min(first + j, length - 1)}
                    with LoopFrame(T.vectorized, width) as f:
                        value = self.expr(self.d.value, {**at, **_unravel(f, self.values, self.extent)}, F32)[0]
                        T.buffer_store(acc, acc[f] + p[j] * value, [f])
                with LoopFrame(T.vectorized, width) as f:
                    T.buffer_store(num, acc[f], [r, f])

    def row(self, env: dict[str, Any], at: tuple, chunks: Any, ws: tuple) -> None:
        """Phase 2 for one row: the group's row-level Einsums in program order."""
        task, row = at
        for name in self.d.group:
            if name in self.d.keyed:
                continue
            e = self.writer[name]
            if name != self.k.output:
                own = lhs_vars(e)
                self.local[name] = T.decl_buffer([1 if v in self.rows else self.extent(v) for v in own], F32,
                                                 scope="local")
            if e is self.d.maximum:
                self.fill(e, env, lambda _: self.over_chunks(chunks, lambda c: ws[0][task, c, row], "max"))
            elif e is self.d.den or e is self.d.num:
                factor = self.factors(env, at, chunks, ws)
                if e is self.d.den:
                    self.fill(e, env, lambda _: self.over_chunks(chunks, lambda c: ws[1][task, c, row] * factor(c), "+"))
                else:
                    self.merged_num(e, at, chunks, ws[2], factor)
            else:
                self.fill(e, env, lambda inner, e=e: self.reduced(e, inner))

    def factors(self, env: dict[str, Any], at: tuple, chunks: Any, ws: tuple) -> Any:
        """Each chunk's rebase on ``TOP``, ``exp(m_c - TOP)`` (0 for a chunk of absent scores), into
        the workspace once per row; the row's factors as ``factor[c]``."""
        task, row = at
        if self.rebased is None or self.rebased[0] is not env:
            top = T.bind(self.read(self.d.top, env, F32)[0])
            with LoopFrame(T.serial, chunks) as c:
                m = ws[0][task, c, row]
                T.buffer_store(ws[3], tirx.Select(_present(m), _exp(m - top), const(0.0, F32)), [task, c, row])
            self.rebased = (env, lambda c: ws[3][task, c, row])
        return self.rebased[1]

    def merged_num(self, e: Einsum, at: tuple, chunks: Any, num: Any, factor: Any) -> None:
        """``NUM`` of one row: the chunks' ``n`` rebased and summed, a vector of the values at a time."""
        task, row = at
        own, buf = lhs_vars(e), self.local[e.lhs.tensor]
        width = self.count(self.values)

        def place(f: Any) -> list[Any]:
            values = _unravel(f, self.values, self.extent)
            return [tirx.const(0, "int64") if v in self.rows else values[v] for v in own]
        with LoopFrame(T.vectorized, width) as f:
            T.buffer_store(buf, const(0.0, F32), place(f))
        with LoopFrame(T.serial, chunks) as c:
            scale = T.bind(factor(c))
            with LoopFrame(T.vectorized, width) as f:
                T.buffer_store(buf, tirx.BufferLoad(buf, place(f)) + num[task, c, row, f] * scale, place(f))

    def over_chunks(self, chunks: Any, term: Any, op: str) -> Any:
        acc = T.decl_buffer([1], F32, scope="local")
        T.buffer_store(acc, const(-math.inf if op == "max" else 0.0, F32), [0])
        with LoopFrame(T.serial, chunks) as c:
            x = term(c)
            T.buffer_store(acc, nan_max(acc[0], x) if op == "max" else acc[0] + x, [0])
        return acc[0]

    def fill(self, e: Einsum, env: dict[str, Any], value: Any) -> None:
        """Write ``e``'s output for the row of ``env``: ``value(env)`` at each of its own points."""
        own = lhs_vars(e)
        free = [v for v in own if v not in self.rows]
        with ExitStack() as stack:
            inner = dict(env)
            for v in free:
                inner[v] = stack.enter_context(LoopFrame(T.serial, self.extent(v)))
            x = value(inner)
            if e.lhs.tensor == self.k.output:
                T.buffer_store(self.buffers[e.lhs.tensor], x, [self.index(ix.expr, inner)[0] for ix in e.lhs.indices])
            else:
                idx = [tirx.const(0, "int64") if v in self.rows else inner[v] for v in own]
                T.buffer_store(self.local[e.lhs.tensor], x, idx)

    def reduced(self, e: Einsum, env: dict[str, Any]) -> Any:
        """``e``'s value at ``env``: its expression, summed (or maxed) over its reduced variables."""
        red = reduced_vars(e)
        if not red:
            return self.expr(e.rhs, env, F32)[0]
        op = e.reduce.op if e.reduce is not None else "+"
        if op not in ("+", "max") or not all(isinstance(self.extent(v), int) for v in red):
            raise CompileError(f"kernel {self.k.name}: a row-level {op} over {','.join(red)} in a decode attention")
        acc = T.decl_buffer([1], F32, scope="local")
        T.buffer_store(acc, const(-math.inf if op == "max" else 0.0, F32), [0])
        with ExitStack() as stack:
            inner = dict(env)
            for v in red:
                inner[v] = stack.enter_context(LoopFrame(T.serial, self.extent(v)))
            x = self.expr(e.rhs, inner, F32)[0]
            T.buffer_store(acc, nan_max(acc[0], x) if op == "max" else acc[0] + x, [0])
        return acc[0]


def _unravel(i: Any, names: list[str], extent: Any) -> dict[str, Any]:
    """The variables ``names`` (the last fastest) at the ``i``-th of their combinations."""
    return dict(zip(names, unravel(i, [extent(v) for v in names])))


def _exp(x: Any) -> Any:
    return lower_op("exp", [x], F32)


def _present(x: Any) -> Any:
    """``x`` is not ``-inf`` (NaN is not)."""
    return nan_ne(x, const(-math.inf, F32))
