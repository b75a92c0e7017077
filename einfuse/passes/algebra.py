"""Algebraic rewrites of ``canonicalize``: simplification from the op registry, and scale folding.

*Simplify* (pattern ``simplify``) rewrites map expressions bottom-up with the registry's
properties (:mod:`einfuse.ir.ops`): an op applied to constants only becomes its value; an op
applied to its identity (``x + 0``, ``x * 1``, ``x - 0``, ``x / 1``, ``max(x, -inf)``) becomes
``x``; ``where(C, a, b)`` becomes ``a`` (``b``) when ``C`` is a constant, or a weight every
element of which is true (false) read in range. *Constant propagation* (``propagate-constant``):
a temp written once, everywhere, with a constant is replaced by that constant where it is read.

ViT's mask is built from positions that are all valid; after folding it is a weight of ones::

    BIAS[b,s,k] = where(VALID[0,s], 0, -inf)        (VALID: a weight, all true)
    MK[b,h,s,k] = SC[b,h,s,k] + BIAS[b,s,k]   ->    MK[b,h,s,k] = SC[b,h,s,k]

*Scale folding* (``fold-scale``): a contraction scaled afterwards, ``S = T * c`` with ``T = A * B``
read only there, scales its smallest operand instead (the 1/sqrt(d) of attention moves onto
``Q``: S x D multiplications instead of S x S)::

    QK[h,s,k] = Q[s,h*E+e] * K[k,h*E+e]       QS[s,h,e] = Q[s,h*E+e] * 0.125
    SC[h,s,k] = QK[h,s,k] * 0.125        ->   QK[h,s,k] = QS[s,h,e] * K[k,h*E+e]
                                              SC[h,s,k] = QK[h,s,k]          (a view, inlined)

A weight operand scaled this way is then folded into a new weight by constant folding.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import sympy

from ..ir import Access, Call, Cascade, Const, Einsum, Index, IVar, TensorDecl, TensorRank
from ..ir import ops
from ..ir.dtypes import DTYPES
from ..ir.nodes import rewrite
from ..ir.scope import access_vars, declarations, fresh_name, lhs_vars, reads, reduced_vars, var_ranks
from ..ir.sizes import in_range


def simplify(c: Cascade, stats: Counter) -> Cascade:
    """``c`` with constant temps propagated and every map expression simplified."""
    c = _propagate_constants(c, stats)
    rule = _Simplifier(c, stats)
    return replace(c, stmts=rewrite(c.stmts, rule))


class _Simplifier:
    """The bottom-up rewrite rule: called on every node, returns it simplified."""

    def __init__(self, c: Cascade, stats: Counter) -> None:
        self.c, self.stats = c, stats
        self.decls = declarations(c)

    def __call__(self, x: Any) -> Any:
        if not isinstance(x, Call) or x.merge is not None:
            return x
        out = self._simplified(x)
        if out is not x:
            self.stats["simplify"] += 1
        return out

    def _simplified(self, x: Call) -> Any:
        op = ops.lookup(x.op)
        if op is None:
            return x
        if all(isinstance(a, Const) for a in x.args):
            with np.errstate(all="ignore"):
                return Const(float(op.fn(*(np.float64(a.value) for a in x.args))))
        if x.op == "where":
            truth = self._truth(x.args[0])
            return x if truth is None else x.args[1] if truth else x.args[2]
        if op.identity is not None and op.arity == 2:
            a, b = x.args
            if _is_const(b, op.identity):
                return a
            if op.commutative and _is_const(a, op.identity):
                return b
        return x

    def _truth(self, cond: Any) -> bool | None:
        """True (False) when ``cond`` is certainly nonzero (zero) at every point, else None."""
        if isinstance(cond, Const):
            return cond.value != 0
        if not isinstance(cond, Access) or cond.tensor not in self.c.params or not _in_range(cond, self.c):
            return None
        values = np.asarray(self.c.params[cond.tensor])
        if values.size and np.all(values != 0):
            return True
        if values.size and not np.any(values != 0):
            return False
        return None


def _is_const(x: Any, value: float) -> bool:
    return isinstance(x, Const) and (x.value == value or (math.isnan(value) and math.isnan(x.value)))


def _in_range(a: Access, c: Cascade) -> bool:
    """Whether every index of ``a`` stays inside its tensor, unfiltered (so no point reads as fill)."""
    d = declarations(c)[a.tensor]
    size = {r.name: r.size for r in c.ranks}
    return all(not ix.filter and in_range(ix.expr, size[tr.rank] + int(tr.iterative), size, var_ranks(c))
               for ix, tr in zip(a.indices, d.ranks))


def _propagate_constants(c: Cascade, stats: Counter) -> Cascade:
    """Reads of a temp that one top-level Einsum writes with a constant everywhere become it."""
    decls = declarations(c)
    writes = Counter(e.lhs.tensor for e, _ in c.einsums())
    consts = {s.lhs.tensor: s.rhs for s in c.stmts
              if isinstance(s, Einsum) and isinstance(s.rhs, Const) and writes[s.lhs.tensor] == 1
              and decls[s.lhs.tensor].role == "temp" and not s.reduce and not s.populate
              and all(isinstance(ix.expr, IVar) and not ix.filter for ix in s.lhs.indices)
              and len(set(lhs_vars(s))) == len(s.lhs.indices)}
    if not consts:
        return c

    def value(x: Any) -> Any:
        if isinstance(x, Access) and x.tensor in consts and _in_range(x, c):
            stats["propagate-constant"] += 1
            return consts[x.tensor]
        return x
    stmts = tuple(s if isinstance(s, Einsum) and s.lhs.tensor in consts else
                  replace(s, rhs=rewrite(s.rhs, value)) if isinstance(s, Einsum) else rewrite(s, value)
                  for s in c.stmts)
    return replace(c, stmts=stmts)


def fold_scales(c: Cascade, stats: Counter) -> Cascade:
    """Each ``S = T * c`` over a contraction ``T`` read only there scales ``T``'s smallest operand."""
    decls = declarations(c)
    readers = Counter(a.tensor for e, _ in c.einsums() for a in reads(e))
    writers = Counter(e.lhs.tensor for e, _ in c.einsums())
    stmts = list(c.stmts)
    for pos, s in enumerate(stmts):
        found = _scaled_contraction(s, stmts, decls, readers, writers, c)
        if found is None:
            continue
        t_pos, scale, operand = found
        ranks = var_ranks(c)
        name = fresh_name(f"{operand.tensor}_scaled", decls)
        out_vars = access_vars(operand)
        decl = TensorDecl(name, tuple(TensorRank(ranks[v]) for v in out_vars), "temp", decls[operand.tensor].dtype)
        plain = Access(name, tuple(Index(IVar(v)) for v in out_vars))
        t = stmts[t_pos]
        new_t = replace(t, rhs=rewrite(t.rhs, lambda x: plain if x == operand else x))
        stmts[pos] = replace(s, rhs=s.rhs.args[0] if isinstance(s.rhs.args[0], Access) else s.rhs.args[1])
        stmts[t_pos:t_pos + 1] = [Einsum(plain, Call("mul", (operand, scale)), provenance=s.provenance), new_t]
        stats["fold-scale"] += 1
        return fold_scales(replace(c, tensors=c.tensors + (decl,), stmts=tuple(stmts)), stats)
    return c


