"""The registered compute ops of the IR: what each op computes and its algebraic properties.

Map expressions may only call ops that are registered here; the verifier refuses any other name.
Each op carries the properties that rewrites consult (commutativity, associativity, identity),
a numpy implementation that the reference interpreter uses, and what it costs (FLOPs, vector
instructions per element on a CPU, whether an accelerator computes it on its slow path).
Adding an op is one ``register(...)`` line beside its peers here and its TIR lowering, an
``@lowers`` function in :mod:`einfuse.codegen.op_lowering` (docs/ir.md, "Adding an op").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

#: Merge operators (EDGE occupancy): which points of the iteration space an action touches.
#: cap = both operands present, cup = at least one, all = every point, lhs/rhs = that operand
#: present, lhs_only/rhs_only = that operand present and the other absent.
MERGES = ("cap", "cup", "all", "lhs", "rhs", "lhs_only", "rhs_only")


@dataclass(frozen=True, slots=True)
class Op:
    """One compute op: its arity, default merge, numpy kernel, algebraic properties and costs.

    ``identity`` is the value ``e`` with ``op(x, e) == x`` (and ``op(e, x) == x`` when the op is
    commutative): simplification drops it. ``flops`` counts its arithmetic, ``vector_ops`` the
    vector instructions per element it lowers to on a CPU (``targets.cost``; ``flops`` unless
    given), ``transcendental`` whether an accelerator computes it like ``exp``
    (``targets.accel``).
    """

    name: str
    arity: int
    fn: Callable[..., np.ndarray]
    merge: str = "cup"
    commutative: bool = False
    associative: bool = False
    identity: float | None = None
    infix: str | None = None
    flops: int = 1
    result_dtype: str | None = None
    vector_ops: int | None = None
    transcendental: bool = False

    def __post_init__(self) -> None:
        if self.vector_ops is None:
            object.__setattr__(self, "vector_ops", self.flops)


OPS: dict[str, Op] = {}
INFIX: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Add ``op`` to the registry (and to the infix table if it has an infix spelling)."""
    OPS[op.name] = op
    if op.infix:
        INFIX[op.infix] = op
    return op


def lookup(name: str) -> Op | None:
    """The registered op called ``name``, or None."""
    return OPS.get(name)


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf
    return 0.5 * x * (1.0 + np.vectorize(erf, otypes=[float])(x / math.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _erf(x: np.ndarray) -> np.ndarray:
    from math import erf
    return np.vectorize(erf, otypes=[float])(x)


def _round_f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).astype(np.float64)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def _to_int(bits: int) -> Callable[[np.ndarray], np.ndarray]:
    def cast(x: np.ndarray) -> np.ndarray:
        info = np.iinfo(f"int{bits}")
        return np.clip(np.trunc(np.nan_to_num(x)), info.min, info.max)
    return cast


def _unary(name: str, fn: Callable[[np.ndarray], np.ndarray], vector_ops: int | None = None,
           transcendental: bool = False, result_dtype: str | None = None) -> None:
    register(Op(name, 1, fn, vector_ops=vector_ops, transcendental=transcendental, result_dtype=result_dtype))


_unary("neg", np.negative)
_unary("abs", np.abs)
_unary("exp", np.exp, 12, True)
_unary("log", np.log, 14, True)
_unary("log1p", np.log1p, 16, True)
_unary("expm1", np.expm1, 16, True)
_unary("sqrt", np.sqrt, 4, True)
_unary("rsqrt", lambda x: 1.0 / np.sqrt(x), 4, True)
_unary("tanh", np.tanh, 16, True)
_unary("sigmoid", lambda x: 1.0 / (1.0 + np.exp(-x)), 14, True)
_unary("relu", lambda x: np.maximum(x, 0.0))
_unary("gelu", _gelu, 18, True)
_unary("gelu_tanh", _gelu_tanh, transcendental=True)
_unary("silu", lambda x: x / (1.0 + np.exp(-x)), 14, True)
_unary("erf", _erf, 16, True)
_unary("sin", np.sin, transcendental=True)
_unary("cos", np.cos, transcendental=True)
_unary("recip", lambda x: 1.0 / x)
_unary("floor", np.floor)
_unary("trunc", np.trunc)
_unary("ceil", np.ceil)
_unary("round", np.rint)   # (to nearest, ties to even: the int8 activations of quantize{compute=int8})
_unary("sign", lambda x: (x > 0).astype(np.float64) - (x < 0).astype(np.float64))   # (0 for nan, as torch.sign)
_unary("not", lambda x: (x == 0).astype(np.float64), result_dtype="bool")

_CASTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "f16": _round_f16,
    "bf16": _round_bf16,
    "f32": lambda x: np.asarray(x, dtype=np.float32).astype(np.float64),
    "f64": lambda x: np.asarray(x, dtype=np.float64),
    "i8": _to_int(8),
    "i32": _to_int(32),
    "i64": _to_int(64),
    "bool": lambda x: (x != 0).astype(np.float64),
}
for _name, _fn in _CASTS.items():
    register(Op(_name, 1, _fn, flops=0, result_dtype=_name))

