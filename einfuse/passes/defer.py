"""``defer``: FuseMax's R1 rewrite (deferral) outside attention, where it lowers a pass count.

What: an operation that makes a reduction wait for an earlier one is moved past the reduction
(EINSUM_CASCADES.md §2.2, FuseMax §III-C):

* ``defer-division``: a contraction of a quotient whose divisor does not vary along the reduced
  variable divides after the sum instead (softmax's ``P = E / S`` then ``P V``)::

      A[r,k] = N[r,k] / D[r]                 AN[r,f] = N[r,k] * V[k,f]
      O[r,f] = A[r,k] * V[k,f]        ->     O[r,f] = AN[r,f] / D[r]

* ``defer-centring``: a sum of squared deviations from a row's mean (LayerNorm's variance) is
  summed about the row's first element ``c`` instead, with the correction
  ``sum (x - m)^2 = sum (x - c)^2 - n (m - c)^2``, so it no longer waits for the mean::

      SUM[r] = X[r,d];  M[r] = SUM[r] / n         SH[r] = X[r,0]
      C[r,d] = X[r,d] - M[r]                ->    SQD[r] = (X[r,d] - SH[r]) * (X[r,d] - SH[r])
      SQ[r] = C[r,d] * C[r,d]                     SQ[r] = SQD[r] - n * ((M[r] - SH[r]) * (M[r] - SH[r]))

  (the shift keeps the difference well conditioned: ``m - c`` is of the order of the spread, not
  of the mean; summing about 0 would lose the variance of rows with a large mean).

Why: each rewrite removes a read-read dependency, so one fewer pass over the reduced rank
(``count_passes``: LayerNorm's 3 -> 2 along its width; the 3-pass softmax attention's 3 -> 2),
and the tensor that had to be held between the passes (``C``, ``A``) is no longer needed there.

Matching needs the temps written once and read only where rewritten (``A``), with the variables
named alike along the chain, as captured models have them; otherwise nothing fires.
Patterns counted: ``defer-division``, ``defer-centring``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from ..ir import Access, Call, Cascade, Const, Einsum, IConst, IVar, TensorDecl, TensorRank
from ..ir.nodes import rewrite
from ..ir.scope import access_vars, declarations, fresh_name, lhs_vars, plain, reads, reduced_vars, var_ranks
from .manager import Pass, PassContext, register


@register
@dataclass(frozen=True)
class Defer(Pass):
    """Defer divisions past contractions and centring past sums of squares (R1)."""

    name = "defer"

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        stats = ctx.stats
        for pattern, rule in (("defer-division", _defer_division), ("defer-centring", _defer_centring)):
            while True:
                out = _first(c, rule)
                if out is None:
                    break
                c = out
                stats[pattern] += 1
        return c


def _first(c: Cascade, rule: Any) -> Cascade | None:
    """``c`` rewritten at the first top-level Einsum where ``rule`` applies, or None."""
    ctx = _Context(c)
    for pos, s in enumerate(c.stmts):
        if isinstance(s, Einsum):
            found = rule(ctx, s)
            if found is not None:
                new_stmts, new_decls = found
                stmts = c.stmts[:pos] + tuple(new_stmts) + c.stmts[pos + 1:]
                return replace(c, stmts=stmts, tensors=c.tensors + tuple(new_decls))
    return None


class _Context:
    """What the rules look up: writers, readers, declarations, sizes."""

    def __init__(self, c: Cascade) -> None:
        self.c = c
        self.decls = declarations(c)
        self.ranks = var_ranks(c)
        self.size = {r.name: r.size for r in c.ranks}
        self.writers: dict[str, list[Einsum]] = {}
        self.readers: Counter = Counter()
        for e, loops in c.einsums():
            self.writers.setdefault(e.lhs.tensor, []).append(e if not loops else None)  # type: ignore[arg-type]
            for a in reads(e):
                self.readers[a.tensor] += 1

    def writer(self, a: Any) -> Einsum | None:
        """The one top-level Einsum (a map or a sum) writing the temp ``a`` reads, plainly
        indexed as ``a`` is."""
        if not isinstance(a, Access) or self.decls[a.tensor].role != "temp":
            return None
        ws = self.writers.get(a.tensor, [])
        if len(ws) != 1 or ws[0] is None or ws[0].reduce or ws[0].populate:
            return None
        w = ws[0]
        return w if plain(w.lhs) and plain(a) and w.lhs.indices == a.indices else None

    def fresh(self, name: str) -> str:
        name = fresh_name(name, self.decls)
        self.decls[name] = None  # type: ignore[assignment]  (reserved)
        return name

    def decl(self, name: str, variables: list[str], dtype: str) -> TensorDecl:
        return TensorDecl(name, tuple(TensorRank(self.ranks[v]) for v in variables), "temp", dtype)


def _defer_division(ctx: _Context, o: Einsum) -> tuple[list, list] | None:
    red = reduced_vars(o)
    if o.reduce or o.populate or len(red) != 1 or not _is_call(o.rhs, "mul") or \
            not all(isinstance(x, Access) for x in o.rhs.args):
        return None
    for a, v in (o.rhs.args, o.rhs.args[::-1]):
        w = ctx.writer(a)
        if w is None or ctx.readers[a.tensor] != 1 or not _is_call(w.rhs, "div"):
            continue
        num, den = w.rhs.args
        if not isinstance(den, Access) or red[0] in access_vars(den) or \
                not set(access_vars(den)) <= set(lhs_vars(o)) or any(ix.filter for ix in o.lhs.indices):
            continue
        name = ctx.fresh(f"{o.lhs.tensor}_num")
        out = list(lhs_vars(o))
        summed = replace(o, lhs=Access(name, o.lhs.indices), rhs=replace(o.rhs, args=tuple(
            num if x is a else x for x in o.rhs.args)))
        divided = replace(o, rhs=Call("div", (Access(name, o.lhs.indices), den)))
        return [summed, divided], [ctx.decl(name, out, ctx.decls[o.lhs.tensor].dtype)]
    return None


def _defer_centring(ctx: _Context, sq: Einsum) -> tuple[list, list] | None:
    red = reduced_vars(sq)
    if sq.reduce or sq.populate or len(red) != 1 or not plain(sq.lhs):
        return None
    d = red[0]
    body = sq.rhs
    inner = ctx.writer(body) if isinstance(body, Access) else None
    if inner is not None and ctx.readers[body.tensor] == 1:
        body = inner.rhs                          # SQ[r] = S2[r,d] with S2[r,d] = C * C
    if not _is_call(body, "mul") or body.args[0] != body.args[1]:
        return None
    cw = ctx.writer(body.args[0])                 # C[r,d] = X[..d..] - M[r]
    if cw is None or not _is_call(cw.rhs, "sub"):
        return None
    x, m = cw.rhs.args
    if not isinstance(x, Access) or not isinstance(m, Access) or d in access_vars(m) or d not in access_vars(x) \
            or access_vars(m) != lhs_vars(sq) or _mean_of(ctx, m, x, d) is None:
        return None
    n = _mean_of(ctx, m, x, d)
    rows = lhs_vars(sq)
    shift, dev = ctx.fresh(f"{sq.lhs.tensor}_shift"), ctx.fresh(f"{sq.lhs.tensor}_dev")
    first = rewrite(x, lambda y: IConst(0) if isinstance(y, IVar) and y.name == d else y)
    sh = Access(shift, sq.lhs.indices)
    diff = Call("sub", (x, sh))
    gap = Call("sub", (m, sh))
    dtype = ctx.decls[sq.lhs.tensor].dtype
    new = [Einsum(sh, first, provenance=sq.provenance),
           Einsum(Access(dev, sq.lhs.indices), Call("mul", (diff, diff)), provenance=sq.provenance),
           replace(sq, rhs=Call("sub", (Access(dev, sq.lhs.indices),
                                        Call("mul", (Const(float(n)), Call("mul", (gap, gap)))))))]
    return new, [ctx.decl(shift, rows, ctx.decls[x.tensor].dtype), ctx.decl(dev, rows, dtype)]


def _mean_of(ctx: _Context, m: Access, x: Access, d: str) -> int | None:
    """``n`` when ``M = SUM / n`` (or ``SUM * (1/n)``) and ``SUM = X`` summed over ``d``'s ``n``
    points, with the variables named alike; else None."""
    mw = ctx.writer(m)
    if mw is None or not isinstance(mw.rhs, Call) or mw.rhs.op not in ("div", "mul") or len(mw.rhs.args) != 2:
        return None
    total, scale = mw.rhs.args
    sw = ctx.writer(total)
    n = ctx.size[ctx.ranks[d]]
    if sw is None or not isinstance(n, int) or not isinstance(scale, Const) or sw.rhs != x or reduced_vars(sw) != [d]:
        return None
    wanted = n if mw.rhs.op == "div" else 1.0 / n
    return n if abs(scale.value - wanted) <= 1e-12 * abs(wanted) else None


def _is_call(x: Any, op: str) -> bool:
    return isinstance(x, Call) and x.op == op and x.merge is None and len(x.args) == 2

