"""``transpose-weights``, ``pack-weights``, ``materialize-operands``: operand layouts chosen at
compile time, the first passes of a CPU's codegen pipeline (``einfuse ir -p default,codegen``
shows the IR as code generation receives it).

* A contraction vectorizes along its innermost output dimension, so a weight read there should
  have that dimension innermost. PyTorch's ``Linear`` stores ``W[out, in]``; the GEMM
  ``Y[m,n] = X[m,k] * W[n,k]`` wants ``W[k,n]``. Weights are constants, so the transposed copy is
  made once, at compile time, and the Einsum reads it (:func:`transpose_weights`).
* A contraction whose output the register tile does not divide (ViT's 785 tokens) is padded to
  whole tiles, which needs operands indexed by plain variables; a head-split view such as
  ``addmm[b*785+s, h*16+e]`` is first copied to ``qk_addmm[b,s,h,e]`` (:func:`materialize_operands`).
* A GEMM copies the column panels of its streamed operand out into a contiguous buffer before
  the register tiles read them. For a weight that copy is made once, at compile time: the weight
  is stored as the panels, ``W[k,n]`` as ``W_p[n//nr, k, n%nr]`` (:func:`pack_weights`).

Before/after ``transpose-weights,pack-weights`` (nr = 16), for a Linear's ``W[out, in]``::

    Y[m,n] = X[m,k] * W[n,k]                 Y[m,n] = X[m,k] * W_t_p[n//16, k, n%16]
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from collections import Counter
from typing import Any, Callable

import numpy as np

from ..ir import Access, Call, Cascade, Einsum, IAccess, IBin, IConst, Index, IVar, Loop, Rank, TensorDecl
from ..ir.decode import decode_attentions
from ..ir.grouped import Grouped, grouped, panel_columns
from ..ir.nodes import Expr, TensorRank, walk
from ..ir import int8_dot
from ..ir.panels import panel_access, panel_data
from ..ir.sizes import in_range
from ..targets import cost
from ..ir.scope import (
    access_vars,
    declarations,
    fresh_name,
    gathers,
    lhs_vars,
    reads,
    reduced_vars,
    var_ranks,
)
from ..targets import Target
from .canonicalize import fold_constants
from .manager import Pass, PassContext, register


@register
@dataclass(frozen=True)
class TransposeWeights(Pass):
    """Store each contraction's weight with the output's innermost dimension innermost."""

    name = "transpose-weights"

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        return _counted(transpose_weights(c), c, ctx.stats, "transposed")


@register
@dataclass(frozen=True)
class PackWeights(Pass):
    """Store each weight a GEMM streams as the target's register-tile column panels."""

    name = "pack-weights"

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        return _counted(pack_weights(c, ctx.target), c, ctx.stats, "packed")


@register
@dataclass(frozen=True)
class MaterializeOperands(Pass):
    """Copy out the contraction operands the target's schedules need plain."""

    name = "materialize-operands"
    decode: bool = False   # leave decode attentions (ir/decode.py) as they are: their kernel reads them in place

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        kept = frozenset(t for d in decode_attentions(c) for t in d.group) if self.decode else frozenset()
        out = _counted(materialize_operands(c, ctx.target.ragged, kept), c, ctx.stats, "materialized")
        return fold_constants(out, ctx.stats)   # (a weight's copy is made now: an LSTM's W[g*H+h,j])


def _counted(out: Cascade, c: Cascade, stats: Counter, pattern: str) -> Cascade:
    """``out``, with the tensors it added to ``c`` counted as ``pattern``."""
    stats[pattern] += len(out.tensors) - len(c.tensors)
    return out


