"""The TIR lowering of each registered IR op, registered by name beside its peers.

An op is declared in :mod:`einfuse.ir.ops` (what it computes, its algebra, its costs); how it
becomes TIR is a function here, registered with :func:`lowers` (the IR layer cannot import TVM).
A lowering receives an :class:`OpContext` (the op's name and the dtype ``work`` its operands
and result have) and the operands as TIR expressions, and returns the result::

    @lowers("silu")
    def _silu(ctx: OpContext, x: Any) -> Any:
        return x * _sigmoid(x, ctx.one)

Transcendental ops avoid a libm call per vector lane where TVM would scalarize one: ``exp`` is a
polynomial (:func:`_exp`) and ``erf``, ``tanh``, ``sigmoid`` and the GELUs are built on it.
Max and min propagate NaN as torch does (:func:`nan_max`, :data:`NAN_REDUCERS`).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

from tvm import te, tirx

from ..errors import CompileError
from ..ir.dtypes import DTYPES


@dataclass(frozen=True)
class OpContext:
    """What a lowering knows besides its operands: the op's name and the TVM dtype it works in."""

    op: str
    work: str

    @property
    def one(self) -> Any:
        return const(1.0, self.work)

    @property
    def zero(self) -> Any:
        return const(0.0, self.work)

    @property
    def is_float(self) -> bool:
        return self.work.startswith("float")

    def flag(self, cond: Any) -> Any:
        """A boolean as 1 or 0 of the work dtype (an integer one by a select: TVM cannot vectorize
        a bool-to-integer cast, "IntImm can only take scalar, but boolx16 was supplied")."""
        if self.is_float or self.work == "bool":
            return cast(cond, self.work)
        return tirx.Select(cond, const(1, self.work), const(0, self.work))


Lowering = Callable[..., Any]

#: op name -> its lowering ``fn(ctx, *operands)``
LOWERINGS: dict[str, Lowering] = {}


def lowers(*ops: str) -> Callable[[Lowering], Lowering]:
    """Register the decorated function as the TIR lowering of each of ``ops``."""
    def register(fn: Lowering) -> Lowering:
        for op in ops:
            LOWERINGS[op] = fn
        return fn
    return register


def lower_op(op: str, args: list[Any], work: str) -> Any:
    """The registered IR op ``op`` on TIR values of dtype ``work``."""
    if op not in LOWERINGS:
        raise CompileError(f"no code generation for op '{op}'")
    return LOWERINGS[op](OpContext(op, work), *args)


# ---- TIR values ---------------------------------------------------------------------------------

def fold(fn: Callable[[Any, Any], Any], items: list[Any]) -> Any:
    out = items[0]
    for x in items[1:]:
        out = fn(out, x)
    return out


def const(v: float, dtype: str) -> Any:
    if dtype.startswith("int") and not math.isfinite(v):
        v = -(2 ** 62) if v < 0 else 2 ** 62
    if dtype == "bool":
        return tirx.const(bool(v), "bool")
    return tirx.const(int(v) if dtype.startswith("int") else v, dtype)


def dtype_of(x: Any) -> str:
    """The dtype of a TIR expression (this TVM spells it ``.ty``)."""
    return str(x.ty)


def cast(x: Any, dtype: str) -> Any:
    if dtype_of(x) == dtype:
        return x
    if dtype == "bool":
        return nan_ne(x, tirx.const(0, dtype_of(x)))
    return tirx.Cast(dtype, x)


def nan_ne(a: Any, b: Any) -> Any:
    """``a != b``, true where either is ``nan`` as in torch (TIR's float ``!=`` is ordered: false
    there, and TVM's simplifier turns ``!(a == b)`` back into it)."""
    if not dtype_of(a).startswith(("float", "bfloat")):
        return tirx.NE(a, b)
    nan = [tirx.isnan(x) for x in (a, b) if not isinstance(x, tirx.FloatImm)]
    return fold(tirx.Or, [tirx.NE(a, b), *nan])


def nan_max(a: Any, b: Any) -> Any:
    """``torch.maximum``: ``nan`` if either is (TIR's ``max`` is ``a > b ? a : b``, which drops a
    ``nan`` ``a``). Against a constant one compare-select, which x86 does in one ``maxps``."""
    return _nan_pick(tirx.max, lambda p, q: p > q, a, b)


def nan_min(a: Any, b: Any) -> Any:
    """``torch.minimum``: ``nan`` if either is (see :func:`nan_max`)."""
    return _nan_pick(tirx.min, lambda p, q: p < q, a, b)


