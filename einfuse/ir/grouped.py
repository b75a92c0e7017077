"""Grouped contractions: each row multiplied by the weights of its own group (its expert).

``H[p,n] = W[G[p],n,d] * X[p,d]`` (or ``W[G[p],d,n]``, the weight stored transposed): row ``p``
of ``X`` times the matrix ``G[p]`` of a stacked parameter ``W[E, ., .]``. This is a
mixture-of-experts FFN once its rows are listed per (token, slot) (``passes/moe.py``): rows
sorted by expert make runs of equal ``G``, each run one GEMM against one expert's weights; rows in
any order (decoding's few) read only their own experts' weights. The kind ``grouped``
(``ir/kernels.py``) is such a contraction as one kernel (``codegen/grouped.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .nodes import Access, Call, Cascade, Einsum, IAccess, IVar
from .scope import declarations, lhs_vars, reduced_vars


@dataclass(frozen=True)
class Grouped:
    """The parts of a grouped contraction ``out[p,n] = weight[groups[p], n, d] * x[p, d]``."""

    weight: str
    groups: str
    x: str
    transposed: bool      # the weight stored ``[E, d, n]`` (n innermost), not ``[E, n, d]``


def grouped(c: Cascade, e: Einsum) -> Grouped | None:
    """The parts of ``e`` if it is a grouped contraction of plain 2-D rows (extra output
    variables of size 1 allowed: ``bmm``'s), else None."""
    red = reduced_vars(e)
    if e.reduce is not None or e.populate or len(red) != 1 or not isinstance(e.rhs, Call) or e.rhs.op != "mul" \
            or len(e.rhs.args) != 2 or not all(isinstance(a, Access) for a in e.rhs.args):
        return None
    decls = declarations(c)
    size = {r.name: r.size for r in c.ranks}
    out = [v for v, r in zip(lhs_vars(e), decls[e.lhs.tensor].ranks) if size[r.rank] != 1]
    if len(out) != 2 or any(ix.filter or not isinstance(ix.expr, IVar) for ix in e.lhs.indices):
        return None
    (p, n), d = out, red[0]
    for w, x in (e.rhs.args, e.rhs.args[::-1]):
        found = _parts(w, x, p, n, d, decls)
        if found is not None:
            return found
    return None


def _parts(w: Access, x: Access, p: str, n: str, d: str, decls: dict) -> Grouped | None:
    if decls[w.tensor].role != "param" or len(w.indices) != 3 or any(ix.filter for ix in w.indices + x.indices) \
            or {decls[t].dtype for t in (w.tensor, x.tensor)} != {"f32"}:
        return None
    g, *rest = (ix.expr for ix in w.indices)
    if not isinstance(g, IAccess) or len(g.access.indices) != 1 or g.access.indices[0].expr != IVar(p) \
            or len(decls[g.access.tensor].ranks) != 1 or not all(isinstance(v, IVar) for v in rest):
        return None
    names = [v.name for v in rest]   # type: ignore[union-attr]
    if sorted(names) != sorted([n, d]) or [ix.expr for ix in x.indices] != [IVar(p), IVar(d)]:
        return None
    return Grouped(w.tensor, g.access.tensor, x.tensor, transposed=names == [d, n])
