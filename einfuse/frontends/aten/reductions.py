"""Reductions (sum, mean, amax, any, ...), softmax as FuseMax's 3-pass cascade, cumsum as a filter."""
from __future__ import annotations

from typing import Sequence

import sympy

from ...ir import Access, Call, Cond, Const, Coord, Index
from ...ir.nodes import Expr, IndexExpr
from ..builder import Builder, Ref, placeholder
from .base import Ctx, RuleError, norm_dim, rule


def reduce_ref(b: Builder, hint: str, x: Ref, dims: Sequence[int], keepdim: bool, op: str, dtype: str) -> Ref:
    """Reduce ``x`` over ``dims`` with ``op`` (``+ max min *``) into a new tensor; ``keepdim`` is
    a view of it with size-1 dimensions put back."""
    dims = sorted({norm_dim(d, len(x.shape)) for d in dims})
    kept = [d for d in range(len(x.shape)) if d not in dims]

    def rhs(out: list[IndexExpr], red: list[IndexExpr]) -> Expr:
        index: list[IndexExpr] = [None] * len(x.shape)  # type: ignore[list-item]
        for d, r in zip(dims, red):
            index[d] = r
        for k, d in enumerate(kept):
            index[d] = out[k]
        return x.at(index)
    out = b.emit(hint, [x.shape[d] for d in kept], dtype, rhs, reduce=[x.shape[d] for d in dims], op=op)
    return keepdims(out, x.shape, dims) if keepdim else out


def keepdims(reduced: Ref, shape: Sequence[sympy.Expr], dims: Sequence[int]) -> Ref:
    """A reduction's result seen with size-1 dimensions where ``dims`` were (to broadcast back)."""
    kept = [d for d in range(len(shape)) if d not in dims]
    return reduced.reindex([sympy.Integer(1) if d in dims else s for d, s in enumerate(shape)],
                           [placeholder(d) for d in kept])


def _dims(ctx: Ctx, x: Ref) -> list[int]:
    dims = ctx.arg(1, "dim")
    if dims is None or dims == []:
        return list(range(len(x.shape)))
    return [dims] if isinstance(dims, int) else list(dims)


