"""Contractions: matrix products, convolution, pooling."""
from __future__ import annotations

import functools

import sympy

from ...ir import Call, Const, Coord, IConst
from ...ir.nodes import Expr, IndexExpr
from ..builder import Ref, ibin, index_of, placeholder
from .base import Ctx, RuleError, rule


def matmul(ctx: Ctx, a: Ref, b: Ref, hint: str | None = None) -> Ref:
    """``Z[..., i, j] = A[..., i, k] * B[..., k, j]`` (leading dims are batch dims)."""
    shape = tuple(a.shape[:-1]) + (b.shape[-1],)

    def rhs(out: list[IndexExpr], red: list[IndexExpr]) -> Expr:
        return Call("mul", (a.at(out[:-1] + red), b.at(out[:-2] + red + out[-1:])))
    return ctx.b.emit(hint or ctx.name, shape, ctx.dtype, rhs, reduce=[a.shape[-1]])


@rule("aten.mm.default", "aten.bmm.default")
def mm(ctx: Ctx) -> Ref:
    return matmul(ctx, ctx.arg(0), ctx.arg(1))


@rule("aten.addmm.default")
def addmm(ctx: Ctx) -> Ref:
    """``beta * bias + alpha * (A @ B)``: the product, then the bias add (MLP_BLOCK's form)."""
    bias, a, b = ctx.arg(0), ctx.arg(1), ctx.arg(2)
    beta, alpha = ctx.arg(3, "beta", 1), ctx.arg(4, "alpha", 1)
    product = matmul(ctx, a, b, hint=f"{ctx.name}_mm")
    if alpha != 1:
        product = ctx.map("mul", product, alpha, hint=f"{ctx.name}_alpha")
    if beta == 0:
        return product
    if beta != 1:
        bias = ctx.map("mul", bias, beta, shape=bias.shape, hint=f"{ctx.name}_beta")
    return ctx.map("add", product, bias)


@rule("aten.convolution.default")
def convolution(ctx: Ctx) -> Ref:
    """``O[n,o,y..] = I[n, g*C+c, s*y+d*r-p ..] * W[o, c, r..]`` with ``g = o // (O/groups)``;
    out-of-range input points are absent, which is zero padding."""
    x, w, bias = ctx.arg(0), ctx.arg(1), ctx.arg(2)
    stride, padding, dilation = ctx.arg(3), ctx.arg(4), ctx.arg(5)
    if ctx.arg(6):
        return _transposed(ctx, x, w, bias, stride, padding, dilation, ctx.arg(8))
    groups = ctx.arg(8)
    spatial = len(x.shape) - 2
    cin, cout = w.shape[1], w.shape[0]
    per_group = sympy.sympify(cout) / groups

    def rhs(out: list[IndexExpr], red: list[IndexExpr]) -> Expr:
        c, window = red[0], red[1:]
        o = out[1]
        channel = c if groups == 1 else ibin("+", ibin("*", ibin("//", o, IConst(int(per_group))), IConst(int(cin))), c)
        pos = [ibin("-", ibin("+", ibin("*", IConst(stride[i]), out[2 + i]), ibin("*", IConst(dilation[i]), window[i])),
                    IConst(padding[i])) for i in range(spatial)]
        return Call("mul", (x.at([out[0], channel] + pos), w.at([o, c] + window)))
    conv = ctx.b.emit(f"{ctx.name}_conv" if bias is not None else ctx.name, ctx.shape, ctx.dtype, rhs,
                      reduce=[cin] + list(w.shape[2:]))
    if bias is None:
        return conv
    return ctx.map("add", conv, _channel_bias(bias, spatial))


@rule("transformers.grouped_mm_fallback.default")
def grouped_mm(ctx: Ctx) -> Ref:
    """transformers' grouped GEMM (its CPU fallback op; ``grouped_mm`` experts): rows sorted by
    group, ``offs[e]`` the end of group ``e``'s rows: ``G[r] = sum_e (offs[e] <= r)``, then
    ``Y[r,n] = X[r,k] * W[G[r],k,n]`` (a row past the last group reads ``W`` out of range: 0, as
    the op leaves it): the ``grouped`` form (``ir/grouped.py``, ``passes/moe.py``)."""
    x, w, offs = ctx.arg(0), ctx.arg(1), ctx.arg(2, "offs")
    rows = x.shape[0]
    group = ctx.b.emit(f"{ctx.name}_group", (rows,), "i64", lambda out, red: Call("le", (offs.at([red[0]]), Coord(out[0]))),
                       reduce=[offs.shape[0]])
    return ctx.emit(lambda out, red: Call("mul", (x.at([out[0], red[0]]), w.at([index_of(group.at([out[0]])), red[0], out[1]]))),
                    reduce=[x.shape[1]])


