"""Building a cascade from a dataflow graph: named ranks, declarations, and Einsums over *refs*.

A :class:`Ref` is what a graph value is in the IR: a map expression over placeholder variables
``_0, _1, ...`` (one per dimension of the value). A materialised tensor ``T`` of rank 2 is the ref
``T[_0,_1]``; its transpose is ``T[_1,_0]``; a constant is ``0``; ``arange`` is ``idx(_0)``. Views
rewrite the placeholders (index renaming), so they cost nothing. :meth:`Builder.emit` turns a
computation into one Einsum: it picks a rank for every dimension, substitutes the rank variables
for the placeholders, and returns a ref to the new tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import sympy

from ..ir import (Access, Call, Cascade, Cond, Const, Coord, Einsum, IAccess, IBin, IConst, Index,
                  ISym, IVar, Populate, Rank, Reduce, TensorDecl, TensorRank)
from ..ir.nodes import Expr, IndexExpr
from ..ir.scope import expr_vars

Size = sympy.Expr


def identifier(hint: str) -> str:
    """``hint`` made a valid tensor name (``0.weight`` -> ``t0_weight``)."""
    base = re.sub(r"\W", "_", hint).strip("_") or "t"
    return base if base[0].isalpha() else "t" + base


def placeholder(i: int) -> IVar:
    """The placeholder variable of dimension ``i`` of a ref."""
    return IVar(f"_{i}")


@dataclass(frozen=True)
class Ref:
    """A graph value: ``expr`` over placeholders ``_0 .. _{n-1}``, its shape and dtype."""

    expr: Expr
    shape: tuple[Size, ...]
    dtype: str

    def at(self, index: Sequence[IndexExpr]) -> Expr:
        """The value at ``index`` (one index expression per dimension)."""
        return substitute(self.expr, {f"_{i}": e for i, e in enumerate(index)})

    def reindex(self, shape: Sequence[Size], index: Sequence[IndexExpr]) -> Ref:
        """A view of shape ``shape`` whose element ``_0.._k`` is this ref at ``index`` (given in
        the view's placeholders)."""
        return Ref(self.at(index), tuple(shape), self.dtype)


def substitute(x: Expr, binding: Mapping[str, IndexExpr]) -> Expr:
    """``x`` with variables replaced by index expressions, all at once."""
    if isinstance(x, Access):
        return _sub_access(x, binding)
    if isinstance(x, Call):
        return replace(x, args=tuple(substitute(a, binding) for a in x.args))
    if isinstance(x, Coord):
        return Coord(sub_index(x.expr, binding))
    return x


def _sub_access(a: Access, binding: Mapping[str, IndexExpr]) -> Access:
    return Access(a.tensor, tuple(Index(sub_index(ix.expr, binding),
                                        tuple(Cond(sub_index(c.lhs, binding), c.cmp, sub_index(c.rhs, binding))
                                              for c in ix.filter)) for ix in a.indices))


def sub_index(e: IndexExpr, binding: Mapping[str, IndexExpr]) -> IndexExpr:
    """An index expression with variables replaced, folding constant arithmetic."""
    if isinstance(e, IVar):
        return binding.get(e.name, e)
    if isinstance(e, IAccess):
        return IAccess(_sub_access(e.access, binding))
    if isinstance(e, IBin):
        return ibin(e.op, sub_index(e.a, binding), sub_index(e.b, binding))
    return e


def ibin(op: str, a: IndexExpr, b: IndexExpr) -> IndexExpr:
    """``a op b`` with the obvious simplifications (x+0, x*1, x*0, constants)."""
    if isinstance(a, IConst) and isinstance(b, IConst):
        return IConst({"+": a.value + b.value, "-": a.value - b.value, "*": a.value * b.value,
                       "//": a.value // b.value if b.value else 0, "%": a.value % b.value if b.value else 0}[op])
    if op in ("+", "-") and b == IConst(0):
        return a
    if op == "+" and a == IConst(0):
        return b
    if op == "*" and (a == IConst(0) or b == IConst(0)):
        return IConst(0)
    if op in ("*", "//") and b == IConst(1):
        return a
    if op == "*" and a == IConst(1):
        return b
    if op == "%" and b == IConst(1):
        return IConst(0)
    return IBin(op, a, b)


def index_of(e: Expr) -> IndexExpr | None:
    """The index expression an integer-valued ref expression stands for, when it has one:
    ``idx(i+1)`` -> ``i+1``, ``3`` -> ``3``, ``T[i]`` -> the gather ``T[i]``."""
    if isinstance(e, Coord):
        return e.expr
    if isinstance(e, Const) and float(e.value).is_integer():
        return IConst(int(e.value))
    if isinstance(e, Access):
        return IAccess(e)
    return None


class Builder:
    """Accumulates ranks, tensor declarations and Einsums; names ranks by size."""

    def __init__(self, rank_names: Mapping[object, str] | None = None) -> None:
        self.rank_names = dict(rank_names or {})
        self.ranks: dict[str, Rank] = {}
        self.by_size: dict[Size, list[str]] = {}
        self.tensors: list[TensorDecl] = []
        self.stmts: list[Einsum] = []
        self.params: dict[str, np.ndarray] = {}
        self.provenance: str | None = None
        self._names: set[str] = set()

    # ---- names -----------------------------------------------------------------------------

    def name(self, hint: str) -> str:
        """A fresh tensor name from ``hint`` (made a valid identifier)."""
        base = identifier(hint)
        name, k = base, 2
        while name in self._names or name == "idx":
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def rank_for(self, size: Size, taken: set[str]) -> str:
        """A rank of ``size`` not in ``taken`` (a new alias rank when all are taken)."""
        size = sympy.sympify(size)
        for name in self.by_size.get(size, []):
            if name not in taken:
                return name
        base = self._rank_base(size)
        name = base if not self.by_size.get(size) else f"{base}_{len(self.by_size[size]) + 1}"
        while name in self.ranks or name.lower() in {r.lower() for r in self.ranks}:
            name += "_"
        self.ranks[name] = Rank(name, int(size) if size.is_Integer else size)
        self.by_size.setdefault(size, []).append(name)
        return name

    def _rank_base(self, size: Size) -> str:
        if size.is_Integer:
            return self.rank_names.get(int(size), f"N{int(size)}")
        if size.is_Symbol:
            return self.rank_names.get(str(size), str(size).upper())
        symbols = sorted(size.free_symbols, key=str)
        return self._rank_base(symbols[0]) + "X" if symbols else "R"

    def size_index(self, size: Size) -> IndexExpr:
        """A size as an index expression: integers stay integers, symbols become rank sizes."""
        size = sympy.sympify(size)
        if size.is_Integer:
            return IConst(int(size))
        if size.is_Symbol:
            return ISym(self.rank_for(size, set()))
        if size.is_Add or size.is_Mul:
            op = "+" if size.is_Add else "*"
            parts = [self.size_index(a) for a in size.args]
            out = parts[0]
            for p in parts[1:]:
                out = ibin(op, out, p)
            return out
        return ISym(self.rank_for(size, set()))

    # ---- declarations and Einsums -----------------------------------------------------------

    def declare(self, name: str, shape: Sequence[Size], role: str, dtype: str,
                empty: float | None = None) -> Ref:
        """Declare a tensor and return the ref that reads it."""
        taken: set[str] = set()
        ranks = []
        for size in shape:
            r = self.rank_for(size, taken)
            taken.add(r)
            ranks.append(TensorRank(r))
        self.tensors.append(TensorDecl(name, tuple(ranks), role, dtype, empty))
        return Ref(Access(name, tuple(Index(placeholder(i)) for i in range(len(shape)))),
                   tuple(sympy.sympify(s) for s in shape), dtype)

    def emit(self, hint: str, shape: Sequence[Size], dtype: str,
             rhs: Callable[[list[IndexExpr], list[IndexExpr]], Expr], *,
             reduce: Sequence[Size] = (), op: str = "+", empty: float | None = None,
             where: Callable[[list[IndexExpr]], tuple[Cond, ...]] | None = None,
             populate: tuple[str, int, int] | None = None, role: str = "temp", name: str | None = None) -> Ref:
        """One Einsum ``NAME[out] = rhs(out, red) :: reduce[red] op`` into a new tensor.

        ``reduce`` gives the sizes of the reduced dimensions; ``where`` a filter on the output
        (points where it is false are not computed); ``populate`` = ``(op, dim, k)`` keeps only the
        chosen coordinates of output dimension ``dim``. Returns a ref to the new tensor.
        """
        name = name or self.name(hint)
        out = self.declare(name, shape, role, dtype, empty)
        out_vars = [IVar(r.rank.lower()) for r in self.tensors[-1].ranks]
        taken = {r.rank for r in self.tensors[-1].ranks}
        red_vars = []
        for size in reduce:
            r = self.rank_for(size, taken)
            taken.add(r)
            red_vars.append(IVar(r.lower()))
        body = self._cover_reduced(rhs(out_vars, red_vars), red_vars, reduce, op)
        used = set(expr_vars(body))
        kept = [v.name for v in red_vars if v.name in used]
        filt = where(out_vars) if where else ()
        lhs = Access(name, tuple(Index(v, filt if i == len(out_vars) - 1 else ()) for i, v in enumerate(out_vars)))
        action = Reduce(tuple(kept), op) if kept and op != "+" else None
        chosen = Populate(out_vars[populate[1]].name, populate[0], populate[2]) if populate else None
        self.stmts.append(Einsum(lhs, body, action, chosen, self.provenance))
        return out

    def _cover_reduced(self, body: Expr, red_vars: list[IVar], sizes: Sequence[Size], op: str) -> Expr:
        """A reduced dimension the body does not depend on still repeats it (sum: times the size)."""
        used = set(expr_vars(body))
        for v, size in zip(red_vars, sizes):
            if v.name not in used and op == "+":
                body = Call("mul", (body, Coord(self.size_index(size))))
            elif v.name not in used and op == "*":
                body = Call("pow", (body, Coord(self.size_index(size))))
        return body

    def add_einsum(self, lhs: Access, rhs: Expr) -> None:
        """Append a ready-made Einsum (used for outputs written piecewise, such as cat)."""
        self.stmts.append(Einsum(lhs, rhs, None, None, self.provenance))

    def cascade(self, name: str) -> Cascade:
        """The cascade built so far."""
        return Cascade(name, tuple(self.ranks.values()), tuple(self.tensors), tuple(self.stmts),
                       dict(self.params))