def transpose_weights(c: Cascade) -> Cascade:
    """``c`` with each contraction's weight reads moved to weights whose innermost dimension is
    the contraction's innermost output dimension."""
    decls = declarations(c)
    size = {r.name: r.size for r in c.ranks}
    tensors, params, made = list(c.tensors), dict(c.params), {}
    ranks = var_ranks(c)

    def moved(s: Einsum, bound: frozenset[str]) -> Einsum:
        inner = _innermost(s, decls, size) if reduced_vars(s, bound) else None
        if inner is None:
            return s
        rhs = _unflatten(s.rhs, decls, size, ranks, tensors, params, made)   # (adds to decls what it makes)
        return replace(s, rhs=_rewrite(rhs, inner, decls, tensors, params, made))
    stmts = [replace(s, body=tuple(moved(e, frozenset({s.var})) if isinstance(e, Einsum) else e for e in s.body))
             if isinstance(s, Loop) else moved(s, frozenset()) if isinstance(s, Einsum) else s for s in c.stmts]
    return replace(c, tensors=tuple(tensors), stmts=tuple(stmts), params=params)


def _unflatten(x: Expr, decls: dict, size: dict, ranks: dict, tensors: list, params: dict, made: dict) -> Expr:
    """``x`` with each weight read at ``a*C+b`` (an LSTM's gates stacked in one matrix, ``W[g*H+h,j]``),
    where the dimension is ``a``'s extent times ``b``'s, ``C``, read from the weight reshaped to
    keep ``a`` and ``b`` apart (``W_s[g,h,j]``), made now."""
    if isinstance(x, Call):
        return replace(x, args=tuple(_unflatten(a, decls, size, ranks, tensors, params, made) for a in x.args))
    if not isinstance(x, Access) or decls[x.tensor].role != "param" or x.tensor not in params \
            or any(ix.filter for ix in x.indices):
        return x
    split = [_stacked(ix.expr, r.rank, size, ranks) for ix, r in zip(x.indices, decls[x.tensor].ranks)]
    if not any(split):
        return x
    decl = decls[x.tensor]
    new_ranks = tuple(t for r, p in zip(decl.ranks, split) for t in ([TensorRank(ranks[v.name]) for v in p] if p else [r]))
    key = (x.tensor, new_ranks)
    if key not in made:
        made[key] = fresh_name(f"{x.tensor}_s", set(decls))
        decls[made[key]] = TensorDecl(made[key], new_ranks, "param", decl.dtype, decl.empty)
        tensors.append(decls[made[key]])
        params[made[key]] = np.ascontiguousarray(params[x.tensor]).reshape([size[t.rank] for t in new_ranks])
    return Access(made[key], tuple(Index(v) for ix, p in zip(x.indices, split) for v in (p or [ix.expr])))


def _stacked(e: Any, rank: str, size: dict, ranks: dict) -> list[IVar] | None:
    """``[a, b]`` where index ``e`` is ``a*C+b`` over a dimension of ``a``'s extent times ``C``,
    ``b``'s extent."""
    if not (isinstance(e, IBin) and e.op == "+" and isinstance(e.b, IVar) and isinstance(e.a, IBin)
            and e.a.op == "*" and isinstance(e.a.a, IVar) and isinstance(e.a.b, IConst)):
        return None
    a, b, c = e.a.a, e.b, e.a.b.value
    outer, inner = size.get(ranks.get(a.name)), size.get(ranks.get(b.name))
    return [a, b] if inner == c and isinstance(outer, int) and outer * c == size[rank] else None


def _innermost(e: Einsum, decls: dict, size: dict) -> str | None:
    """The innermost output variable of ``e`` past trailing dimensions of size 1 (``bmm``'s
    matrix-vector products), if it is a plain variable."""
    indices = [ix for ix, r in zip(e.lhs.indices, decls[e.lhs.tensor].ranks) if size[r.rank] != 1] or e.lhs.indices
    last = indices[-1].expr if indices else None
    return last.name if isinstance(last, IVar) else None


