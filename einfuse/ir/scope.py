"""Name resolution over a cascade: which variables an Einsum iterates, which tensors it reads,
and the declarations of temps that were written without a ``tensor`` line."""
from __future__ import annotations

from typing import Collection, Iterator

from . import ops
from .nodes import (Access, Call, Cascade, Const, Coord, Einsum, Expr, IAccess, IBin, IConst, Index,
                    IndexExpr, IVar, Loop, TensorDecl, TensorRank)


def index_atoms(e: IndexExpr) -> Iterator[IndexExpr]:
    """Every leaf of an index expression (variables, constants, symbols, gathers)."""
    if isinstance(e, IBin):
        yield from index_atoms(e.a)
        yield from index_atoms(e.b)
    else:
        yield e


def index_vars(ix: Index) -> list[str]:
    """Variables an index position mentions, including its filter and any gather's indices."""
    exprs = [ix.expr] + [x for c in ix.filter for x in (c.lhs, c.rhs)]
    names: list[str] = []
    for e in exprs:
        for atom in index_atoms(e):
            if isinstance(atom, IVar):
                names.append(atom.name)
            elif isinstance(atom, IAccess):
                names.extend(access_vars(atom.access))
    return _unique(names)


def access_vars(a: Access) -> list[str]:
    """Variables an access mentions, in order of first appearance."""
    return _unique([v for ix in a.indices for v in index_vars(ix)])


def _leaves(x: Expr, kind: type) -> Iterator:
    if isinstance(x, kind):
        yield x
    elif isinstance(x, Call):
        for arg in x.args:
            yield from _leaves(arg, kind)


def expr_accesses(x: Expr) -> Iterator[Access]:
    """Accesses at the top of a map expression (not those inside gather indices)."""
    return _leaves(x, Access)


def gathers(a: Access) -> Iterator[Access]:
    """Accesses nested in the index expressions of ``a`` (data-dependent indices)."""
    for ix in a.indices:
        for e in [ix.expr] + [x for c in ix.filter for x in (c.lhs, c.rhs)]:
            for atom in index_atoms(e):
                if isinstance(atom, IAccess):
                    yield atom.access
                    yield from gathers(atom.access)


def reads(e: Einsum) -> list[Access]:
    """Every access an Einsum reads: RHS accesses, and gathers nested in any index."""
    out: list[Access] = []
    for a in expr_accesses(e.rhs):
        out.append(a)
        out.extend(gathers(a))
    out.extend(gathers(e.lhs))
    out.extend(gathers(Access("", tuple(Index(c.expr) for c in expr_coords(e.rhs)))))
    return out


def expr_coords(x: Expr) -> Iterator[Coord]:
    """Coordinate values (``idx(...)``) in a map expression."""
    return _leaves(x, Coord)


def expr_vars(x: Expr) -> list[str]:
    """Variables a map expression mentions."""
    return _unique([v for a in expr_accesses(x) for v in access_vars(a)]
                   + [v for c in expr_coords(x) for v in index_vars(Index(c.expr))])


def lhs_vars(e: Einsum) -> list[str]:
    """Variables of the output access."""
    return access_vars(e.lhs)


def reduced_vars(e: Einsum, bound: frozenset[str] = frozenset()) -> list[str]:
    """Variables on the right but not on the left (nor bound by an enclosing loop)."""
    left = set(lhs_vars(e)) | bound
    return [v for v in expr_vars(e.rhs) if v not in left]


def iteration_vars(e: Einsum, bound: frozenset[str] = frozenset()) -> list[str]:
    """The Einsum's iteration space: output variables, then reduced ones (loop vars excluded)."""
    return [v for v in lhs_vars(e) if v not in bound] + reduced_vars(e, bound)


def broadcast(e: Einsum, c: Cascade) -> bool:
    """Whether ``e`` repeats its values along an output variable (of size above 1) that its
    right-hand side does not use: cheaper to recompute where read than to store and load."""
    size, ranks = {r.name: r.size for r in c.ranks}, var_ranks(c)
    return any(size[ranks[v]] != 1 for v in set(lhs_vars(e)) - set(expr_vars(e.rhs)))


def plain(a: Access) -> bool:
    """Whether every index of ``a`` is a bare variable without a filter (``T[b,s,d]``)."""
    return all(isinstance(ix.expr, IVar) and not ix.filter for ix in a.indices)


def fresh_name(name: str, taken: "Collection[str]") -> str:
    """``name``, with ``_`` appended until no name in ``taken`` is it."""
    while name in taken:
        name += "_"
    return name


def loop_vars(loops: tuple[Loop, ...]) -> frozenset[str]:
    """Variables bound by enclosing loops."""
    return frozenset(lp.var for lp in loops)


def var_ranks(c: Cascade) -> dict[str, str]:
    """Map each rank variable to its rank name (``m1`` -> ``M1``)."""
    return {r.var: r.name for r in c.ranks}


def declarations(c: Cascade) -> dict[str, TensorDecl]:
    """Every tensor's declaration: the explicit ones plus those inferred for undeclared temps.

    A temp written without a ``tensor`` line takes its ranks from the first write whose indices
    are plain variables (``GM[p]``) or ``v+1`` for a loop variable (``RM[m1+1,p]``, iterative),
    dtype from its right-hand side, and no empty value (dense).
    """
    decls = {t.name: t for t in c.tensors}
    ranks = var_ranks(c)
    for e, loops in c.einsums():
        name = e.lhs.tensor
        if name in decls:
            continue
        inferred = _infer_ranks(e.lhs, ranks, loop_vars(loops))
        if inferred is not None:
            decls[name] = TensorDecl(name, inferred, "temp", expr_dtype(e.rhs, decls))
    return decls


def undeclarable(c: Cascade) -> list[str]:
    """Names of written tensors whose ranks cannot be inferred (they need a ``tensor`` line)."""
    decls = declarations(c)
    return _unique([e.lhs.tensor for e, _ in c.einsums() if e.lhs.tensor not in decls])


def expr_dtype(x: Expr, decls: dict[str, TensorDecl]) -> str:
    """The dtype a map expression produces (f32 when nothing says otherwise)."""
    if isinstance(x, Access):
        return decls[x.tensor].dtype if x.tensor in decls else "f32"
    if isinstance(x, Coord):
        return "i64"
    if isinstance(x, Call):
        op = ops.lookup(x.op)
        if op is not None and op.result_dtype:
            return op.result_dtype
        values = x.args[1:] if x.op == "where" else x.args   # (where's condition does not type it)
        typed = [a for a in values if not isinstance(a, Const)]
        return expr_dtype(typed[-1 if x.op == "take_right" else 0], decls) if typed else "f32"
    return "f32"


def _infer_ranks(lhs: Access, ranks: dict[str, str], bound: frozenset[str]) -> tuple[TensorRank, ...] | None:
    out = []
    for ix in lhs.indices:
        e = ix.expr
        if isinstance(e, IVar) and e.name in ranks:
            out.append(TensorRank(ranks[e.name], e.name in bound))
        elif (isinstance(e, IBin) and e.op == "+" and isinstance(e.a, IVar) and e.a.name in bound
              and e.b == IConst(1) and e.a.name in ranks):
            out.append(TensorRank(ranks[e.a.name], True))
        else:
            return None
    return tuple(out)


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))

