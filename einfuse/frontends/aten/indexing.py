"""Tensor factories and indexing: arange, full, advanced indexing, gather, top-k."""
from __future__ import annotations

from typing import Callable

import sympy

from ...ir import Call, Const, Coord, IConst
from ...ir.nodes import Expr, IndexExpr
from ..builder import Ref, ibin, index_of, placeholder
from .base import Ctx, RuleError, broadcast, norm_dim, rule


@rule("aten.arange.start_step", "aten.arange.default", "aten.arange.start")
def arange(ctx: Ctx) -> Ref:
    """``idx(start + step*i)``: a coordinate value, no tensor at all."""
    if ctx.op == "aten.arange.default":
        start, step = 0, 1
    else:
        start, step = ctx.arg(0), ctx.arg(2, "step", 1)
    if not all(float(v).is_integer() for v in (start, step) if isinstance(v, (int, float))):
        raise RuleError("arange with a fractional start or step")
    value = ibin("+", ctx.b.size_index(sympy.sympify(start)), ibin("*", IConst(int(step)), placeholder(0)))
    return Ref(Coord(value), tuple(ctx.shape), ctx.dtype)


@rule("aten.empty_permuted.default", "aten.empty.memory_format")
def empty(ctx: Ctx) -> Ref:
    """An uninitialized tensor (a graph reads it only where it wrote it first, or the read is
    undefined in torch too): zeros."""
    return ctx.emit(lambda out, _: Const(0.0))


@rule("aten.full.default", "aten.full_like.default", "aten.scalar_tensor.default", "aten.zeros.default",
      "aten.ones.default", "aten.zeros_like.default", "aten.ones_like.default", "aten.new_ones.default",
      "aten.new_zeros.default")
def full(ctx: Ctx) -> Ref:
    """A constant: no tensor, just the number wherever it is read."""
    name = ctx.op.split(".")[1]
    value = {"zeros": 0, "zeros_like": 0, "new_zeros": 0, "ones": 1, "ones_like": 1, "new_ones": 1}.get(name)
    if value is None:
        value = ctx.arg(0) if name == "scalar_tensor" else ctx.arg(1, "fill_value")
    return Ref(Const(float(value)), tuple(ctx.shape), ctx.dtype)


@rule("aten.index.Tensor")
def index(ctx: Ctx) -> Ref:
    """``x[i0, i1, ...]`` with index tensors (None keeps a dimension): gathers through the index
    values broadcast together, placed as numpy places them (where the indexed dimensions were if
    they are adjacent, else in front)."""
    x, indices = ctx.arg(0), list(ctx.arg(1))
    indices += [None] * (len(x.shape) - len(indices))
    used = [d for d, i in enumerate(indices) if i is not None]
    bshape = tuple(sympy.sympify(s) for s in _broadcast_shape([indices[d].shape for d in used]))
    front = used[0] if used == list(range(used[0], used[-1] + 1)) else 0
    bvars = [placeholder(front + k) for k in range(len(bshape))]
    kept = iter(range(len(ctx.shape)))
    positions = [next(kept) for _ in range(front)]  # dimensions before the broadcast block
    for _ in bshape:
        next(kept)
    index_exprs: list[IndexExpr] = []
    for d, ix in enumerate(indices):
        if ix is not None:
            index_exprs.append(_index_value(ctx, ix, bshape, bvars))
        elif d < front:
            index_exprs.append(placeholder(positions[d]))
        else:
            index_exprs.append(placeholder(next(kept)))
    return x.reindex(ctx.shape, index_exprs)


def _index_value(ctx: Ctx, ix: Ref, bshape: tuple, bvars: list[IndexExpr]) -> IndexExpr:
    """An index tensor read at the broadcast variables, as an index expression (a gather)."""
    offset = len(bshape) - len(ix.shape)
    at = [IConst(0) if s == 1 and bshape[offset + d] != 1 else bvars[offset + d] for d, s in enumerate(ix.shape)]
    value = index_of(ix.at(at))
    if value is None:
        ix = ctx.map("i64", ix, shape=ix.shape, dtype="i64", hint=f"{ctx.name}_index")
        value = index_of(ix.at(at))
    return value


def _broadcast_shape(shapes: list[tuple]) -> tuple:
    n = max(len(s) for s in shapes)
    out = []
    for d in range(n):
        sizes = {s[d - n + len(s)] for s in shapes if d - n + len(s) >= 0} - {1}
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


