"""The rule registry of the ATen lowering and what every rule shares: the context, errors, helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import sympy

from ...ir import Call, Const, Coord, IConst
from ...ir.nodes import Expr, IndexExpr
from ..builder import Builder, Ref

Rule = Callable[["Ctx"], Any]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the translation of the ATen ops ``names`` (``"aten.add.Tensor"``)."""
    def register(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn
    return register


class RuleError(Exception):
    """A rule cannot translate this use of its op (an unsupported argument); the frontend turns
    it into an UnsupportedOperatorError naming the op and the source line."""


@dataclass
class Ctx:
    """What a rule sees: the builder, the node's name, resolved args, output shape(s) and dtype."""

    b: Builder
    op: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    shape: Any
    dtype: Any

    def arg(self, i: int, key: str | None = None, default: Any = None) -> Any:
        """Positional argument ``i`` (or keyword ``key``), else ``default``."""
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(key, default) if key else default

    def emit(self, rhs: Callable[[list[IndexExpr], list[IndexExpr]], Expr], **kw: Any) -> Ref:
        """Emit one Einsum producing this node's output (shape and dtype from the graph)."""
        shape = kw.pop("shape", self.shape)
        dtype = kw.pop("dtype", self.dtype)
        return self.b.emit(kw.pop("hint", self.name), shape, dtype, rhs, **kw)

    def map(self, op: str, *operands: Any, hint: str | None = None, dtype: str | None = None,
            shape: Sequence[sympy.Expr] | None = None, empty: float | None = None) -> Ref:
        """An element-wise op over broadcast operands (refs or Python numbers)."""
        out_shape = tuple(self.shape if shape is None else shape)
        operands = tuple(self.number(x) if isinstance(x, sympy.Expr) else x for x in operands)
        return self.b.emit(hint or self.name, out_shape, dtype or self.dtype,
                           lambda o, _: Call(op, tuple(broadcast(x, out_shape, o) for x in operands)), empty=empty)

    def number(self, size: sympy.Expr) -> Any:
        """A size as an operand: a Python number, or a ref holding the symbolic size."""
        return int(size) if size.is_Integer else Ref(Coord(self.b.size_index(size)), (), "i64")


def broadcast(x: Any, shape: Sequence[sympy.Expr], index: Sequence[IndexExpr]) -> Expr:
    """``x`` (a ref or a number) read at ``index`` of a result of ``shape``, numpy broadcasting."""
    if not isinstance(x, Ref):
        return Const(float(x))
    offset = len(shape) - len(x.shape)
    idx = [IConst(0) if (s == 1 and shape[offset + d] != 1) else index[offset + d] for d, s in enumerate(x.shape)]
    return x.at(idx)


def norm_dim(d: int, ndim: int) -> int:
    """A dimension index made non-negative."""
    return d + ndim if d < 0 else d
