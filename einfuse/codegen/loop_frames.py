"""TIR loop frames for the loop builders (:mod:`.loop`, :mod:`.loop_gpu`, the accelerator's):
a loop whose variable is int64, nests of them entered as one context, and the serial launch
of blocks of rows used where rows are not threads."""
from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from tvm import tirx
from tvm.script.ir_builder import tirx as T

if TYPE_CHECKING:
    from .loop import LoopBuilder


class LoopFrame:
    """A loop frame of ``kind`` over ``[0, extent)``; entering gives its variable as int64 (TIR's
    loop variables are int32, the kernel's index arithmetic is int64)."""

    def __init__(self, kind: Any, extent: Any) -> None:
        extent = tirx.const(extent, "int64") if isinstance(extent, int) else extent
        if isinstance(extent, tirx.IntImm):
            extent = tirx.const(int(extent.value), "int32")
        self.frame = kind(0, tirx.Cast("int32", extent) if str(extent.ty) != "int32" else extent)

    def __enter__(self) -> Any:
        return tirx.Cast("int64", self.frame.__enter__())

    def __exit__(self, *exc: object) -> None:
        self.frame.__exit__(*exc)


class Entered:
    """A context that has entered its frames already and gives ``value``."""

    def __init__(self, stack: ExitStack, value: Any) -> None:
        self.stack, self.value = stack, value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        self.stack.__exit__(*exc)


def serial_launch(blocks: Any, rows: int) -> Entered:
    """A context over the blocks of rows and a block's rows as two serial loops, giving (the
    block, the row): one row at a time, for code that runs where the rows are not threads."""
    stack = ExitStack()
    stack.enter_context(T.sblock("root"))
    block, row = stack.enter_context(LoopFrame(T.serial, blocks)), stack.enter_context(LoopFrame(T.serial, rows))
    return Entered(stack, (block, row))


class Nest:
    """Loops over a block's rows and some variables, entered as one context (see ``LoopBuilder.nest``)."""

    def __init__(self, b: LoopBuilder, env: dict[str, Any], order: list[str], vector: list[str]) -> None:
        self.b, self.env, self.order, self.vector = b, env, order, vector
        self.stack = ExitStack()

    def __enter__(self) -> dict[str, Any]:
        b, env, enter = self.b, dict(self.env), self.stack.enter_context
        env["@row"] = enter(LoopFrame(b.vectorized if self.vector == [b.block] else T.serial, b.row_count))
        for v in self.order:
            extent = b.var_extent(v)
            kind = b.vectorized if v in self.vector and isinstance(extent, int) else T.serial
            env[v] = enter(LoopFrame(kind, b.sizes.expr(extent)))
        env[b.block] = b.row_at(env["@row"])
        return env

    def __exit__(self, *exc: object) -> None:
        self.stack.__exit__(*exc)


def unravel(i: Any, dims: list[Any]) -> list[Any]:
    """The coordinates over ``dims`` (the last fastest) of the ``i``-th point, ``i`` below their
    product: the first takes what is left (no remainder, so a vector loop over one dimension stays
    a vector of consecutive values) and a dimension of one is 0."""
    at = []
    for k in range(len(dims) - 1, -1, -1):
        d = dims[k]
        at.append(tirx.const(0, "int64") if isinstance(d, int) and d == 1 else i if k == 0 else tirx.floormod(i, d))
        i = tirx.floordiv(i, d)
    return at[::-1]
