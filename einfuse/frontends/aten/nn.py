"""Neural-network ops: normalisations, embedding, and scaled dot-product attention."""
from __future__ import annotations

import math

import sympy

from ...ir import Call, Cond, IBin, IConst
from ...ir.nodes import Expr, IndexExpr
from ..builder import Ref, index_of, placeholder
from .base import Ctx, RuleError, rule
from .reductions import keepdims, reduce_ref


@rule("aten.native_layer_norm.default")
def layer_norm(ctx: Ctx) -> tuple[Ref, Ref, Ref]:
    """LayerNorm as written (EINSUM_CASCADES.md LAYERNORM): mean, centre, variance, scale."""
    x, normalized, weight, bias, eps = (ctx.arg(i) for i in range(5))
    dims = list(range(len(x.shape) - len(normalized), len(x.shape)))
    count = int(sympy.Mul(*[x.shape[d] for d in dims]))
    ctx.dtype = ctx.dtype[0]
    total = reduce_ref(ctx.b, f"{ctx.name}_sum", x, dims, False, "+", x.dtype)
    mu = ctx.map("div", total, count, shape=total.shape, hint=f"{ctx.name}_mean")
    xc = ctx.map("sub", x, keepdims(mu, x.shape, dims), shape=x.shape, hint=f"{ctx.name}_centred")
    sq = ctx.map("mul", xc, xc, shape=x.shape, hint=f"{ctx.name}_sq")
    var = ctx.map("div", reduce_ref(ctx.b, f"{ctx.name}_sqsum", sq, dims, False, "+", x.dtype), count,
                  shape=total.shape, hint=f"{ctx.name}_var")
    rstd = ctx.map("rsqrt", ctx.map("add", var, eps, shape=total.shape, hint=f"{ctx.name}_vareps"),
                   shape=total.shape, hint=f"{ctx.name}_rstd")
    rstd_k = keepdims(rstd, x.shape, dims)
    y = ctx.map("mul", xc, rstd_k, shape=x.shape, hint=f"{ctx.name}_norm" if weight is not None or bias is not None else None)
    if weight is not None:
        y = ctx.map("mul", y, weight, shape=x.shape, hint=f"{ctx.name}_scaled" if bias is not None else None)
    if bias is not None:
        y = ctx.map("add", y, bias, shape=x.shape)
    return y, keepdims(mu, x.shape, dims), rstd_k


@rule("aten._native_batch_norm_legit_no_training.default")
def batch_norm(ctx: Ctx) -> tuple[Ref, None, None]:
    """Inference batch norm: ``(x - mean[c]) * rsqrt(var[c] + eps) * w[c] + b[c]``."""
    x, weight, bias, mean, var = (ctx.arg(i) for i in range(5))
    eps = ctx.arg(6, "eps", 1e-5)
    shape, ctx.dtype = ctx.shape[0], ctx.dtype[0]
    per_channel = lambda r: r.reindex([r.shape[0]] + [sympy.Integer(1)] * (len(x.shape) - 2), [placeholder(0)])  # noqa: E731
    rstd = ctx.map("rsqrt", ctx.map("add", var, eps, shape=var.shape, hint=f"{ctx.name}_vareps"),
                   shape=var.shape, hint=f"{ctx.name}_rstd")
    y = ctx.map("mul", ctx.map("sub", x, per_channel(mean), shape=shape, hint=f"{ctx.name}_centred"),
                per_channel(rstd), shape=shape, hint=f"{ctx.name}_norm")
    if weight is not None:
        y = ctx.map("mul", y, per_channel(weight), shape=shape, hint=f"{ctx.name}_scaled")
    if bias is not None:
        y = ctx.map("add", y, per_channel(bias), shape=shape)
    return y, None, None


@rule("aten.embedding.default")
def embedding(ctx: Ctx) -> Ref:
    """``X[.., d] = W[ids[..], d]``: a gather (EINSUM_CASCADES.md EMBEDDING)."""
    weight, ids = ctx.arg(0), ctx.arg(1)
    return gather_rows(ctx, weight, ids)