def _nan_pick(pick: Callable[[Any, Any], Any], beats: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
    if not dtype_of(a).startswith(("float", "bfloat")):
        return pick(a, b)
    if isinstance(a, tirx.FloatImm):
        a, b = b, a
    if isinstance(b, tirx.FloatImm) and not math.isnan(float(b.value)):
        return tirx.Select(beats(b, a), b, a)      # (a nan fails the compare and stays)
    return tirx.Select(tirx.isnan(a), a, pick(a, b))   # (pick(a, b) is b when b is nan)


#: Float max/min reductions as torch's: ``nan`` once a point is. (TIR's ``rfactor`` knows only
#: its own reducers, so these are reduced serially: see ``schedules.cpu._partial_reduction``.)
NAN_REDUCERS = {
    "max": te.comm_reducer(nan_max, lambda t: tirx.const(-math.inf, t), name="nan_max"),
    "min": te.comm_reducer(nan_min, lambda t: tirx.const(math.inf, t), name="nan_min"),
}


# ---- exp and the functions built on it ----------------------------------------------------------

#: 2^f on [-1/2, 1/2], degree 5: weighted least squares on Chebyshev nodes, reweighted towards
#: equal relative error (Lawson's iteration), coefficients of f^0 .. f^5.
_EXP2 = (1.0000000716542083, 0.6931469670500685, 0.2402211972538138, 0.055507132974926855,
         0.009675541272538812, 0.0013276464235609379)


def _exp(x: Any) -> Any:
    """``exp`` without a libm call per vector lane (TVM_0.27_NOTES.md §6, pitfall 17): 2^round(t)
    times a degree-5 polynomial of the fraction, t = x*log2(e): a near-minimax fit of 2^f on
    [-1/2, 1/2] (``_EXP2``; relative error 7.5e-8 exact, 2.3e-7 in float32, the degree-6 Taylor
    series it replaced had 2.4e-7 with one more multiply-add).

    IEEE as torch: the polynomial carries a factor 2 (exact: its coefficients doubled) and the
    power of two one less, so t up to 128 keeps a normal exponent and the product overflows to
    ``inf`` where exp does (x > 88.72, ``+inf``); ``nan`` stays ``nan`` (one select, which
    vectorizes). Below 2^-125 (masked scores, exp(-inf)) it is exactly 0: tiny results would turn
    into denormals downstream, which x86 computes two orders of magnitude slower."""
    if dtype_of(x) != "float32":
        return tirx.exp(x)
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    raw = x * f32(1.4426950408889634)
    t = tirx.min(tirx.max(raw, f32(-125.0)), f32(128.0))   # (nan becomes -125 here: a valid exponent)
    whole = tirx.round(t)   # (TVM vectorizes round, not nearbyint: a loop with both was scalar)
    frac = t - whole
    poly = f32(2 * _EXP2[-1])
    for coefficient in reversed(_EXP2[:-1]):  # Horner: one multiply-add per degree
        poly = poly * frac + f32(2 * coefficient)
    scale = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", whole) + tirx.const(126, "int32"),
                                                        tirx.const(23, "int32")))
    value = tirx.Select(raw < f32(-125.0), f32(0.0), poly * scale)
    return tirx.Select(tirx.isnan(raw), raw, value)


def _erf(x: Any) -> Any:
    """``erf`` as Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7) over the polynomial exp,
    instead of a libm call per vector lane (it made BERT's and the MLP's GELU 20x slower)."""
    if dtype_of(x) != "float32":
        return tirx.erf(x)
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    ax = tirx.abs(x)
    t = f32(1.0) / (f32(1.0) + f32(0.3275911) * ax)
    poly = f32(0.0)
    for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly = (poly + f32(a)) * t
    magnitude = f32(1.0) - poly * _exp(f32(0.0) - ax * ax)
    return tirx.Select(x < f32(0.0), f32(0.0) - magnitude, magnitude)


def _tanh(x: Any, one: Any) -> Any:
    """tanh through the polynomial exp: 1 - 2 / (exp(2x) + 1)."""
    return one - const(2.0, dtype_of(x)) / (_exp(x + x) + one)


def _sigmoid(x: Any, one: Any) -> Any:
    return one / (one + _exp(-x))


@lowers("exp")
def _lower_exp(ctx: OpContext, x: Any) -> Any:
    return _exp(x)


@lowers("erf")
def _lower_erf(ctx: OpContext, x: Any) -> Any:
    return _erf(x)


@lowers("tanh")
def _lower_tanh(ctx: OpContext, x: Any) -> Any:
    return _tanh(x, ctx.one)


@lowers("sigmoid")
def _lower_sigmoid(ctx: OpContext, x: Any) -> Any:
    return _sigmoid(x, ctx.one)


@lowers("silu")
def _silu(ctx: OpContext, x: Any) -> Any:
    return x * _sigmoid(x, ctx.one)


@lowers("gelu")
def _gelu(ctx: OpContext, x: Any) -> Any:
    return x * const(0.5, dtype_of(x)) * (ctx.one + _erf(x * const(1 / math.sqrt(2.0), dtype_of(x))))


@lowers("gelu_tanh")
def _gelu_tanh(ctx: OpContext, x: Any) -> Any:
    inner = const(math.sqrt(2 / math.pi), dtype_of(x)) * (x + const(0.044715, dtype_of(x)) * x * x * x)
    return const(0.5, dtype_of(x)) * x * (ctx.one + _tanh(inner, ctx.one))


# ---- other unary ops ----------------------------------------------------------------------------

