"""Grouped contractions: each row multiplied by the weights of its own group (its expert).

``H[p,n] = W[G[p],n,d] * X[p,d]`` (or ``W[G[p],d,n]``, the weight stored transposed, or
``W[G[p],n//c,d,n%c]``, in panels of ``c`` columns: ``pack-weights``): row ``p``
of ``X`` times the matrix ``G[p]`` of a stacked parameter ``W[E, ., .]``. This is a
mixture-of-experts FFN once its rows are listed per (token, slot) (``passes/moe.py``): rows
sorted by expert make runs of equal ``G``, each run one GEMM against one expert's weights; rows in
any order (decoding's few) read only their own experts' weights. The kind ``grouped``
(``ir/kernels.py``) is such a contraction as one kernel (``codegen/grouped.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .nodes import Access, Call, Cascade, Einsum, IAccess, IBin, IConst, IVar
from .scope import declarations, lhs_vars, reduced_vars


@dataclass(frozen=True)
class Grouped:
    """The parts of a grouped contraction ``out[p,n] = weight[groups[p], n, d] * x[p, d]``."""

    weight: str
    groups: str
    x: str
    transposed: bool      # the weight stored ``[E, d, n]`` (n innermost), not ``[E, n, d]``
    panel: int = 0        # the columns of a panel where stored as panels, ``[E, n//c, d, n%c]``

    def columns(self, weight_shape: list) -> object:
        """The output columns ``n``, from the weight's shape (in panels: their count times ``c``)."""
        return weight_shape[1] * weight_shape[3] if self.panel else weight_shape[2]


def panel_columns(lanes: int) -> int:
    """The columns of a grouped kernel's register tile, and of its weight's panels, for vectors
    of ``lanes`` float32s (4 vectors of 16, 2 of 8)."""
    return lanes * (4 if lanes >= 16 else 2)


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
    if decls[w.tensor].role != "param" or len(w.indices) not in (3, 4) or any(ix.filter for ix in w.indices + x.indices) \
            or {decls[t].dtype for t in (w.tensor, x.tensor)} != {"f32"}:
        return None
    g, *rest = (ix.expr for ix in w.indices)
    panel = _panel(rest, n)
    if panel:
        rest = [rest[1], IVar(n)]
    if not isinstance(g, IAccess) or len(g.access.indices) != 1 or g.access.indices[0].expr != IVar(p) \
            or len(decls[g.access.tensor].ranks) != 1 or not all(isinstance(v, IVar) for v in rest):
        return None
    names = [v.name for v in rest]   # type: ignore[union-attr]
    if sorted(names) != sorted([n, d]) or [ix.expr for ix in x.indices] != [IVar(p), IVar(d)]:
        return None
    return Grouped(w.tensor, g.access.tensor, x.tensor, transposed=names == [d, n], panel=panel)


def _panel(rest: list, n: str) -> int:
    """``c`` if the weight's indices past the expert are ``n//c, d, n%c`` (panels), else 0."""
    if len(rest) != 3:
        return 0
    first, _, last = rest
    c = first.b.value if isinstance(first, IBin) and first.op == "//" and isinstance(first.b, IConst) else 0
    return c if c and first.a == IVar(n) and last == IBin("%", IVar(n), IConst(c)) else 0
