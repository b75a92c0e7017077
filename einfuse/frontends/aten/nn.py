"""Neural-network ops: normalisations, embedding, and scaled dot-product attention."""
from __future__ import annotations

import math

import sympy

from ...ir import Call, Cond, Const, Coord, IBin, IConst
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


@rule("aten._embedding_bag.default", "aten._embedding_bag_forward_only.default")
def embedding_bag(ctx: Ctx) -> tuple[Ref, Ref, Ref, Ref | None]:
    """``nn.EmbeddingBag``: bag ``b`` holds ``ids[offsets[b] .. offsets[b+1])``; each index's bag
    ``BAG[i] = sum_b (offsets[b] <= i) - 1``, then per bag the rows' sum (times
    ``per_sample_weights``), mean (an empty bag: 0) or max (an empty bag: 0), as dense sums over
    the indices. Returns (output, offset2bag, bag_size, max_indices:
    the row of each max, by the first index holding it; None but in max mode); ``padding_idx``
    rows are left out."""
    w, ids, offsets = ctx.arg(0), ctx.arg(1), ctx.arg(2)
    mode, weights, last, pad = ctx.arg(4, "mode", 0), ctx.arg(6, "per_sample_weights"), ctx.arg(7, "include_last_offset", False), ctx.arg(8, "padding_idx", -1)
    if len(ids.shape) != 1:
        raise RuleError("embedding_bag of other than 1-D indices with offsets")
    n, bags = ids.shape[0], ctx.shape[0][0]
    bag = ctx.b.emit(f"{ctx.name}_bag", (n,), "i64", lambda out, red: Call("le", (offsets.at([red[0]]), Coord(out[0]))),
                     reduce=[offsets.shape[0] - (1 if last else 0)])
    member = lambda out, i: Call("and", (Call("eq", (bag.at([i]), Call("add", (Coord(out[0]), Const(1.0))))),   # noqa: E731
                                         Call("ne", (ids.at([i]), Const(float(pad)))))) if pad is not None and pad >= 0 \
        else Call("eq", (bag.at([i]), Call("add", (Coord(out[0]), Const(1.0)))))
    size = ctx.b.emit(f"{ctx.name}_size", (bags,), "i64", lambda out, red: member(out, red[0]), reduce=[n])
    row = lambda out, i: w.at([index_of(ids.at([i])), out[1]])   # noqa: E731
    if mode == 2:
        top = ctx.b.emit(f"{ctx.name}_max", ctx.shape[0], ctx.dtype[0], lambda out, red: Call(
            "where", (member(out, red[0]), row(out, red[0]), Const(-math.inf))), reduce=[n], op="max")
        out = ctx.map("where", size.reindex(ctx.shape[0], [placeholder(0)]), top, 0.0, shape=ctx.shape[0],
                      dtype=ctx.dtype[0])
        first = ctx.b.emit(f"{ctx.name}_argmax", ctx.shape[0], "i64", lambda o, red: Call("where", (
            Call("and", (member(o, red[0]), Call("eq", (row(o, red[0]), top.at(o))))), Coord(red[0]), Const(float(n)))),
            reduce=[n], op="min")
        rows = ctx.b.emit(f"{ctx.name}_rows", ctx.shape[0], "i64",
                          lambda o, _: Call("where", (Call("lt", (first.at(o), Const(float(n)))), ids.at([index_of(first.at(o))]), Const(-1.0))))
    else:
        factor = (lambda i: weights.at([i])) if weights is not None else (lambda i: Const(1.0))   # noqa: E731
        total = ctx.b.emit(f"{ctx.name}_sum", ctx.shape[0], ctx.dtype[0], lambda o, red: Call(
            "mul", (Call("mul", (member(o, red[0]), factor(red[0]))), row(o, red[0]))), reduce=[n])
        out = total if mode == 0 else ctx.map("div", total, ctx.map("max", size.reindex(ctx.shape[0], [placeholder(0)]), 1.0,
                                                                    shape=ctx.shape[0], dtype=ctx.dtype[0]),
                                              shape=ctx.shape[0], dtype=ctx.dtype[0])
        rows = None
    return out, bag, size, rows


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

