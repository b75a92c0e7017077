"""Views: reshape, permute, expand, slice, select, split, squeeze, copies. Each is index renaming
of the ref it reads (no Einsum); only ``cat`` and dtype casts compute."""
from __future__ import annotations

import functools
from typing import Sequence

import sympy

from ...ir import Access, Call, Cond, Const, Coord, Index, IConst, IVar
from ...ir.nodes import Expr, IndexExpr
from ..builder import Builder, Ref, ibin, index_of, placeholder
from .base import Ctx, RuleError, norm_dim, rule


@rule("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")
def view(ctx: Ctx) -> Ref:
    return reshape(ctx.b, ctx.arg(0), ctx.shape)


def reshape(b: Builder, x: Ref, shape: Sequence[sympy.Expr]) -> Ref:
    """``x`` seen with ``shape`` (same elements, row-major): groups of dimensions with equal
    products map to each other through ``//`` and ``%`` (a split is ``h*E+e``)."""
    shape = tuple(sympy.sympify(s) for s in shape)
    old_dims = [d for d, s in enumerate(x.shape) if s != 1]
    new_dims = [d for d, s in enumerate(shape) if s != 1]
    index: list[IndexExpr] = [IConst(0)] * len(x.shape)
    i = j = 0
    while i < len(old_dims) and j < len(new_dims):
        go, gn = [old_dims[i]], [new_dims[j]]
        i, j = i + 1, j + 1
        while _product(x.shape, go) != _product(shape, gn):
            if _grow_old(_product(x.shape, go), _product(shape, gn)) and i < len(old_dims):
                go.append(old_dims[i])
                i += 1
            elif j < len(new_dims):
                gn.append(new_dims[j])
                j += 1
            else:
                raise RuleError(f"cannot reshape {tuple(x.shape)} to {shape}")
        flat: IndexExpr = IConst(0)
        for k, d in enumerate(gn):
            flat = ibin("+", flat, ibin("*", placeholder(d), b.size_index(_product(shape, gn[k + 1:]))))
        for k, d in enumerate(go):
            stride = b.size_index(_product(x.shape, go[k + 1:]))
            part = ibin("//", flat, stride) if k < len(go) - 1 else flat
            index[d] = ibin("%", part, b.size_index(x.shape[d])) if k > 0 else part
    if i < len(old_dims) or j < len(new_dims):
        raise RuleError(f"cannot reshape {tuple(x.shape)} to {shape}")
    return x.reindex(shape, index)


def _product(shape: Sequence[sympy.Expr], dims: Sequence[int]) -> sympy.Expr:
    return sympy.Mul(*[shape[d] for d in dims]) if dims else sympy.Integer(1)


def _grow_old(old: sympy.Expr, new: sympy.Expr) -> bool:
    """True when the old group's product is the smaller one (it must take another dimension)."""
    ratio = sympy.simplify(new / old)
    if ratio.is_number:
        return bool(ratio > 1)
    num, den = sympy.fraction(ratio)
    return den.is_number


@rule("aten.permute.default")
def permute(ctx: Ctx) -> Ref:
    x, dims = ctx.arg(0), [norm_dim(d, len(ctx.arg(0).shape)) for d in ctx.arg(1)]
    index: list[IndexExpr] = [IConst(0)] * len(dims)
    for k, d in enumerate(dims):
        index[d] = placeholder(k)
    return x.reindex(ctx.shape, index)


