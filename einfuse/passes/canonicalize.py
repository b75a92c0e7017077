"""``canonicalize``: the cascade in a normal form the other passes and the code generator expect.

What: (1) views (Einsums that only rename indices: reshape, transpose, tiling) are substituted
into their readers (:func:`einfuse.ir.views.inline_views`); (2) common subexpressions: a temp
written once with the same right side, reduction and output indices as an earlier temp is
replaced by it; (3) constants: temps of static size computed from weights and coordinates only
(attention masks built from positions) are computed at compile time and become weights;
(4) dead Einsums: temps nothing reads are removed, with their declarations.

Why: captured models are full of views and repeated index arithmetic; the pass-count rule
(EINSUM_CASCADES.md §2.3) and the fusion rules see through none of them.

Before / after::

    BK[e,m1,m0] = K[e,m1*4+m0]            QK[m1,m0,p] = Q[e,p] * K[e,m1*4+m0]
    QK[m1,m0,p] = Q[e,p] * BK[e,m1,m0]    GM[p] = QK[m1,m0,p] :: reduce[m1,m0] max
    Q2[m1,m0,p] = Q[e,p] * BK[e,m1,m0]    SN[m1,m0,p] = exp(QK[m1,m0,p] - GM[p])
    GM[p] = QK[m1,m0,p] :: reduce[m1,m0] max
    SN[m1,m0,p] = exp(Q2[m1,m0,p] - GM[p])
    UNUSED[p] = GM[p] * 2

Patterns counted: ``inline-view``, ``cse``, ``fold-constant``, ``dead-einsum``.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..ir import Access, Cascade, Einsum, Loop, TensorDecl
from ..ir.interpret import interpret
from ..ir.nodes import ISym, rewrite, walk
from ..ir.quant_formats import PACKED
from ..ir.scope import broadcast, declarations, reads
from ..ir.views import inline_views
from .algebra import fold_scales, simplify
from .manager import Pass, PassContext, register


@register
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Inline views, merge common subexpressions, fold constants, remove dead Einsums."""

    name = "canonicalize"

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        stats = ctx.stats
        for _ in range(ROUNDS):   # (one rewrite exposes another: a folded mask, then x + 0, then a view)
            before, hits = len(c.stmts), sum(stats.values())
            c = inline_views(c)
            stats["inline-view"] += before - len(c.stmts)
            c = _merge_common(c, stats)
            c = fold_constants(c, stats)
            c = simplify(c, stats)
            c = fold_scales(c, stats)
            c = _remove_dead(c, stats)
            if sum(stats.values()) == hits:
                break
        return c


ROUNDS = 8


FOLD_LIMIT = 1 << 26  # bytes: larger constants are computed at run time


def fold_constants(c: Cascade, stats: Counter) -> Cascade:
    """Temps computed from weights and coordinates only (a causal mask built from positions,
    ``where(idx(k) <= idx(s), 0, -inf)``) are computed once, now, by the interpreter: the ones
    other Einsums read become weights; the rest are dead. Broadcasts (a variable the right-hand
    side does not use) are not folded: their inputs are, and they are recomputed where read."""
    decls = declarations(c)
    static = {r.name for r in c.ranks if isinstance(r.size, int)}
    writers: dict[str, list[Any]] = {}
    for s in c.stmts:
        for e, _ in (walk((s,)) if isinstance(s, Loop) else [(s, ())]):
            writers.setdefault(e.lhs.tensor, []).append((e, s))
    known = {t for t in decls if decls[t].role == "param" and t in c.params and decls[t].dtype not in PACKED}   # (a quantized weight is never unpacked)
    folded: list[Einsum] = []
    for t, ws in writers.items():   # (in program order of first writes)
        d = decls.get(t)
        if d is None or d.role != "temp" or d.dtype not in _NUMPY or any(not isinstance(s, Einsum) for _, s in ws) \
                or not all(r.rank in static for r in d.ranks) \
                or not all(a.tensor in known for e, _ in ws for a in reads(e)) \
                or any(broadcast(e, c) or _sized_ranks(e) - static for e, _ in ws):
            continue   # (a broadcast stays: computing it where it is read beats loading it)
        known.add(t)
        folded += [e for e, _ in ws]
    names = {e.lhs.tensor for e in folded}
    kept = [s for s in c.stmts if not (isinstance(s, Einsum) and s.lhs.tensor in names)]
    frontier = list(dict.fromkeys(a.tensor for e, _ in replace(c, stmts=tuple(kept)).einsums()
                                  for a in reads(e) if a.tensor in names))
    if not frontier or sum(_nbytes(decls[t], c) for t in frontier) > FOLD_LIMIT:
        return c
    sub = replace(c, stmts=tuple(folded), ranks=tuple(r for r in c.ranks if r.name in static), tensors=tuple(
        replace(decls[t], role="output" if t in frontier else decls[t].role)
        for t in dict.fromkeys([*(a.tensor for e in folded for a in reads(e)), *names])))
    values = interpret(sub, {})
    # (float constants stay float64: the interpreter reads them exactly, code generation casts)
    params = {**c.params, **{t: values[t] if decls[t].dtype.startswith("f") else values[t].astype(_NUMPY[decls[t].dtype])
                             for t in frontier}}
    tensors = [t for t in c.tensors if t.name not in names] + [replace(decls[t], role="param") for t in frontier]
    stats["fold-constant"] += len(folded)
    return replace(c, stmts=tuple(kept), tensors=tuple(tensors), params=params)


def _sized_ranks(node: Any) -> set[str]:
    """The ranks whose sizes ``node`` (an Einsum or a part of one) uses as values (``x[T - 1]``)."""
    if isinstance(node, ISym):
        return {node.rank}
    if isinstance(node, (tuple, list)):
        return set().union(*map(_sized_ranks, node))
    if dataclasses.is_dataclass(node):
        return set().union(*(_sized_ranks(getattr(node, f.name)) for f in dataclasses.fields(node)))
    return set()


_NUMPY = {"f32": np.float32, "f64": np.float64, "f16": np.float16, "i8": np.int8, "i32": np.int32,
          "i64": np.int64, "bool": np.bool_}


def _nbytes(d: TensorDecl, c: Cascade) -> int:
    size = {r.name: r.size for r in c.ranks}
    return int(np.prod([size[r.rank] + int(r.iterative) for r in d.ranks])) * np.dtype(_NUMPY[d.dtype]).itemsize


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