def _transposed(ctx: Ctx, x: Ref, w: Ref, bias: Ref | None, stride: list[int], padding: list[int],
                dilation: list[int], groups: int) -> Ref:
    """A transposed convolution (``ConvTranspose2d``): input point ``i`` adds ``W[c, o, r]`` times
    itself to output ``s*i + d*r - p``, so output ``y`` reads input ``(y + p - d*r) / s`` where that
    divides: ``where((y+p-d*r) % s == 0, I[n, g*C+c, (y+p-d*r)//s], 0) * W[g*C+c, o%O, r]``
    (``W[C_in, C_out/groups, r..]``, ``g = o // O``); out-of-range points read as 0.
    ``output_padding`` is in the output's shape."""
    spatial = len(x.shape) - 2
    cin, per_group = int(w.shape[0]) // groups, int(w.shape[1])

    def rhs(out: list[IndexExpr], red: list[IndexExpr]) -> Expr:
        c, window, o = red[0], red[1:], out[1]
        channel = c if groups == 1 else ibin("+", ibin("*", ibin("//", o, IConst(per_group)), IConst(cin)), c)
        at = [ibin("-", ibin("+", out[2 + i], IConst(padding[i])), ibin("*", IConst(dilation[i]), window[i]))
              for i in range(spatial)]
        source = x.at([out[0], channel] + [ibin("//", a, IConst(s)) for a, s in zip(at, stride)])
        weight = w.at([channel, o if groups == 1 else ibin("%", o, IConst(per_group))] + window)
        whole = [Call("eq", (Coord(ibin("%", a, IConst(s))), Const(0.0))) for a, s in zip(at, stride) if s != 1]
        if whole:   # (a condition on the value: TVM's schedules fail on such a filter of a reduction's read)
            source = Call("where", (functools.reduce(lambda p, q: Call("and", (p, q)), whole), source, Const(0.0)))
        return Call("mul", (source, weight))
    conv = ctx.b.emit(f"{ctx.name}_conv" if bias is not None else ctx.name, ctx.shape, ctx.dtype, rhs,
                      reduce=[sympy.Integer(cin)] + list(w.shape[2:]))
    return conv if bias is None else ctx.map("add", conv, _channel_bias(bias, spatial))


def _channel_bias(bias: Ref, spatial: int) -> Ref:
    """A per-channel bias ``[C]`` seen as ``[C, 1, 1]`` so it broadcasts over an NCHW result."""
    return bias.reindex([bias.shape[0]] + [sympy.Integer(1)] * spatial, [placeholder(0)])


def _window(ctx: Ctx, x: Ref, kernel: list[int], stride: list[int], padding: list[int], dilation: list[int],
            op: str) -> Ref:
    """``O[n,c,y..] = I[n,c,s*y+d*r-p ..] :: reduce[r..] op`` (absent padding is skipped)."""
    spatial = len(kernel)

    def rhs(out: list[IndexExpr], red: list[IndexExpr]) -> Expr:
        pos = [ibin("-", ibin("+", ibin("*", IConst(stride[i]), out[-spatial + i]), ibin("*", IConst(dilation[i]), red[i])),
                    IConst(padding[i])) for i in range(spatial)]
        return x.at(list(out[:-spatial]) + pos)
    return ctx.b.emit(f"{ctx.name}_window" if op == "+" else ctx.name, ctx.shape, ctx.dtype, rhs,
                      reduce=[sympy.Integer(k) for k in kernel], op=op)


def _pair(v: object, n: int) -> list[int]:
    return list(v) * (n if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else [int(v)] * n


@rule("aten.max_pool2d_with_indices.default", "aten.max_pool2d.default")
def max_pool2d(ctx: Ctx) -> object:
    x = ctx.arg(0)
    kernel = _pair(ctx.arg(1), 2)
    stride = _pair(ctx.arg(2) or kernel, 2)
    padding, dilation = _pair(ctx.arg(3, "padding", 0), 2), _pair(ctx.arg(4, "dilation", 1), 2)
    if ctx.arg(5, "ceil_mode", False):
        raise RuleError("max_pool2d with ceil_mode=True")
    if "with_indices" in ctx.op:
        ctx.shape, ctx.dtype = ctx.shape[0], ctx.dtype[0]
    out = _window(ctx, x, kernel, stride, padding, dilation, "max")
    return (out, None) if "with_indices" in ctx.op else out


@rule("aten.avg_pool2d.default")
def avg_pool2d(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    kernel = _pair(ctx.arg(1), 2)
    stride = _pair(ctx.arg(2) or kernel, 2)
    padding = _pair(ctx.arg(3, "padding", 0), 2)
    if ctx.arg(4, "ceil_mode", False) or ctx.arg(6, "divisor_override") is not None:
        raise RuleError("avg_pool2d with ceil_mode or divisor_override")
    if any(padding) and not ctx.arg(5, "count_include_pad", True):
        raise RuleError("avg_pool2d with count_include_pad=False")
    total = _window(ctx, x, kernel, stride, padding, [1, 1], "+")
    return ctx.map("div", total, kernel[0] * kernel[1])


@rule("aten._adaptive_avg_pool2d.default", "aten.adaptive_avg_pool2d.default")
def adaptive_avg_pool2d(ctx: Ctx) -> Ref:
    """Adaptive pooling whose input size is a multiple of the output size: an average pool with
    window and stride H/O (uneven windows are refused)."""
    x = ctx.arg(0)
    sizes = [int(s) for s in x.shape[-2:]]
    outs = [int(s) for s in ctx.shape[-2:]]
    if any(h % o for h, o in zip(sizes, outs)):
        raise RuleError(f"adaptive pooling from {sizes} to {outs} with uneven windows")
    kernel = [h // o for h, o in zip(sizes, outs)]
    total = _window(ctx, x, kernel, kernel, [0, 0], [1, 1], "+")
    return ctx.map("div", total, kernel[0] * kernel[1])