@rule("aten.gather.default")
def gather(ctx: Ctx) -> Ref:
    """``Y[.., i, ..] = X[.., IDX[.., i, ..], ..]`` along ``dim``."""
    x, dim, ix = ctx.arg(0), norm_dim(ctx.arg(1), len(ctx.arg(0).shape)), ctx.arg(2)
    out = [placeholder(d) for d in range(len(ctx.shape))]
    value = index_of(ix.at(out))
    if value is None:
        ix = ctx.map("i64", ix, dtype="i64", hint=f"{ctx.name}_index")
        value = index_of(ix.at(out))
    index_exprs = list(out)
    index_exprs[dim] = value
    return x.reindex(ctx.shape, index_exprs)


@rule("aten.scatter.value")
def scatter_value(ctx: Ctx) -> Ref:
    """``Y = X`` with ``value`` written where ``IDX`` points along ``dim``: ``HIT[.., j, ..] =
    max_i (IDX[.., i, ..] == j)`` (a one-hot's union, DeepSeek's group mask), then
    ``Y = where(HIT, value, X)``. Repeated indices write the same value, so their order is moot."""
    x, dim, ix, value = ctx.arg(0), norm_dim(ctx.arg(1), len(ctx.arg(0).shape)), ctx.arg(2), ctx.arg(3)
    if len(ix.shape) != len(x.shape) or any(a != b for d, (a, b) in enumerate(zip(ix.shape, x.shape)) if d != dim):
        raise RuleError(f"scatter along {dim} with an index of shape {list(ix.shape)} into {list(x.shape)}")

    def hit(out: list[IndexExpr], red: list[IndexExpr]) -> Call:
        at = list(out)
        at[dim] = red[0]
        return Call("eq", (ix.at(at), Coord(out[dim])))
    hits = ctx.b.emit(f"{ctx.name}_hit", ctx.shape, "bool", hit, reduce=[ix.shape[dim]], op="max")
    return ctx.map("where", hits, float(value), x)


@rule("aten.index_select.default")
def index_select(ctx: Ctx) -> Ref:
    x, dim, ix = ctx.arg(0), norm_dim(ctx.arg(1), len(ctx.arg(0).shape)), ctx.arg(2)
    value = index_of(ix.at([placeholder(dim)]))
    if value is None:
        raise RuleError("index_select with a computed index")
    index_exprs = [placeholder(d) for d in range(len(x.shape))]
    index_exprs[dim] = value
    return x.reindex(ctx.shape, index_exprs)


@rule("aten.topk.default")
def topk(ctx: Ctx) -> tuple[Ref, Ref]:
    """Top-k by rank (:func:`_ranked`); ``k`` is in the output shapes. (Selection as a sparse
    ``populate`` is the routing pass's business.)"""
    x = ctx.arg(0)
    return _ranked(ctx, x, norm_dim(ctx.arg(2, "dim", -1), len(x.shape)), "gt" if ctx.arg(3, "largest", True) else "lt")


@rule("aten.sort.default", "aten.sort.stable")
def sort(ctx: Ctx) -> tuple[Ref, Ref]:
    """``torch.sort`` (and ``argsort``, which exports as it) by rank (:func:`_ranked`), stable:
    equal values keep their order."""
    x = ctx.arg(0)
    if ctx.op.endswith("stable"):   # (sort.stable's options are keywords only)
        dim, descending = ctx.kwargs.get("dim", -1), ctx.kwargs.get("descending", False)
    else:
        dim, descending = ctx.arg(1, "dim", -1), ctx.arg(2, "descending", False)
    return _ranked(ctx, x, norm_dim(dim, len(x.shape)), "gt" if descending else "lt")


