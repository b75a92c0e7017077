"""``canonicalize``: the cascade in a normal form the other passes and the code generator expect.

What: (1) views (Einsums that only rename indices: reshape, transpose, tiling) are substituted
into their readers (:func:`einfuse.ir.views.inline_views`); (2) common subexpressions: a temp
written once with the same right side, reduction and output indices as an earlier temp is
replaced by it; (3) dead Einsums: temps nothing reads are removed, with their declarations.

Why: captured models are full of views and repeated index arithmetic; the pass-count rule
(EINSUM_CASCADES.md §2.3) and the fusion rules see through none of them.

Before / after::

    BK[e,m1,m0] = K[e,m1*4+m0]            QK[m1,m0,p] = Q[e,p] * K[e,m1*4+m0]
    QK[m1,m0,p] = Q[e,p] * BK[e,m1,m0]    GM[p] = QK[m1,m0,p] :: reduce[m1,m0] max
    Q2[m1,m0,p] = Q[e,p] * BK[e,m1,m0]    SN[m1,m0,p] = exp(QK[m1,m0,p] - GM[p])
    GM[p] = QK[m1,m0,p] :: reduce[m1,m0] max
    SN[m1,m0,p] = exp(Q2[m1,m0,p] - GM[p])
    UNUSED[p] = GM[p] * 2

Patterns counted: ``inline-view``, ``cse``, ``dead-einsum``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from ..ir import Access, Cascade, Einsum
from ..ir.nodes import rewrite
from ..ir.scope import declarations, reads
from ..ir.views import inline_views
from .manager import Pass, register


@register
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Inline views, merge common subexpressions, remove dead Einsums."""

    name = "canonicalize"

    def run(self, c: Cascade, stats: Counter) -> Cascade:
        before = len(c.stmts)
        c = inline_views(c)
        stats["inline-view"] += before - len(c.stmts)
        c = _merge_common(c, stats)
        return _remove_dead(c, stats)


def _merge_common(c: Cascade, stats: Counter) -> Cascade:
    """Later temps computed exactly like an earlier temp read the earlier one instead."""
    roles = {name: d.role for name, d in declarations(c).items()}
    written = Counter(e.lhs.tensor for e, _ in c.einsums())  # writes inside loops count too
    seen: dict[tuple, str] = {}
    stmts: list[Any] = []
    renames: dict[str, str] = {}
    for s in c.stmts:
        s = _rename(s, renames)
        if isinstance(s, Einsum) and roles.get(s.lhs.tensor) == "temp" and written[s.lhs.tensor] == 1:
            key = (s.lhs.indices, s.rhs, s.reduce, s.populate)
            if key in seen and roles.get(seen[key]) == "temp":
                renames[s.lhs.tensor] = seen[key]
                stats["cse"] += 1
                continue
            seen.setdefault(key, s.lhs.tensor)
        stmts.append(s)
    return replace(c, stmts=tuple(stmts), tensors=tuple(t for t in c.tensors if t.name not in renames))


def _remove_dead(c: Cascade, stats: Counter) -> Cascade:
    """Drop top-level Einsums writing temps that nothing reads, until none is left."""
    roles = {name: d.role for name, d in declarations(c).items()}
    stmts = list(c.stmts)
    while True:
        read = {a.tensor for e, _ in replace(c, stmts=tuple(stmts)).einsums() for a in reads(e)}
        dead = [s for s in stmts if isinstance(s, Einsum) and roles.get(s.lhs.tensor) == "temp"
                and s.lhs.tensor not in read]
        if not dead:
            break
        stats["dead-einsum"] += len(dead)
        stmts = [s for s in stmts if not any(s is d for d in dead)]
    written = {e.lhs.tensor for e, _ in replace(c, stmts=tuple(stmts)).einsums()}
    tensors = tuple(t for t in c.tensors if t.role != "temp" or t.name in written)
    return replace(c, stmts=tuple(stmts), tensors=tensors)


def _rename(node: Any, renames: dict[str, str]) -> Any:
    """``node`` with every access to a renamed tensor pointing at its new name."""
    if not renames:
        return node
    return rewrite(node, lambda x: replace(x, tensor=renames[x.tensor])
                   if isinstance(x, Access) and x.tensor in renames else x)