@lowers("abs", "log", "sqrt", "rsqrt", "sin", "cos", "floor", "ceil", "trunc")
def _intrinsic(ctx: OpContext, x: Any) -> Any:
    """The TIR intrinsic of the same name."""
    return getattr(tirx, ctx.op)(x)


@lowers("log1p")
def _log1p(ctx: OpContext, x: Any) -> Any:
    """``log(1 + x)`` accurate for small ``x``: libm's ``log1p`` (a compensated form such as
    ``log(u) * x / (u - 1)`` does not survive TVM's simplifier, which folds ``(1 + x) - 1``)."""
    return tirx.log1p(x)


@lowers("expm1")
def _expm1(ctx: OpContext, x: Any) -> Any:
    """``exp(x) - 1`` accurate for small ``x``: ``(u - 1) * x / log(u)`` with ``u = exp(x)`` for
    ``|x| < 1/2`` (``x`` where ``u`` rounds to 1), ``u - 1`` beyond (exact enough there, and
    ``inf``, ``-1`` and ``nan`` as torch)."""
    u = _exp(x)
    half = const(0.5, dtype_of(x))
    small = tirx.Select(u == ctx.one, x, (u - ctx.one) * x / tirx.log(u))
    return tirx.Select(tirx.abs(x) < half, small, u - ctx.one)


@lowers("round")
def _round(ctx: OpContext, x: Any) -> Any:
    """To nearest, ties to even (``nearbyint``: the current rounding mode, which is that)."""
    return tirx.nearbyint(x)


@lowers("neg")
def _neg(ctx: OpContext, x: Any) -> Any:
    return ctx.zero - x


@lowers("relu")
def _relu(ctx: OpContext, x: Any) -> Any:
    return nan_max(x, ctx.zero)


@lowers("recip")
def _recip(ctx: OpContext, x: Any) -> Any:
    return ctx.one / x


@lowers("sign")
def _sign(ctx: OpContext, x: Any) -> Any:
    return ctx.flag(x > ctx.zero) - ctx.flag(x < ctx.zero)


@lowers("not")
def _not(ctx: OpContext, x: Any) -> Any:
    return ctx.flag(tirx.EQ(x, ctx.zero))


@lowers("f16", "bf16", "f32", "f64", "i8", "i32", "i64", "bool")
def _convert(ctx: OpContext, x: Any) -> Any:
    """A cast: the value rounded or truncated to the op's dtype, computed on in ``work``."""
    return cast(cast(x, DTYPES[ctx.op].tvm), ctx.work)


# ---- binary and ternary ops ---------------------------------------------------------------------

_ARITHMETIC: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "max": nan_max, "min": nan_min, "take_left": lambda a, b: a, "take_right": lambda a, b: b,
}

_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge, "eq": tirx.EQ, "ne": nan_ne,
}


@lowers(*_ARITHMETIC)
def _arithmetic(ctx: OpContext, a: Any, b: Any) -> Any:
    return _ARITHMETIC[ctx.op](a, b)


@lowers(*_COMPARISONS)
def _compare(ctx: OpContext, a: Any, b: Any) -> Any:
    """A comparison as 1 or 0."""
    return ctx.flag(_COMPARISONS[ctx.op](a, b))


@lowers("pow")
def _pow(ctx: OpContext, a: Any, b: Any) -> Any:
    """Small integer powers as products (``x**3`` in GELU); others through ``power``."""
    if isinstance(b, tirx.FloatImm) and float(b.value) in (1.0, 2.0, 3.0, 4.0):
        return fold(lambda p, q: p * q, [a] * int(b.value))
    return tirx.power(a, b)


@lowers("floordiv")
def _floordiv(ctx: OpContext, a: Any, b: Any) -> Any:
    return tirx.floor(a / b) if ctx.is_float else tirx.floordiv(a, b)


@lowers("shr", "bitand")
def _bits(ctx: OpContext, a: Any, b: Any) -> Any:
    """On int32 (a float operand holds an integer: a byte loaded and widened), back to ``work``."""
    x, y = cast(a, "int32"), cast(b, "int32")
    return cast(tirx.shift_right(x, y) if ctx.op == "shr" else tirx.bitwise_and(x, y), ctx.work)


@lowers("mod")
def _mod(ctx: OpContext, a: Any, b: Any) -> Any:
    return a - tirx.floor(a / b) * b if ctx.is_float else tirx.floormod(a, b)


@lowers("and", "or")
def _logical(ctx: OpContext, a: Any, b: Any) -> Any:
    join = tirx.And if ctx.op == "and" else tirx.Or
    return ctx.flag(join(nan_ne(a, ctx.zero), nan_ne(b, ctx.zero)))


@lowers("xor")
def _xor(ctx: OpContext, a: Any, b: Any) -> Any:
    return ctx.flag(tirx.NE(cast(nan_ne(a, ctx.zero), "int8"), cast(nan_ne(b, ctx.zero), "int8")))  # (NE of bools: fcmp)


@lowers("where")
def _where(ctx: OpContext, c: Any, a: Any, b: Any) -> Any:
    return tirx.Select(nan_ne(c, ctx.zero), a, b)