def _scaled_contraction(s: Any, stmts: list, decls: dict[str, TensorDecl], readers: Counter,
                        writers: Counter, c: Cascade) -> tuple[int, Const, Access] | None:
    """For ``S = T * c`` (or ``T / c``) over a contraction ``T`` read only by ``S``: where ``T``
    is in ``stmts``, the scale as a constant, and the operand of ``T`` with the fewest points."""
    if not isinstance(s, Einsum) or s.reduce or s.populate or not isinstance(s.rhs, Call) \
            or s.rhs.op not in ("mul", "div") or s.rhs.merge is not None:
        return None
    a, b = s.rhs.args
    if s.rhs.op == "mul" and isinstance(a, Const):
        a, b = b, a
    if not isinstance(a, Access) or not isinstance(b, Const) or b.value in (0.0, math.inf, -math.inf):
        return None
    scale = Const(1.0 / b.value) if s.rhs.op == "div" else b
    t_pos = next((i for i, x in enumerate(stmts) if isinstance(x, Einsum) and x.lhs.tensor == a.tensor), None)
    if t_pos is None or readers[a.tensor] != 1 or writers[a.tensor] != 1 or decls[a.tensor].role != "temp":
        return None
    t = stmts[t_pos]
    if t.reduce or t.populate or not reduced_vars(t) or not _is_product(t.rhs) \
            or [ix.expr for ix in a.indices] != [ix.expr for ix in t.lhs.indices] \
            or any(ix.filter for ix in a.indices) or lhs_vars(s) != lhs_vars(t):
        return None
    operands = [x for x in _factors(t.rhs) if isinstance(x, Access)
                and DTYPES[decls[x.tensor].dtype].is_float and not any(ix.filter for ix in x.indices)]
    if not operands:
        return None
    best = min(operands, key=lambda x: _points(access_vars(x), c))
    if _points(access_vars(best), c) >= _points(lhs_vars(t), c) or _factors(t.rhs).count(best) != 1:
        return None   # (scaling an operand as large as the output saves nothing)
    return t_pos, scale, best


def _points(variables: list[str], c: Cascade) -> float:
    """How many points ``variables`` range over (a symbolic size counted as 1024)."""
    size, ranks = {r.name: r.size for r in c.ranks}, var_ranks(c)
    total = sympy.Mul(*(sympy.sympify(size[ranks[v]]) for v in variables))
    return float(total.subs({s: 1024 for s in total.free_symbols}))


def _is_product(x: Any) -> bool:
    return isinstance(x, Access) or (isinstance(x, Call) and x.op == "mul" and x.merge is None
                                     and all(_is_product(a) for a in x.args))


def _factors(x: Any) -> list[Any]:
    return [x] if not isinstance(x, Call) else [f for a in x.args for f in _factors(a)]
