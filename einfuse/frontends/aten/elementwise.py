"""Element-wise ops: one Einsum each, operands broadcast numpy-style."""
from __future__ import annotations

from ..builder import Ref
from .base import Ctx, RuleError, rule

_UNARY = {
    "neg": "neg", "exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "tanh": "tanh",
    "sigmoid": "sigmoid", "relu": "relu", "sin": "sin", "cos": "cos", "abs": "abs",
    "reciprocal": "recip", "erf": "erf", "floor": "floor", "ceil": "ceil", "sign": "sign",
    "trunc": "trunc", "logical_not": "not", "silu": "silu", "log1p": "log1p", "expm1": "expm1",
}
for _aten, _op in _UNARY.items():
    rule(f"aten.{_aten}.default")((lambda op: lambda ctx: ctx.map(op, ctx.arg(0)))(_op))

#: aten op -> (IR op, its overloads that take tensors or scalars; ``.default`` where torch has only that)
_BINARY = {
    "mul": ("mul", "Tensor", "Scalar"), "div": ("div", "Tensor", "Scalar"),
    "maximum": ("max", "default"), "minimum": ("min", "default"),
    "pow": ("pow", "Tensor_Tensor", "Tensor_Scalar", "Scalar"),
    **{cmp: (cmp, "Tensor", "Scalar") for cmp in ("eq", "ne", "lt", "le", "gt", "ge")},
    "logical_and": ("and", "default"), "logical_or": ("or", "default"), "logical_xor": ("xor", "default"),
    "remainder": ("mod", "Tensor", "Scalar", "Scalar_Tensor"), "floor_divide": ("floordiv", "default", "Scalar"),
}
for _aten, (_op, *_overloads) in _BINARY.items():
    rule(*(f"aten.{_aten}.{o}" for o in _overloads))((lambda op: lambda ctx: ctx.map(op, ctx.arg(0), ctx.arg(1)))(_op))


@rule("aten.bitwise_and.Tensor", "aten.bitwise_and.Scalar", "aten.bitwise_or.Tensor", "aten.bitwise_or.Scalar",
      "aten.bitwise_xor.Tensor", "aten.bitwise_xor.Scalar")
def bitwise(ctx: Ctx) -> Ref:
    if ctx.dtype != "bool":
        raise RuleError(f"bitwise ops on {ctx.dtype} (only bool masks are supported)")
    op = {"and": "and", "or": "or", "xor": "xor"}[ctx.op.split(".")[1].split("_")[1]]
    return ctx.map(op, ctx.arg(0), ctx.arg(1))


@rule("aten.bitwise_not.default")
def bitwise_not(ctx: Ctx) -> Ref:
    if ctx.dtype != "bool":
        raise RuleError(f"bitwise_not on {ctx.dtype} (only bool masks are supported)")
    return ctx.map("not", ctx.arg(0))


@rule("aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar")
def add_sub(ctx: Ctx) -> Ref:
    a, b = ctx.arg(0), ctx.arg(1)
    alpha = ctx.arg(2, "alpha", 1)
    op = "add" if ".add." in ctx.op else "sub"
    if alpha != 1:
        b = ctx.map("mul", b, alpha, shape=b.shape if isinstance(b, Ref) else (), hint=f"{ctx.name}_alpha") \
            if isinstance(b, Ref) else b * alpha
    return ctx.map(op, a, b)


@rule("aten.rsub.Scalar", "aten.rsub.Tensor")
def rsub(ctx: Ctx) -> Ref:
    alpha = ctx.arg(2, "alpha", 1)
    a = ctx.arg(0) if alpha == 1 else ctx.map("mul", ctx.arg(0), alpha, hint=f"{ctx.name}_alpha")
    return ctx.map("sub", ctx.arg(1), a)


@rule("aten.div.Tensor_mode", "aten.div.Scalar_mode")
def div_mode(ctx: Ctx) -> Ref:
    mode = ctx.arg(2, "rounding_mode")
    if mode is None:
        return ctx.map("div", ctx.arg(0), ctx.arg(1))
    q = ctx.map("div", ctx.arg(0), ctx.arg(1), hint=f"{ctx.name}_q", dtype="f64")
    return ctx.map({"trunc": "trunc", "floor": "floor"}[mode], q)


@rule("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def where(ctx: Ctx) -> Ref:
    return ctx.map("where", ctx.arg(0), ctx.arg(1), ctx.arg(2))


@rule("aten.clamp.default", "aten.clamp.Tensor", "aten.hardtanh.default")
def clamp(ctx: Ctx) -> Ref:
    x = ctx.arg(0)
    lo, hi = (ctx.arg(1, "min_val", -1.0), ctx.arg(2, "max_val", 1.0)) if "hardtanh" in ctx.op \
        else (ctx.arg(1, "min"), ctx.arg(2, "max"))
    if lo is not None:
        x = ctx.map("max", x, lo, hint=f"{ctx.name}_lo") if hi is not None else ctx.map("max", x, lo)
    return ctx.map("min", x, hi) if hi is not None else x


@rule("aten.erfc.default")
def erfc(ctx: Ctx) -> Ref:
    erf = ctx.map("erf", ctx.arg(0), hint=f"{ctx.name}_erf")
    return ctx.map("sub", 1.0, erf)


@rule("aten.gelu.default")
def gelu(ctx: Ctx) -> Ref:
    approximate = ctx.arg(1, "approximate", "none")
    return ctx.map("gelu_tanh" if approximate == "tanh" else "gelu", ctx.arg(0))