def _rewrite(x: Expr, inner: str, decls: dict, tensors: list, params: dict, made: dict) -> Expr:
    if isinstance(x, Call):
        return replace(x, args=tuple(_rewrite(a, inner, decls, tensors, params, made) for a in x.args))
    if not isinstance(x, Access) or decls[x.tensor].role != "param" or x.tensor not in params:
        return x
    exprs = [ix.expr for ix in x.indices]   # (all variables, but for an expert's gather first: ir/grouped.py)
    if any(ix.filter for ix in x.indices) or not all(isinstance(e, IVar) for e in exprs[1:]) \
            or not isinstance(exprs[0], (IVar, IAccess)):
        return x
    names = [e.name if isinstance(e, IVar) else "" for e in exprs]
    if inner not in names or names[-1] == inner:
        return x
    d = names.index(inner)
    order = [i for i in range(len(names)) if i != d] + [d]
    key = (x.tensor, tuple(order))
    if key not in made:
        decl = decls[x.tensor]
        name = f"{x.tensor}_t"
        tensors.append(TensorDecl(name, tuple(decl.ranks[i] for i in order), "param", decl.dtype, decl.empty))
        params[name] = np.ascontiguousarray(np.transpose(params[x.tensor], order))
        made[key] = name
    return Access(made[key], tuple(Index(exprs[i]) for i in order))


def pack_weights(c: Cascade, target: Target) -> Cascade:
    """``c`` with each weight that a GEMM streams along its columns (``W[k,n]``, as
    :func:`transpose_weights` leaves it) stored as the register tile's column panels,
    ``W_p[n//nr, k, n%nr]``: the schedule then reads each panel where it lies instead of copying
    it out on every call (a copy that, for a weight past the TLB's reach, also misses the TLB on
    every row). For static sizes the register tile divides, unless the GEMV schedule (which
    streams the weight's rows) is still estimated faster."""
    sizes = {r.name: r.size for r in c.ranks}
    static = all(isinstance(v, int) for v in sizes.values())
    decls = declarations(c)
    ranks, tensors, params, made = list(c.ranks), list(c.tensors), dict(c.params), {}
    stmts = []
    for s in c.stmts:
        expert = grouped(c, s) if isinstance(s, Einsum) else None
        if expert is not None:
            s = _grouped_panels(s, expert, target, sizes, decls, ranks, tensors, params, made)
        panel = _panel(c, s, decls, sizes, target) if isinstance(s, Einsum) and static and not expert else None
        if panel is not None:
            weight, nr = panel
            if (weight.tensor, nr) not in made:
                made[(weight.tensor, nr)] = _packed(weight.tensor, nr, decls, sizes, ranks, tensors, params)
            s = replace(s, rhs=_panel_read(s.rhs, weight, made[(weight.tensor, nr)], nr))
        stmts.append(s)
    return replace(c, ranks=tuple(ranks), tensors=tuple(tensors), stmts=tuple(stmts), params=params)


def _panel(c: Cascade, e: Einsum, decls: dict, sizes: dict, target: Target) -> tuple[Access, int] | None:
    """The weight read ``W[k,n]`` of GEMM ``e`` and the register tile's width, if it is packed."""
    dims = cost.contraction_dims(c, e, sizes)
    if dims is None or e.reduce is not None or not isinstance(e.rhs, Call) or e.rhs.op != "mul":
        return None
    inner = lhs_vars(e)[-1]
    streamed = [a for a in reads(e) if inner in access_vars(a)]
    w = streamed[0]
    names = [ix.expr.name if isinstance(ix.expr, IVar) else None for ix in w.indices]
    if decls[w.tensor].role != "param" or w.tensor not in c.params or any(ix.filter for ix in w.indices) \
            or len(names) != 2 or names[1] != inner or names[0] not in reduced_vars(e):
        return None
    batch, rows, cols, depth = dims
    mr, nr = target.register_tile(cols, rows)
    if rows % mr or cols % nr or cost.prefers_gemv(cost.nominal(target), batch, rows, cols, depth, packed=True):
        return None
    return w, nr