def _ranked(ctx: Ctx, x: Ref, dim: int, before: str) -> tuple[Ref, Ref]:
    """The first elements of ``x`` along ``dim`` in order (``before``: ``gt``, largest first),
    dense and lowerable anywhere: ``RANK[.., e]`` counts the elements of the fiber that come
    before ``e`` (``before`` it, or equal at a lower coordinate); then
    ``VALUES[.., j] = X[.., e] * (RANK[.., e] == j)`` and ``INDICES[.., j] = idx(e) * (...)``
    summed over ``e`` (the output shapes say how many)."""
    (vshape, ishape), (vdtype, idtype) = ctx.shape, ctx.dtype

    def at(out: list[IndexExpr], i: IndexExpr) -> list[IndexExpr]:
        index = list(out)
        index[dim] = i
        return index

    def rank(out: list[IndexExpr], red: list[IndexExpr]) -> Call:
        mine, other = x.at(out), x.at(at(out, red[0]))
        tie = Call("and", (Call("eq", (other, mine)), Call("lt", (Coord(red[0]), Coord(out[dim])))))
        return Call("or", (Call(before, (other, mine)), tie))
    order = ctx.b.emit(f"{ctx.name}_rank", x.shape, "i64", rank, reduce=[x.shape[dim]])

    def pick(value: Callable[[list[IndexExpr], IndexExpr], Expr]) -> Callable[..., Call]:
        return lambda out, red: Call("mul", (value(out, red[0]),
                                             Call("eq", (order.at(at(out, red[0])), Coord(out[dim])))))
    values = ctx.b.emit(f"{ctx.name}_values", vshape, vdtype, pick(lambda o, e: x.at(at(o, e))),
                        reduce=[x.shape[dim]])
    indices = ctx.b.emit(f"{ctx.name}_indices", ishape, idtype, pick(lambda o, e: Coord(e)), reduce=[x.shape[dim]])
    return values, indices


@rule("aten.scatter_add.default")
def scatter_add(ctx: Ctx) -> Ref:
    """``Y = X`` plus, along ``dim``, each source element at its index: ``Y[.., j, ..] = X[.., j, ..] +
    sum_i (IDX[.., i, ..] == j) * SRC[.., i, ..]`` (index and source of one shape, X's elsewhere)."""
    x, dim, ix, src = ctx.arg(0), norm_dim(ctx.arg(1), len(ctx.arg(0).shape)), ctx.arg(2), ctx.arg(3)
    if tuple(ix.shape) != tuple(src.shape) or any(ix.shape[d] != x.shape[d] for d in range(len(x.shape)) if d != dim):
        raise RuleError(f"scatter_add with an index of shape {list(ix.shape)}, a source of shape "
                        f"{list(src.shape)} into {list(x.shape)} (they must agree but along {dim})")

    def added(out: list[IndexExpr], red: list[IndexExpr]) -> Call:
        at = list(out)
        at[dim] = red[0]
        return Call("mul", (Call("eq", (ix.at(at), Coord(out[dim]))), src.at(at)))
    return ctx.map("add", x, ctx.emit(added, reduce=[ix.shape[dim]], hint=f"{ctx.name}_added"))


@rule("aten.index_put.default")
def index_put(ctx: Ctx) -> Ref:
    """``x[..., idx, ...] = v`` (one 1-D index tensor, along ``dim``) and, with ``accumulate``,
    ``index_add``: ``Y[.., j, ..] = X + sum_i (IDX[i] == j) * V[.., i, ..]``; without, the last
    ``i`` with ``IDX[i] == j`` wins (``LAST[j] = max_i where(IDX[i] == j, i, -1)``), as a
    sequential loop would write."""
    x, indices, v, accumulate = ctx.arg(0), list(ctx.arg(1)), ctx.arg(2), bool(ctx.arg(3, "accumulate", False))
    used = [d for d, i in enumerate(indices) if i is not None]
    if len(used) != 1 or len(indices[used[0]].shape) != 1:
        raise RuleError("index_put with other than one 1-D index tensor")
    dim, ix = used[0], indices[used[0]]
    vshape = list(x.shape)
    vshape[dim] = ix.shape[0]

    def value_at(out: list[IndexExpr], i: IndexExpr) -> Expr:
        at = list(out)
        at[dim] = i
        return broadcast(v, vshape, at)
    if accumulate:
        added = ctx.emit(lambda out, red: Call("mul", (Call("eq", (ix.at([red[0]]), Coord(out[dim]))), value_at(out, red[0]))),
                         reduce=[ix.shape[0]], hint=f"{ctx.name}_added")
        return ctx.map("add", x, added)
    last = ctx.b.emit(f"{ctx.name}_last", (x.shape[dim],), "i64",
                      lambda out, red: Call("where", (Call("eq", (ix.at([red[0]]), Coord(out[0]))), Coord(red[0]), Const(-1.0))),
                      reduce=[ix.shape[0]], op="max")

    def put(out: list[IndexExpr], _: list[IndexExpr]) -> Call:
        found = last.at([out[dim]])
        return Call("where", (Call("ge", (found, Const(0.0))), value_at(out, index_of(found)), x.at(out)))
    return ctx.emit(put)