def gather_rows(ctx: Ctx, table: Ref, ids: Ref) -> Ref:
    """Rows of ``table`` picked by the integer ref ``ids``, as a view when ``ids`` allows it."""
    n = len(ids.shape)
    row = index_of(ids.at([placeholder(i) for i in range(n)]))
    if row is None:
        ids = ctx.map("i64", ids, shape=ids.shape, dtype="i64", hint=f"{ctx.name}_ids")
        row = index_of(ids.at([placeholder(i) for i in range(n)]))
    rest = [placeholder(n + i) for i in range(len(table.shape) - 1)]
    return table.reindex(ctx.shape, [row] + rest)


@rule("aten.scaled_dot_product_attention.default")
def sdpa(ctx: Ctx) -> Ref:
    """SDPA as FuseMax's Cascade 4, in the same shape HF eager attention produces:
    ``S = Q·K`` (GQA: query head ``h`` reads key head ``h // G``), ``S * scale``, ``+ mask`` or a
    causal filter, softmax (max, exp, sum, divide), ``A·V``."""
    q, k, v = ctx.arg(0), ctx.arg(1), ctx.arg(2)
    mask, dropout, causal = ctx.arg(3, "attn_mask"), ctx.arg(4, "dropout_p", 0.0), ctx.arg(5, "is_causal", False)
    scale = ctx.arg(6, "scale") or 1 / math.sqrt(int(q.shape[-1]))
    if dropout:
        raise RuleError("scaled_dot_product_attention with dropout_p > 0")
    L, S = q.shape[-2], k.shape[-2]
    group = int(q.shape[-3] // k.shape[-3]) if len(q.shape) >= 3 else 1
    batch = q.shape[:-2]
    b = ctx.b

    def kv(ref: Ref, out: list[IndexExpr], last: list[IndexExpr]) -> Expr:
        heads = list(out[:len(batch)])
        if group != 1:
            heads[-1] = IBin("//", heads[-1], IConst(group))
        offset = len(batch) - (len(ref.shape) - 2)
        return ref.at(heads[offset:] + last)

    causal_filter = (lambda out: (Cond(out[-1], "<=", out[-2]),)) if causal else None
    scores = b.emit(f"{ctx.name}_qk", batch + (L, S), q.dtype,
                    lambda o, r: Call("mul", (q.at(o[:-1] + r), kv(k, o, [o[-1]] + r))),
                    reduce=[q.shape[-1]], where=causal_filter, empty=-math.inf if causal else None)
    scores = ctx.map("mul", scores, scale, shape=scores.shape, dtype=q.dtype, hint=f"{ctx.name}_scaled",
                     empty=-math.inf if causal else None)
    if mask is not None:
        bias = mask if mask.dtype != "bool" else ctx.map("where", mask, 0.0, -math.inf, shape=mask.shape,
                                                             dtype=q.dtype, hint=f"{ctx.name}_bias")
        scores = ctx.map("add", scores, bias, shape=scores.shape, dtype=q.dtype, hint=f"{ctx.name}_masked",
                         empty=-math.inf)   # (masked keys are absent: a row of none gives 0, as eager's SDPA)
    gm = reduce_ref(b, f"{ctx.name}_max", scores, [len(scores.shape) - 1], True, "max", q.dtype)
    sn = ctx.map("exp", ctx.map("sub", scores, gm, shape=scores.shape, dtype=q.dtype, hint=f"{ctx.name}_shift"),
                 shape=scores.shape, dtype=q.dtype, hint=f"{ctx.name}_exp")
    sd = reduce_ref(b, f"{ctx.name}_sum", sn, [len(sn.shape) - 1], True, "+", q.dtype)
    a = ctx.map("div", sn, sd, shape=sn.shape, dtype=q.dtype, hint=f"{ctx.name}_probs")
    return b.emit(ctx.name, ctx.shape, ctx.dtype,
                  lambda o, r: Call("mul", (a.at(o[:-1] + r), kv(v, o, r + [o[-1]]))), reduce=[S])

