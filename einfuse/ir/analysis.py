"""Static analyses of a cascade: FLOPs, minimum bytes, arithmetic intensity, and pass counts.

Sizes stay symbolic (sympy) when ranks are. The pass count implements the rule of
EINSUM_CASCADES.md §2.3 (a formalisation of FuseMax §III-A): give every Einsum a *level* along a
rank R; a read of a summary (a tensor that does not stream R) produced at level L forces level
L+1; the number of passes is the number of distinct levels among Einsums that walk all of R.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import sympy

from ..errors import VerificationError
from . import ops
from .dtypes import DTYPES
from .nodes import Access, Call, Cascade, Einsum, Expr, IAccess, IVar, Loop, TensorDecl
from .scope import (access_vars, declarations, index_atoms, iteration_vars, loop_vars, reads,
                    var_ranks)
from .sizes import extent
from .views import inline_views


# ---- FLOPs and bytes ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Cost:
    """FLOPs and minimum bytes moved (each accessed element read or written once)."""

    flops: sympy.Expr
    bytes: sympy.Expr

    @property
    def intensity(self) -> sympy.Expr:
        """FLOPs per byte."""
        return sympy.simplify(self.flops / self.bytes) if self.bytes != 0 else sympy.oo


def einsum_cost(c: Cascade, e: Einsum, loops: tuple[Loop, ...] = ()) -> Cost:
    """The cost of one Einsum, summed over the trips of its enclosing loops.

    FLOPs = points of the iteration space × (map ops + 1 if it reduces). Bytes = the footprint of
    every distinct access (read) and of the output (write) at the tensors' dtypes.
    """
    decls, ranks, bound = declarations(c), var_ranks(c), loop_vars(loops)
    size = {r.name: sympy.sympify(r.size) for r in c.ranks}
    trips = sympy.Mul(*[size[lp.rank] for lp in loops])
    points = sympy.Mul(*[size[ranks[v]] for v in iteration_vars(e, bound)]) * trips
    work = map_ops(e.rhs) + (1 if len(iteration_vars(e, bound)) > len(_free_lhs(e, bound)) else 0)
    seen = {}
    for a in [e.lhs] + reads(e):
        seen.setdefault((a.tensor, a.indices), a)
    moved = sum((_footprint(a, decls[a.tensor], size, ranks, bound, trips) for a in seen.values()),
                sympy.Integer(0))
    return Cost(sympy.expand(points * work), sympy.expand(moved))


def format_number(x: sympy.Expr) -> str:
    """A count for people: ``1,048,576``, ``0.125``, or the symbolic expression ``4*S**2``."""
    x = sympy.sympify(x)
    if x.is_Integer:
        return f"{int(x):,}"
    if x.is_number:
        return f"{float(x):.3g}"
    return str(sympy.nsimplify(x) if x.is_rational_function() else x)


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], ruler: bool = True) -> list[str]:
    """Left-aligned columns two spaces apart, optionally with a dashed ruler under the header."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
    return [line(header)] + ([line(tuple("-" * w for w in widths))] if ruler else []) + [line(r) for r in rows]


def cascade_costs(c: Cascade) -> list[tuple[Einsum, Cost]]:
    """Every Einsum's cost, in program order."""
    return [(e, einsum_cost(c, e, loops)) for e, loops in c.einsums()]


def total_cost(c: Cascade) -> Cost:
    """Summed FLOPs, and bytes as if every Einsum were its own kernel (unfused traffic)."""
    costs = [cost for _, cost in cascade_costs(c)]
    return Cost(sympy.expand(sum((k.flops for k in costs), sympy.Integer(0))),
                sympy.expand(sum((k.bytes for k in costs), sympy.Integer(0))))


def compulsory_bytes(c: Cascade) -> sympy.Expr:
    """Bytes of inputs, params and outputs: what any implementation must move at least once."""
    size = {r.name: sympy.sympify(r.size) for r in c.ranks}
    total = sympy.Integer(0)
    for t in c.tensors:
        if t.role != "temp":
            total += _tensor_bytes(t, size)
    return sympy.expand(total)


def tensors_bytes(c: Cascade, names: Iterable[str]) -> sympy.Expr:
    """Bytes of the named tensors (declared or inferred), each counted once."""
    size = {r.name: sympy.sympify(r.size) for r in c.ranks}
    decls = declarations(c)
    return sympy.expand(sum((_tensor_bytes(decls[n], size) for n in dict.fromkeys(names)), sympy.Integer(0)))


def element_bytes(dtype: str) -> sympy.Expr:
    """Bytes per element of ``dtype``, exact (a half for the 4-bit types)."""
    return sympy.Rational(DTYPES[dtype].bits, 8)