def _grouped_panels(e: Einsum, found: Grouped, target: Target, sizes: dict, decls: dict, ranks: list,
                    tensors: list, params: dict, made: dict) -> Einsum:
    """Grouped contraction ``e`` reading its weight (``W[E, d, n]``) as panels of the grouped
    kernel's columns, ``W_p[G[p], n//c, d, n%c]``, each panel contiguous (rows ``n`` apart, a
    power of two of bytes, would share a few cache sets)."""
    cols = panel_columns(target.vector_lanes)
    if not found.transposed or found.panel or found.weight not in params:
        return e
    experts, depth, n = (sizes[r.rank] for r in decls[found.weight].ranks)
    if not isinstance(n, int) or n % cols:
        return e
    key = (found.weight, cols)
    if key not in made:
        taken = {r.name for r in ranks}
        panels = fresh_name(f"{found.weight.upper()}_P", taken)
        lanes = fresh_name(f"{found.weight.upper()}_L", taken | {panels})
        ranks += [Rank(panels, n // cols), Rank(lanes, cols)]
        packed = fresh_name(f"{found.weight}_p", {t.name for t in tensors})
        decl = decls[found.weight]
        tensors.append(TensorDecl(packed, (decl.ranks[0], TensorRank(panels), decl.ranks[1], TensorRank(lanes)),
                                  "param", decl.dtype, decl.empty))
        params[packed] = np.ascontiguousarray(params[found.weight].reshape(experts, depth, n // cols, cols)
                                              .transpose(0, 2, 1, 3))
        made[key] = packed

    def read(x: Expr) -> Expr:
        if isinstance(x, Call):
            return replace(x, args=tuple(read(a) for a in x.args))
        if not isinstance(x, Access) or x.tensor != found.weight:
            return x
        g, d, col = (ix.expr for ix in x.indices)
        return Access(made[key], (Index(g), Index(IBin("//", col, IConst(cols))), Index(d),
                                  Index(IBin("%", col, IConst(cols)))))
    return replace(e, rhs=read(e.rhs))


def _packed(name: str, nr: int, decls: dict, sizes: dict, ranks: list, tensors: list, params: dict) -> str:
    """Declare ``name``'s panels (new ranks for the panel index and its ``nr`` lanes) and their data."""
    decl = decls[name]
    depth, cols = (sizes[r.rank] for r in decl.ranks)
    taken = {r.name for r in ranks}
    panels = fresh_name(f"{name.upper()}_P", taken)
    lanes = fresh_name(f"{name.upper()}_L", taken | {panels})
    ranks += [Rank(panels, cols // nr), Rank(lanes, nr)]
    packed = fresh_name(f"{name}_p", {t.name for t in tensors})
    tensors.append(TensorDecl(packed, (TensorRank(panels), decl.ranks[0], TensorRank(lanes)), "param", decl.dtype,
                              decl.empty))
    params[packed] = panel_data(params[name], nr)
    return packed


def _panel_read(x: Expr, weight: Access, packed: str, nr: int) -> Expr:
    """``x`` with the read ``weight`` (``W[k,n]``) replaced by its panels' (:mod:`einfuse.ir.panels`)."""
    if isinstance(x, Call):
        return replace(x, args=tuple(_panel_read(a, weight, packed, nr) for a in x.args))
    return panel_access(weight, packed, nr) if x == weight else x


def materialize_operands(c: Cascade, ragged: Callable[[int, int], bool], kept: frozenset[str] = frozenset()) -> Cascade:
    """``c`` with reads of contractions copied out first where the schedule needs them plain:
    non-plain reads of the contractions whose two innermost output sizes are static and
    ``ragged(rows, cols)`` or whose operands are views of one tensor; and, in every contraction,
    an activation read along the output's innermost variable with that variable not innermost
    (attention's ``K[t,e]`` in ``S[s,t] = Q[s,e] * K[t,e]`` becomes ``K'[e,t]``: the scores are
    vectorized along ``t``, and packing ``K`` per block of queries was the kernel's main cost).
    The Einsums writing ``kept`` are left as they are."""
    size = {r.name: r.size for r in c.ranks}
    ranks = var_ranks(c)
    decls = declarations(c)
    stmts: list = []
    int8 = int8_dot.written(c)

    def operands(s: Einsum, bound: frozenset[str], local: frozenset[str]) -> Einsum:
        if not reduced_vars(s, bound) or not lhs_vars(s) or s.lhs.tensor in int8 or s.lhs.tensor in kept:
            return s
        views = _ragged_output(s, ranks, size, ragged) or _self_product(s)
        inner = lhs_vars(s)[-1]
        product = any(set(lhs_vars(s)) - set(access_vars(a)) for a in reads(s))  # not a row reduction
        wanted = lambda a: a.tensor not in local and (
            (not _plain(a) and (views or (bound and _may_leave(a, decls[a.tensor], size, ranks))))
            or (product and decls[a.tensor].role != "param" and inner in access_vars(a)
                and access_vars(a)[-1] != inner and _reused(s, a, size, ranks)))
        return replace(s, rhs=_copy_reads(s.rhs, s.lhs.tensor, stmts, s.provenance, wanted, inner))
    for s in c.stmts:
        if isinstance(s, Loop):  # (the copies go before the loop: they read nothing it writes)
            local = frozenset(e.lhs.tensor for e, _ in walk(s.body))
            s = replace(s, body=tuple(operands(e, frozenset({s.var}), local) if isinstance(e, Einsum) else e
                                      for e in s.body))
        elif isinstance(s, Einsum):
            s = operands(s, frozenset(), frozenset())
        stmts.append(s)
    return replace(c, stmts=tuple(stmts))


#: The output rows that must share an operand for its transposed copy to pay: a decode step's
#: scores (one query row per head, or a GQA group's few) read the cached keys once where they are,
#: 4x faster than copying them first (docs/generate.md).
REUSE = 16


def _reused(e: Einsum, a: Access, size: dict, ranks: dict[str, str]) -> bool:
    """Whether the output variables ``a`` does not vary along span ``REUSE`` rows or more (or a
    symbolic number): each of its elements is read by that many output rows."""
    rows = 1
    for v in set(lhs_vars(e)) - set(access_vars(a)):
        rows *= size[ranks[v]]
    return not isinstance(rows, int) or rows >= REUSE


def _may_leave(a: Access, d: TensorDecl, size: dict, ranks: dict[str, str]) -> bool:
    """Whether an index of ``a`` may pass its rank's end (a ragged last tile's ``t*T+i``): in a
    loop such a read is copied, padded, before the loop, so the loop reads tiles unguarded."""
    return not all(in_range(ix.expr, size[r.rank], size, ranks) for ix, r in zip(a.indices, d.ranks))


def _plain(a: Access) -> bool:
    return all(isinstance(ix.expr, IVar) for ix in a.indices)


def _self_product(e: Einsum) -> bool:
    """Whether two operands are views of one tensor (GPT-2's ``Q K`` both slice the QKV projection):
    packing one operand must not repack the other."""
    names = [a.tensor for a in reads(e)]
    return len(set(names)) < len(names)


def _ragged_output(e: Einsum, ranks: dict[str, str], size: dict, ragged: Callable[[int, int], bool]) -> bool:
    out = lhs_vars(e)
    if len(out) < 2 or len(out) != len(e.lhs.indices):
        return False
    rows, cols = (size[ranks[v]] for v in out[-2:])
    return isinstance(rows, int) and isinstance(cols, int) and ragged(rows, cols)


def _copy_reads(x: Expr, owner: str, stmts: list, provenance: str | None, wanted: Callable[[Access], bool],
                inner: str) -> Expr:
    """``x`` reading copies of the accesses ``wanted`` picks (indexed by their variables in order,
    ``inner`` last); the copying Einsums go to ``stmts``."""
    if isinstance(x, Call):
        return replace(x, args=tuple(_copy_reads(a, owner, stmts, provenance, wanted, inner) for a in x.args))
    if not isinstance(x, Access) or any(ix.filter for ix in x.indices) or any(True for _ in gathers(x)) \
            or not wanted(x):
        return x
    name = f"{owner}_{x.tensor}"
    while any(isinstance(s, Einsum) and s.lhs.tensor == name for s in stmts):
        name += "_"
    order = sorted(dict.fromkeys(access_vars(x)), key=lambda v: v == inner)  # stable: only inner moves
    copy = Access(name, tuple(Index(IVar(v)) for v in order))
    stmts.append(Einsum(copy, x, provenance=provenance))
    return copy