@rule("aten.sum.dim_IntList", "aten.sum.default")
def sum_(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    return reduce_ref(ctx.b, ctx.name, x, _dims(ctx, x), ctx.arg(2, "keepdim", False), "+", ctx.dtype)


@rule("aten.mean.dim", "aten.mean.default")
def mean(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    dims = _dims(ctx, x)
    count = sympy.Mul(*[x.shape[norm_dim(d, len(x.shape))] for d in dims])
    total = reduce_ref(ctx.b, f"{ctx.name}_sum", x, dims, ctx.arg(2, "keepdim", False), "+", ctx.dtype)
    return ctx.map("div", total, ctx.number(count))


@rule("aten.amax.default", "aten.amin.default")
def amax(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    return reduce_ref(ctx.b, ctx.name, x, _dims(ctx, x), ctx.arg(2, "keepdim", False),
                      "max" if "amax" in ctx.op else "min", ctx.dtype)


@rule("aten.any.dim", "aten.any.dims", "aten.any.default", "aten.all.dim", "aten.all.default")
def any_all(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    nonzero = ctx.map("ne", x, 0, shape=x.shape, hint=f"{ctx.name}_nz") if x.dtype != "bool" else x
    return reduce_ref(ctx.b, ctx.name, nonzero, _dims(ctx, x), ctx.arg(2, "keepdim", False),
                      "max" if ".any." in ctx.op else "min", "bool")


@rule("aten._softmax.default", "aten._log_softmax.default")
def softmax(ctx: Ctx) -> Ref:
    """FuseMax Cascade 4's softmax: GM = max, SN = exp(x - GM), SD = sum SN, A = SN / SD."""
    x, dim = ctx.arg(0), norm_dim(ctx.arg(1), len(ctx.arg(0).shape))
    gm = reduce_ref(ctx.b, f"{ctx.name}_max", x, [dim], True, "max", ctx.dtype)
    sn = ctx.map("exp", ctx.map("sub", x, gm, hint=f"{ctx.name}_shift"), hint=f"{ctx.name}_exp")
    sd = reduce_ref(ctx.b, f"{ctx.name}_sum", sn, [dim], True, "+", ctx.dtype)
    if "log_softmax" in ctx.op:
        return ctx.map("sub", ctx.map("sub", x, gm, hint=f"{ctx.name}_shifted"), ctx.map("log", sd, shape=sd.shape,
                                                                                       hint=f"{ctx.name}_logsum"))
    return ctx.map("div", sn, sd)


@rule("aten.cumsum.default")
def cumsum(ctx: Ctx) -> Ref:
    """``Y[..i..] = X[..j:j<=i..]``: a prefix sum is a filtered reduction (FuseMax §II-C3)."""
    x = ctx.arg(0)
    dim = norm_dim(ctx.arg(1), len(x.shape))

    def rhs(out: list[IndexExpr], red: list[IndexExpr]) -> Expr:
        index = list(out)
        index[dim] = red[0]
        read = x.at(index)
        return _filtered(read, dim, Cond(red[0], "<=", out[dim]))
    return ctx.emit(rhs, reduce=[x.shape[dim]])


@rule("aten.histc.default")
def histc(ctx: Ctx) -> Ref:
    """``torch.histc(x, bins, min, max)``: ``H[b] = sum_i (bin(x_i) == b)``, ``bin(x) =
    min(floor((x - min) * bins / (max - min)), bins - 1)`` for ``min <= x <= max`` (others are
    not counted); ``min == max`` (torch's: the data's range) is refused."""
    x, bins, low, high = ctx.arg(0), int(ctx.arg(1, "bins", 100)), float(ctx.arg(2, "min", 0)), float(ctx.arg(3, "max", 0))
    if low == high:
        raise RuleError("histc over the data's own range (min == max)")
    flat = list(range(len(x.shape)))

    def counted(out: list[IndexExpr], red: list[IndexExpr]) -> Expr:
        v = x.at(red)
        where = Call("floor", (Call("mul", (Call("sub", (v, Const(low))), Const(bins / (high - low)))),))
        inside = Call("and", (Call("ge", (v, Const(low))), Call("le", (v, Const(high)))))
        return Call("and", (inside, Call("eq", (Call("min", (where, Const(bins - 1.0))), Coord(out[0])))))
    return ctx.emit(counted, reduce=[x.shape[d] for d in flat])


@rule("aten.cumprod.default")
def cumprod(ctx: Ctx) -> Ref:
    """``Y[..i..] = prod_j where(j <= i, X[..j..], 1)``: a product reduction (a filter would read
    the excluded points as 0)."""
    x = ctx.arg(0)
    dim = norm_dim(ctx.arg(1), len(x.shape))

    def rhs(out: list[IndexExpr], red: list[IndexExpr]) -> Expr:
        index = list(out)
        index[dim] = red[0]
        return Call("where", (Call("le", (Coord(red[0]), Coord(out[dim]))), x.at(index), Const(1.0)))
    return ctx.emit(rhs, reduce=[x.shape[dim]], op="*")


def _filtered(e: Expr, dim: int, cond: Cond) -> Expr:
    """``e`` with ``cond`` as a filter on its index ``dim`` when it is an access; any other
    expression is wrapped in ``where`` on the coordinates."""
    if isinstance(e, Access):
        indices = list(e.indices)
        indices[dim] = Index(indices[dim].expr, indices[dim].filter + (cond,))
        return Access(e.tensor, tuple(indices))
    return Call("where", (Call(_CMP[cond.cmp], (Coord(cond.lhs), Coord(cond.rhs))), e, Const(0.0)))


_CMP = {"<=": "le", "<": "lt", ">=": "ge", ">": "gt"}
