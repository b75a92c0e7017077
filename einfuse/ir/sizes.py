"""Binding symbolic rank sizes to numbers from the shapes of the arrays a caller passes."""
from __future__ import annotations

from typing import Any, Mapping

import sympy

from ..errors import InterpretError
from .nodes import Cascade, IBin, IConst, IndexExpr, ISym, IVar, Size, TensorDecl


def extent(size: Size, iterative: bool) -> Size:
    """The extent of a tensor dimension over a rank of ``size`` (+1 when iterative)."""
    return size + 1 if iterative else size


def index_bounds(e: IndexExpr, rank_size: Mapping[str, Any], ranks: Mapping[str, str]) -> tuple[Any, Any] | None:
    """The least and greatest value an index expression takes over its variables' ranks (sympy,
    symbolic in the sizes), or None where that is not known (a gather, a product of signed terms)."""
    if isinstance(e, IVar):
        return sympy.Integer(0), sympy.sympify(rank_size[ranks[e.name]]) - 1
    if isinstance(e, IConst):
        return sympy.Integer(e.value), sympy.Integer(e.value)
    if isinstance(e, ISym):
        size = sympy.sympify(rank_size[e.rank])
        return size, size
    if not isinstance(e, IBin):
        return None
    if e.op == "%" and isinstance(e.b, (IConst, ISym)):
        return sympy.Integer(0), index_bounds(e.b, rank_size, ranks)[1] - 1
    a = index_bounds(e.a, rank_size, ranks)
    if e.op == "//" and isinstance(e.b, IConst) and e.b.value > 0:
        return None if a is None else (sympy.floor(a[0] / e.b.value), sympy.floor(a[1] / e.b.value))
    b = index_bounds(e.b, rank_size, ranks)
    if a is None or b is None or e.op not in ("+", "-", "*"):
        return None
    if e.op == "+":
        return a[0] + b[0], a[1] + b[1]
    if e.op == "-":
        return a[0] - b[1], a[1] - b[0]
    if all(sympy.sympify(v).is_nonnegative for v in (*a, *b)):
        return a[0] * b[0], a[1] * b[1]
    return None


def in_range(e: IndexExpr, extent: Any, rank_size: Mapping[str, Any], ranks: Mapping[str, str]) -> bool:
    """True when ``e`` provably stays within ``[0, extent)`` for every value of its variables."""
    bounds = index_bounds(e, rank_size, ranks)
    if bounds is None:
        return False
    lo, hi = bounds
    return bool(sympy.sympify(lo).is_nonnegative) and bool(sympy.sympify(extent - 1 - hi).is_nonnegative)


def bind_sizes(c: Cascade, decls: Mapping[str, TensorDecl], shapes: Mapping[str, tuple[int, ...]],
               given: Mapping[str, int] | None = None) -> dict[str, int]:
    """Concrete sizes of every rank, solving symbolic sizes from the given array shapes.

    ``given`` binds size symbols directly (``{"S": 128}``). Raises InterpretError on a shape that
    contradicts a declaration or a symbol that no shape determines.
    """
    env = {sympy.Symbol(k, integer=True, positive=True): v for k, v in (given or {}).items()}
    pending = []
    for name, shape in shapes.items():
        decl = decls[name]
        if len(shape) != len(decl.ranks):
            raise InterpretError(f"'{name}' has {len(shape)} dimensions {tuple(shape)} but is declared "
                                 f"with {len(decl.ranks)} ranks [{','.join(r.rank for r in decl.ranks)}]")
        for dim, (tr, n) in enumerate(zip(decl.ranks, shape)):
            rank = c.rank(tr.rank)
            pending.append((name, dim, tr.rank, sympy.sympify(extent(rank.size, tr.iterative)), int(n)))
    progress = True
    while progress:
        progress = False
        for item in list(pending):
            name, dim, rank, expr, n = item
            expr = expr.subs(env)
            unknown = sorted(expr.free_symbols, key=str)
            if not unknown:
                if int(expr) != n:
                    raise InterpretError(f"'{name}' dimension {dim} (rank {rank}) has extent {n} but "
                                         f"the cascade declares {expr}")
                pending.remove(item)
            elif len(unknown) == 1:
                env[unknown[0]] = _solve(unknown[0], expr, n, name, dim)
                pending.remove(item)
                progress = True
    sizes = {}
    for r in c.ranks:
        value = sympy.sympify(r.size).subs(env)
        if value.free_symbols:
            missing = ", ".join(sorted(str(s) for s in value.free_symbols))
            raise InterpretError(f"the size of rank {r.name} ({r.size}) depends on {missing}, which no "
                                 f"input shape determines; pass sizes={{'{missing.split(',')[0]}': ...}}")
        if not value.is_Integer or int(value) <= 0:
            raise InterpretError(f"rank {r.name} has size {value}; it must be a positive integer")
        sizes[r.name] = int(value)
    return sizes


def _solve(sym: sympy.Symbol, expr: sympy.Expr, n: int, name: str, dim: int) -> int:
    solutions = [s for s in sympy.solve(sympy.Eq(expr, n), sym) if s.is_Integer and s > 0]
    if len(solutions) != 1:
        raise InterpretError(f"cannot determine {sym} from '{name}' dimension {dim}: {expr} = {n} "
                             "has no single positive integer solution")
    return int(solutions[0])