register(Op("add", 2, np.add, "cup", True, True, 0.0, "+"))
register(Op("sub", 2, np.subtract, "cup", identity=0.0, infix="-"))
register(Op("mul", 2, np.multiply, "cap", True, True, 1.0, "*"))
register(Op("div", 2, np.divide, "rhs", identity=1.0, infix="/", vector_ops=4))
register(Op("take_left", 2, lambda a, b: a, "cap", infix="<-", flops=0))
register(Op("take_right", 2, lambda a, b: b, "cap", infix="->", flops=0))
register(Op("max", 2, np.maximum, "cup", True, True, -math.inf))
register(Op("min", 2, np.minimum, "cup", True, True, math.inf))
register(Op("pow", 2, np.power, "cup", vector_ops=16))
register(Op("floordiv", 2, np.floor_divide, "cup"))
register(Op("mod", 2, np.mod, "cup"))
# Bit ops on the integers their operands hold (a packed weight's bytes: ``passes/quantize.py``).
register(Op("shr", 2, lambda a, b: np.right_shift(np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64)),
            "cup"))
register(Op("bitand", 2, lambda a, b: np.bitwise_and(np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64)),
            "cup", commutative=True, associative=True))
register(Op("and", 2, lambda a, b: ((a != 0) & (b != 0)).astype(np.float64), "cup", True, True,
            result_dtype="bool"))
register(Op("or", 2, lambda a, b: ((a != 0) | (b != 0)).astype(np.float64), "cup", True, True,
            result_dtype="bool"))
register(Op("xor", 2, lambda a, b: ((a != 0) ^ (b != 0)).astype(np.float64), "cup", True, True,
            result_dtype="bool"))
_COMPARISONS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
                "==": np.equal, "!=": np.not_equal}
_CMP_NAMES = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}
for _sym, _fn in _COMPARISONS.items():
    register(Op(_CMP_NAMES[_sym], 2, (lambda f: lambda a, b: f(a, b).astype(np.float64))(_fn),
                "cup", _sym in ("==", "!="), infix=_sym, result_dtype="bool"))
register(Op("where", 3, lambda c, a, b: np.where(c != 0, a, b), "cup"))


@dataclass(frozen=True, slots=True)
class ReduceOp:
    """A reduce action's compute: numpy reduction and identity."""

    name: str
    fn: Callable[..., np.ndarray]
    identity: float


REDUCE_OPS: dict[str, ReduceOp] = {
    "+": ReduceOp("+", np.sum, 0.0),
    "*": ReduceOp("*", np.prod, 1.0),
    "max": ReduceOp("max", np.max, -math.inf),
    "min": ReduceOp("min", np.min, math.inf),
}

#: Populate coordinate ops: which coordinates of a fiber the output keeps.
#: name -> (keep largest?, takes k)
POPULATE_OPS: dict[str, tuple[bool, bool]] = {
    "topk": (True, True),
    "bottomk": (False, True),
    "argmax": (True, False),
    "argmin": (False, False),
}