def _tensor_bytes(t: TensorDecl, size: dict[str, sympy.Expr]) -> sympy.Expr:
    return sympy.Mul(*[extent(size[r.rank], r.iterative) for r in t.ranks]) * element_bytes(t.dtype)


def _free_lhs(e: Einsum, bound: frozenset[str]) -> list[str]:
    return [v for v in access_vars(e.lhs) if v not in bound]


def map_ops(x: Expr, cost: Callable[[str], int] = lambda op: ops.OPS[op].flops) -> int:
    """Ops of a map expression per point: ``cost(op)`` summed over its calls (default: FLOPs)."""
    if isinstance(x, Call):
        return cost(x.op) + sum(map_ops(a, cost) for a in x.args)
    return 0


def _footprint(a: Access, decl: TensorDecl, size: dict[str, sympy.Expr], ranks: dict[str, str],
               bound: frozenset[str], trips: sympy.Expr) -> sympy.Expr:
    """Elements of ``a`` touched (per loop trip, times the trips it varies over) × dtype bytes."""
    per_trip, varies = sympy.Integer(1), False
    for ix, tr in zip(a.indices, decl.ranks):
        names = [x.name for x in index_atoms(ix.expr) if isinstance(x, IVar)]
        free = [v for v in names if v not in bound]
        varies = varies or any(v in bound for v in names)
        if any(isinstance(x, IAccess) for x in index_atoms(ix.expr)):
            free = [v for g in index_atoms(ix.expr) if isinstance(g, IAccess) for v in access_vars(g.access)]
        if len(free) == 1 or (free and any(v in bound for v in names)):
            per_trip *= sympy.Mul(*[size[ranks[v]] for v in free])
        elif free:
            per_trip *= extent(size[tr.rank], tr.iterative)
    return per_trip * (trips if varies else 1) * element_bytes(decl.dtype)


# ---- passes --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EinsumLevel:
    """One Einsum's pass level along R, and whether it walks the whole R fiber."""

    einsum: Einsum
    level: int
    full: bool


@dataclass(frozen=True)
class LiveTensor:
    """A tensor live across a pass boundary; ``full_fiber`` if one whole R-fiber must be held."""

    name: str
    levels: tuple[int, ...]
    full_fiber: bool


@dataclass(frozen=True)
class PassReport:
    """The pass analysis of a cascade along a rank (or its split parts)."""

    ranks: tuple[str, ...]
    levels: tuple[EinsumLevel, ...]
    passes: int
    live: tuple[LiveTensor, ...]


def count_passes(c: Cascade, ranks: Iterable[str]) -> int:
    """The number of passes the cascade makes over the rank named by ``ranks`` (e.g. ["M1","M0"])."""
    return analyze_passes(c, ranks).passes


def analyze_passes(c: Cascade, ranks: Iterable[str]) -> PassReport:
    """Levels, pass count and live-across-pass tensors along ``ranks`` (views inlined first)."""
    names = tuple(ranks)
    unknown = [r for r in names if c.rank(r) is None]
    if unknown or not names:
        raise VerificationError(f"count_passes: unknown rank '{unknown[0]}'" if unknown
                                else "count_passes: name at least one rank")
    c = inline_views(c)
    R = {c.rank(r).var for r in names}
    decls = declarations(c)
    populated = {e.lhs.tensor for e, _ in c.einsums() if e.populate is not None}
    level = {t: 0 for t, d in decls.items() if d.role in ("input", "param")}
    produced: dict[str, int] = {}
    stream_reads: dict[str, set[int]] = {}
    full_reads: set[str] = set()
    out = []
    for e, loops in c.einsums():
        bound = loop_vars(loops)
        space = set(iteration_vars(e, bound)) | bound
        traverse, full = bool(space & R), R <= space
        need, streamed = int(traverse), []
        for a in reads(e):
            is_stream = bool(set(access_vars(a)) & R) and a.tensor not in populated
            lv = level.get(a.tensor, 0)
            need = max(need, lv + 1 if traverse and not is_stream and lv > 0 else lv)
            if is_stream:
                streamed.append(a)
        for a in streamed:
            stream_reads.setdefault(a.tensor, set()).add(need)
            if R <= set(access_vars(a)) | bound:
                full_reads.add(a.tensor)
        level[e.lhs.tensor] = produced[e.lhs.tensor] = need
        out.append(EinsumLevel(e, need, full))
    passes = len({x.level for x in out if x.full})
    live = tuple(LiveTensor(t, tuple(sorted(lv)), t in full_reads)
                 for t, lv in stream_reads.items()
                 if (t in produced and max(lv) > produced[t]) or (t not in produced and len(lv) >= 2))
    return PassReport(names, tuple(out), passes, live)