@rule("aten.transpose.int", "aten.t.default")
def transpose(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    n = len(x.shape)
    a, c = (norm_dim(ctx.arg(1, "dim0", 0), n), norm_dim(ctx.arg(2, "dim1", 1), n)) if n > 1 else (0, 0)
    order = list(range(n))
    order[a], order[c] = order[c], order[a]
    return x.reindex(ctx.shape, [placeholder(order[d]) for d in range(n)])


@rule("aten.expand.default", "aten.expand_as.default")
def expand(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    offset = len(ctx.shape) - len(x.shape)
    return x.reindex(ctx.shape, [IConst(0) if s == 1 and ctx.shape[offset + d] != 1 else placeholder(offset + d)
                                 for d, s in enumerate(x.shape)])


@rule("aten.repeat.default")
def repeat(ctx: Ctx) -> Ref:
    """``x.repeat(r0, r1, ...)``: output element ``i`` of a repeated dimension of size ``n`` reads
    ``x`` at ``i % n`` (leading repeats add dimensions)."""
    x = ctx.arg(0)
    offset = len(ctx.shape) - len(x.shape)
    return x.reindex(ctx.shape, [placeholder(offset + d) if s == ctx.shape[offset + d]
                                 else ibin("%", placeholder(offset + d), ctx.b.size_index(s))
                                 for d, s in enumerate(x.shape)])


@rule("aten.upsample_nearest1d.vec", "aten.upsample_nearest2d.vec", "aten.upsample_nearest3d.vec")
def upsample_nearest(ctx: Ctx) -> Ref:
    """``F.interpolate(x, mode="nearest")``: a view, output element ``i`` of a resized dimension
    reads ``x`` at ``floor(i * in / out)`` (torch's rule from sizes), ``i // s`` for an integer
    scale factor ``s``, or for a fractional one through a gather of ``min(floor(i / s), in - 1)``."""
    x, scales = ctx.arg(0), ctx.arg(2, "scale_factors")
    spatial = len(x.shape) - len(ctx.shape[2:])
    index = [placeholder(d) for d in range(spatial)]
    for j, d in enumerate(range(spatial, len(x.shape))):
        size_in, size_out = x.shape[d], ctx.shape[d]
        if scales and float(scales[j]) != int(scales[j]):   # (a gather: min(floor(i / s), in - 1), torch's)
            source = ctx.b.emit(f"{ctx.name}_source{j}", (size_out,), "i64", lambda out, _, f=1.0 / float(scales[j]), n=size_in: Call(
                "min", (Call("floor", (Call("mul", (Coord(out[0]), Const(f))),)), Const(float(n) - 1.0))))
            index.append(index_of(source.at([placeholder(d)])))
        elif scales:
            index.append(ibin("//", placeholder(d), IConst(int(scales[j]))))
        else:
            index.append(ibin("//", ibin("*", placeholder(d), ctx.b.size_index(size_in)), ctx.b.size_index(size_out)))
    return x.reindex(ctx.shape, index)


@rule("aten.upsample_bilinear2d.vec")
def upsample_bilinear(ctx: Ctx) -> Ref:
    """``F.interpolate(x, mode="bilinear", align_corners=...)``: per resized dimension, the source
    coordinate of each output (torch's: ``o * (in-1)/(out-1)`` aligned, else
    ``max((o + 0.5) * scale - 0.5, 0)``, ``scale`` the inverse scale factor or ``in/out``), its
    two neighbours ``I0 = floor``, ``I1 = min(I0 + 1, in - 1)`` and the weight of the second,
    ``L = src - I0``; then the four neighbours weighted, one Einsum."""
    x, aligned, scales = ctx.arg(0), bool(ctx.arg(2, "align_corners", False)), ctx.arg(3, "scale_factors")
    axes = []
    for j, d in enumerate((2, 3)):
        size_in, size_out = int(x.shape[d]), int(ctx.shape[d])
        if aligned:
            src = lambda o, f=(size_in - 1) / (size_out - 1) if size_out > 1 else 0.0: Call("mul", (o, Const(f)))  # noqa: E731
        else:
            f = 1.0 / float(scales[j]) if scales else size_in / size_out
            src = lambda o, f=f: Call("max", (Call("sub", (Call("mul", (Call("add", (o, Const(0.5))), Const(f))),  # noqa: E731
                                                           Const(0.5))), Const(0.0)))
        low = ctx.b.emit(f"{ctx.name}_i0", (size_out,), "i64", lambda out, _: Call("floor", (src(Coord(out[0])),)))
        high = ctx.b.emit(f"{ctx.name}_i1", (size_out,), "i64",
                          lambda out, _: Call("min", (Call("add", (low.at(out), Const(1.0))), Const(size_in - 1.0))))
        weight = ctx.b.emit(f"{ctx.name}_l", (size_out,), "f32",
                            lambda out, _: Call("sub", (src(Coord(out[0])), low.at(out))))
        axes.append((low, high, weight))

    def rhs(out: list[IndexExpr], _: list[IndexExpr]) -> Expr:
        (h0, h1, hl), (w0, w1, wl) = axes
        oh, ow = out[2], out[3]
        terms = []
        for ih, wh in ((h0, Call("sub", (Const(1.0), hl.at([oh])))), (h1, hl.at([oh]))):
            for iw, ww in ((w0, Call("sub", (Const(1.0), wl.at([ow])))), (w1, wl.at([ow]))):
                at = [out[0], out[1], index_of(ih.at([oh])), index_of(iw.at([ow]))]
                terms.append(Call("mul", (Call("mul", (wh, ww)), x.at(at))))
        return functools.reduce(lambda a, b: Call("add", (a, b)), terms)
    return ctx.emit(rhs)


@rule("aten.constant_pad_nd.default")
def constant_pad_nd(ctx: Ctx) -> Ref:
    """``F.pad(x, pad, value=v)``: the output reads ``x`` shifted by each leading pad (a negative
    one crops); outside ``x`` it is ``v``: a view where ``v`` is 0 (reads out of range are 0), else
    a ``where`` on the index."""
    x, pad, value = ctx.arg(0), list(ctx.arg(1)), float(ctx.arg(2, "value", 0.0))
    n = len(x.shape)
    low = [0] * n
    for j in range(len(pad) // 2):
        low[n - 1 - j] = int(pad[2 * j])
    shifted = x.reindex(ctx.shape, [ibin("-", placeholder(d), IConst(low[d])) if low[d] else placeholder(d)
                                    for d in range(n)])
    if value == 0:
        return shifted

    def inside(o: list[IndexExpr], _: list[IndexExpr]) -> Call:
        conds = [Call(op, (Coord(o[d]), Const(float(bound)))) for d in range(n) if low[d] > 0 or ctx.shape[d] != x.shape[d]
                 for op, bound in (("ge", low[d]), ("lt", low[d] + x.shape[d]))]
        cond = conds[0] if conds else Const(1.0)
        for c in conds[1:]:
            cond = Call("and", (cond, c))
        return Call("where", (cond, shifted.at(o), Const(value)))
    return ctx.emit(inside)


@rule("aten.copy.default")
def copy(ctx: Ctx) -> Ref:
    """``dst.copy_(src)`` made functional: ``src`` broadcast to ``dst``'s shape, in its dtype."""
    src = ctx.arg(1)
    offset = len(ctx.shape) - len(src.shape)
    view = src.reindex(ctx.shape, [IConst(0) if s == 1 and ctx.shape[offset + d] != 1 else placeholder(offset + d)
                                   for d, s in enumerate(src.shape)])
    return view if view.dtype == ctx.dtype else ctx.map(ctx.dtype, view)


@rule("aten.unsqueeze.default")
def unsqueeze(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    dim = norm_dim(ctx.arg(1), len(x.shape) + 1)
    return x.reindex(ctx.shape, [placeholder(d if d < dim else d + 1) for d in range(len(x.shape))])


@rule("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def squeeze(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    dims = ctx.arg(1)
    dims = range(len(x.shape)) if dims is None else [dims] if isinstance(dims, int) else dims
    gone = {norm_dim(d, len(x.shape)) for d in dims if x.shape[norm_dim(d, len(x.shape))] == 1}
    index, k = [], 0
    for d in range(len(x.shape)):
        index.append(IConst(0) if d in gone else placeholder(k))
        k += d not in gone
    return x.reindex(ctx.shape, index)


@rule("aten.slice.Tensor")
def slice_(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    return slice_ref(ctx.b, x, norm_dim(ctx.arg(1, "dim", 0), len(x.shape)), ctx.arg(2, "start"),
                     ctx.arg(4, "step", 1), ctx.shape)


def slice_ref(b: Builder, x: Ref, dim: int, start: object, step: int, shape: Sequence[sympy.Expr]) -> Ref:
    """Elements ``start, start+step, ...`` of dimension ``dim``."""
    start = sympy.sympify(0 if start is None else start)
    if start.is_number and start < 0:
        start = sympy.Max(start + x.shape[dim], 0)
    if start.is_number and x.shape[dim].is_number:
        start = sympy.Min(start, x.shape[dim])
    index = [placeholder(d) for d in range(len(x.shape))]
    index[dim] = ibin("+", b.size_index(start), ibin("*", IConst(int(step)), placeholder(dim)))
    return x.reindex(shape, index)


@rule("aten.select.int")
def select(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    dim = norm_dim(ctx.arg(1), len(x.shape))
    i = ctx.arg(2)
    i = i + x.shape[dim] if isinstance(i, int) and i < 0 else i
    index = [placeholder(d if d < dim else d - 1) for d in range(len(x.shape))]
    index[dim] = ctx.b.size_index(i)
    return x.reindex(ctx.shape, index)


@rule("aten.split_with_sizes.default", "aten.split.Tensor")
def split(ctx: Ctx) -> list[Ref]:
    x = ctx.arg(0)
    dim = norm_dim(ctx.arg(2, "dim", 0), len(x.shape))
    out, start = [], sympy.Integer(0)
    for shape in ctx.shape:
        out.append(slice_ref(ctx.b, x, dim, start, 1, shape))
        start += shape[dim]
    return out


@rule("aten.unbind.int")
def unbind(ctx: Ctx) -> list[Ref]:
    x = ctx.arg(0)
    dim = norm_dim(ctx.arg(1, "dim", 0), len(x.shape))
    out = []
    for k, shape in enumerate(ctx.shape):
        index = [placeholder(d if d < dim else d - 1) for d in range(len(x.shape))]
        index[dim] = IConst(k)
        out.append(x.reindex(shape, index))
    return out


@rule("aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.lift_fresh_copy.default",
      "aten.contiguous.default", "aten.dropout.default")
def identity(ctx: Ctx) -> Ref:
    return ctx.arg(0)


@rule("aten._to_copy.default", "aten.to.dtype")
def to_copy(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    return x if ctx.dtype == x.dtype else ctx.map(ctx.dtype, x)


@rule("aten.cat.default")
def cat(ctx: Ctx) -> Ref:
    """Concatenation (see :func:`concatenate`)."""
    pieces = [p for p in ctx.arg(0) if all(s != 0 for s in p.shape)]
    return concatenate(ctx.b, ctx.name, pieces, norm_dim(ctx.arg(1, "dim", 0), len(ctx.shape)), ctx.shape, ctx.dtype)


def concatenate(b: Builder, hint: str, pieces: Sequence[Ref], dim: int, shape: Sequence[sympy.Expr],
                dtype: str) -> Ref:
    """``pieces`` concatenated along ``dim``: each written into its slab of one tensor (an Einsum
    per piece, with a filter on the concatenated dimension)."""
    name = b.name(hint)
    out = b.declare(name, shape, "temp", dtype)
    vars_ = [IVar(r.rank.lower()) for r in b.tensors[-1].ranks]
    start = sympy.Integer(0)
    for piece in pieces:
        end = start + piece.shape[dim]
        lo, hi = b.size_index(start), b.size_index(end)
        index = list(vars_)
        index[dim] = ibin("-", vars_[dim], lo)
        conds = (Cond(vars_[dim], ">=", lo), Cond(vars_[dim], "<", hi))
        lhs = Access(name, tuple(Index(v, conds if d == dim else ()) for d, v in enumerate(vars_)))
        b.add_einsum(lhs, piece.at(index))
        start = end
    return out
