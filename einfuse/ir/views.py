"""Inline views: Einsums that only rename indices are substituted into their uses.

A *view* is an Einsum whose right side is a bare access (no op, reduce, populate or filter) of a
tensor that nothing writes later, whose left side is a temp indexed by distinct plain variables
that cover every variable on the right. Reshape, transpose and tiling (``BK[e,m1,m0] =
K[e,m1*M0+m0]``) are views. After inlining, ``Q[e,p] * BK[e,m1,m0]`` reads ``K[e,m1*M0+m0]``
directly and the view is gone; this is what the pass-count rule (EINSUM_CASCADES.md §2.3) and
fusion see.
"""
from __future__ import annotations

from dataclasses import replace

from .nodes import (Access, Call, Cascade, Coord, Einsum, Expr, IAccess, IBin, Index, IndexExpr, IVar,
                    Loop, Stmt, walk)
from .scope import access_vars, declarations, index_vars


def inline_views(c: Cascade) -> Cascade:
    """``c`` with every view Einsum substituted into its readers and removed."""
    decls = declarations(c)
    stmts = list(c.stmts)
    changed = True
    while changed:
        changed = False
        for pos, s in enumerate(stmts):
            if isinstance(s, Einsum) and _is_view(s, stmts[pos + 1:], decls):
                rest = [_substitute_stmt(t, s) for t in stmts[pos + 1:]]
                if all(r is not None for r in rest):
                    stmts = stmts[:pos] + rest  # type: ignore[operator]
                    changed = True
                    break
    kept = {e.lhs.tensor for e, _ in walk(tuple(stmts))} | {t.name for t in c.tensors if t.role != "temp"}
    tensors = tuple(t for t in c.tensors if t.name in kept)
    return replace(c, tensors=tensors, stmts=tuple(stmts))


def _is_view(e: Einsum, later: list[Stmt], decls: dict) -> bool:
    if decls[e.lhs.tensor].role != "temp" or e.reduce or e.populate or not isinstance(e.rhs, Access):
        return False
    source = decls.get(e.rhs.tensor)
    if source is not None and any(r.iterative for r in source.ranks):   # (a loop's results leave it by one Einsum)
        return False
    if any(ix.filter for ix in e.rhs.indices) or any(ix.filter for ix in e.lhs.indices):
        return False
    lhs = [ix.expr for ix in e.lhs.indices]
    if not all(isinstance(x, IVar) for x in lhs) or len({x.name for x in lhs}) != len(lhs):
        return False
    if not set(access_vars(e.rhs)) <= {x.name for x in lhs}:
        return False
    sources = {e.rhs.tensor} | {a.tensor for ix in e.rhs.indices for a in _gathered(ix.expr)}
    written_later = {w.lhs.tensor for w, _ in walk(tuple(later))}
    return e.lhs.tensor not in written_later and not sources & written_later


def _gathered(e: IndexExpr) -> list[Access]:
    if isinstance(e, IAccess):
        return [e.access]
    if isinstance(e, IBin):
        return _gathered(e.a) + _gathered(e.b)
    return []


def _substitute_stmt(s: Stmt, view: Einsum) -> Stmt | None:
    if isinstance(s, Loop):
        body = [_substitute_stmt(b, view) for b in s.body]
        return None if any(b is None for b in body) else replace(s, body=tuple(body))
    lhs = _substitute_access(s.lhs, view, top=False)
    rhs = _substitute_expr(s.rhs, view)
    if lhs is None or rhs is None:
        return None
    return replace(s, lhs=lhs, rhs=rhs)


def _substitute_expr(x: Expr, view: Einsum) -> Expr | None:
    if isinstance(x, Access):
        return _substitute_access(x, view, top=True)
    if isinstance(x, Call):
        args = [_substitute_expr(a, view) for a in x.args]
        return None if any(a is None for a in args) else replace(x, args=tuple(args))
    if isinstance(x, Coord):
        expr = _substitute_index(x.expr, view)
        return None if expr is None else Coord(expr)
    return x


def _substitute_access(a: Access, view: Einsum, top: bool) -> Access | None:
    """``a`` with nested reads of the view replaced; None when a use cannot be rewritten."""
    indices = []
    for ix in a.indices:
        expr = _substitute_index(ix.expr, view)
        if expr is None:
            return None
        indices.append(replace(ix, expr=expr))
    a = replace(a, indices=tuple(indices))
    if not top or a.tensor != view.lhs.tensor:
        return a
    return _apply_view(a, view)


def _substitute_index(e: IndexExpr, view: Einsum) -> IndexExpr | None:
    if isinstance(e, IAccess):
        inner = _substitute_access(e.access, view, top=True)
        return None if inner is None else IAccess(inner)
    if isinstance(e, IBin):
        a, b = _substitute_index(e.a, view), _substitute_index(e.b, view)
        return None if a is None or b is None else IBin(e.op, a, b)
    return e


def _apply_view(use: Access, view: Einsum) -> Access | None:
    names = [ix.expr.name for ix in view.lhs.indices]  # type: ignore[union-attr]
    binding = {n: ix.expr for n, ix in zip(names, use.indices)}
    out = [Index(rename_index(ix.expr, binding)) for ix in view.rhs.indices]  # type: ignore[union-attr]
    for n, ix in zip(names, use.indices):
        if not ix.filter:
            continue
        target = next((k for k, src in enumerate(view.rhs.indices)  # type: ignore[union-attr]
                       if n in index_vars(src)), len(out) - 1)
        if target < 0:
            return None
        out[target] = replace(out[target], filter=out[target].filter + ix.filter)
    return Access(view.rhs.tensor, tuple(out))  # type: ignore[union-attr]


def rename_index(e: IndexExpr, binding: dict[str, IndexExpr]) -> IndexExpr:
    """``e`` with each variable named in ``binding`` replaced by its index expression (in gathers too)."""
    if isinstance(e, IVar):
        return binding.get(e.name, e)
    if isinstance(e, IBin):
        return IBin(e.op, rename_index(e.a, binding), rename_index(e.b, binding))
    if isinstance(e, IAccess):
        return IAccess(Access(e.access.tensor, tuple(replace(ix, expr=rename_index(ix.expr, binding))
                                                      for ix in e.access.indices)))
    return e
