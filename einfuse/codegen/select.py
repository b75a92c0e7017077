"""The ``select`` kernel: the coordinates of each fiber's ``k`` largest values, in order
(:mod:`einfuse.ir.select`: ``torch.topk(x, k).indices`` captured by rank), as TIR.

One PrimFunc, ``(X, OUT)``, parallel over the fibers. Each fiber is read once, in order, into a
buffer of its ``k`` best (value, coordinate) pairs, kept sorted best first: an element enters
only if the buffer is not full or it beats the buffer's last, and then goes after every entry
that beats or equals it (those come earlier along the fiber, so a tie keeps the lower
coordinate first, as the rank count does). ``OUT[.., j]`` is the coordinate in place ``j``, 0
past the fiber's length (as the count's ``idx(p) * (RANK == j)`` sums nothing there). Where the
values hold NaN the choice is unspecified, as it is for the rank count.
"""
from __future__ import annotations

import math
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..errors import CompileError
from ..ir import Cascade
from ..ir.kernels import Kernel
from ..ir.select import Selection, selection
from ..targets import Target
from .lower import SizeVars


def kernel_selection(c: Cascade, k: Kernel) -> Selection:
    """The selection kernel ``k`` (of kind ``select``) computes."""
    rank = [e for e, _ in c.einsums() if e.lhs.tensor in k.internal]
    found = selection(rank[0], k.writes[0]) if len(rank) == 1 and len(k.writes) == 1 else None
    if found is None:
        raise CompileError(f"kernel {k.name}: not a selection (a rank count and the coordinates it orders)")
    return found


def select_function(c: Cascade, k: Kernel, sizes: SizeVars, target: Target) -> tirx.PrimFunc:
    """Kernel ``k`` (of kind ``select``) as a PrimFunc."""
    s = kernel_selection(c, k)
    shape = sizes.shapes(c, k)
    length, best = shape[s.x][s.axis], shape[k.output][s.axis]
    if not isinstance(best, int):
        raise CompileError(f"kernel {k.name}: selects a symbolic number ({best}) of coordinates")
    outer = [d for i, d in enumerate(shape[s.x]) if i != s.axis]
    with IRBuilder() as ib, T.prim_func():
        args = sizes.arguments(c, k, shape)
        x, out = args[s.x], args[k.output]
        with T.sblock("root"), T.parallel(0, math.prod(outer) if outer else 1) as r:
            at = _unravel(r, outer)
            values = T.decl_buffer((best,), x.dtype, scope="global")
            coords = T.decl_buffer((best,), "int64", scope="global")
            count = T.decl_buffer((1,), "int32", scope="global")
            T.buffer_store(count, tirx.const(0, "int32"), [0])
            with T.serial(0, length) as p:
                v = T.bind(x[_place(at, s.axis, p)])
                enters = tirx.Or(count[0] < best, _beats(v, values[best - 1], s.largest))
                with T.If(enters):
                    with T.Then():
                        _insert(v, p, values, coords, count, best, s.largest)
            with T.serial(0, best) as j:
                T.buffer_store(out, tirx.Select(j < count[0], coords[j], tirx.const(0, "int64")), _place(at, s.axis, j))
    return ib.get()


def _insert(v: Any, p: Any, values: Any, coords: Any, count: Any, best: int, largest: bool) -> None:
    """Put ``(v, p)`` after the buffer's entries that it does not beat; the last one falls out
    of a full buffer."""
    place = T.decl_buffer((1,), "int32", scope="global")
    T.buffer_store(place, tirx.const(0, "int32"), [0])
    with T.serial(0, best) as i:
        with T.If(tirx.And(i < count[0], tirx.Not(_beats(v, values[i], largest)))):
            with T.Then():
                T.buffer_store(place, place[0] + 1, [0])
    with T.serial(0, best - 1) as back:   # (from the end: each entry moves one place down)
        i = best - 1 - back
        with T.If(tirx.And(i > place[0], i <= count[0])):
            with T.Then():
                T.buffer_store(values, values[i - 1], [i])
                T.buffer_store(coords, coords[i - 1], [i])
    T.buffer_store(values, v, [place[0]])
    T.buffer_store(coords, tirx.Cast("int64", p), [place[0]])
    T.buffer_store(count, tirx.min(count[0] + 1, best), [0])


def _beats(a: Any, b: Any, largest: bool) -> Any:
    """``a`` comes before ``b`` (strictly: a tie keeps the earlier coordinate first)."""
    return a > b if largest else a < b


def _unravel(r: Any, dims: list[Any]) -> list[Any]:
    """The coordinates of the ``r``-th fiber over ``dims`` (the last fastest)."""
    at = []
    for d in reversed(dims):
        at.append(tirx.floormod(r, d))
        r = tirx.floordiv(r, d)
    return at[::-1]


def _place(at: list[Any], axis: int, value: Any) -> list[Any]:
    """The fiber's coordinates ``at`` with ``value`` along ``axis``."""
    return [*at[:axis], value, *at[axis:]]
