"""Which tiles of a loop kernel's ``for`` loop need which code, mixed into
:class:`~einfuse.codegen.loop.LoopBuilder`: tiles a mask hides are skipped, their running
tensors carried over (``live``, and ``masked_max`` after the tile's row maxima), and tiles
every point of which passes the loop's filters run a copy of the body without them (``full``).
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from ..ir import Einsum, IBin, IConst, ISym, IVar
from ..ir.scope import index_atoms, reads
from .loop_frames import LoopFrame
from .op_lowering import const, fold


class TileTests:
    """The tests that pick a tile's code and the carry of a skipped tile (the body, the layout
    and the buffers are :class:`~einfuse.codegen.loop.LoopBuilder`'s)."""

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
        T.buffer_store(flag, const(0.0, "float32"), [0])
        with LoopFrame(T.serial, self.row_count) as r:
            masked = tirx.EQ(tirx.BufferLoad(self.buffers[name], [r]), const(-math.inf, "float32"))
            T.buffer_store(flag, tirx.Select(masked, flag[0], const(1.0, "float32")), [0])
        return flag[0] > const(0.0, "float32")

    def live(self, env: dict[str, Any]) -> Any:
        """When this tile may hold a point of the masked scores, or None if every tile may.

        The masked scores are a filtered tensor with empty value ``-inf`` (a causal mask's
        ``QK[t,s,i: t*T+i<=s]``). In FuseMax's cascade a tile of them that is ``-inf`` everywhere
        changes no running value (``exp(-inf) = 0``, ``max`` ignores it), so it is skipped."""
        tests = [self.bound_test(c, env, every=False) for c in self.tile_filters(masked_only=True)]
        return fold(tirx.And, tests) if tests else None

    def full(self, env: dict[str, Any]) -> tuple[Any, frozenset] | None:
        """When every point of this tile passes the loop's tile-dependent filters (all tiles
        but a ragged last one; the tiles below a causal mask's diagonal), and those filters:
        the body is then emitted a second time without them (no compare and select per score)."""
        conds = self.tile_filters(masked_only=False)
        if not conds:
            return None
        return fold(tirx.And, [self.bound_test(c, env, every=True) for c in conds]), frozenset(conds)

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
                idx = [stack.enter_context(LoopFrame(self.vectorized if k == len(buf.shape) - 1 else T.serial, n))
                       for k, n in enumerate(buf.shape) if k > 0]
                T.buffer_store(buf, tirx.BufferLoad(buf, [tirx.floormod(t, 2)] + idx),
                               [tirx.floormod(t + 1, 2)] + idx)


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


