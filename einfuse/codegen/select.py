"""The ``select`` kernel: the coordinates of each fiber's ``k`` largest values, in order
(:mod:`einfuse.ir.select`: ``torch.topk(x, k).indices`` captured by rank), as TIR.

One PrimFunc, ``(X, OUT)``, parallel over the fibers. Each fiber is read once, in order, into a
heap of its ``k`` best (value, coordinate) pairs whose root is the worst of them: an element
enters if the heap is not full or it beats the root (a better value, or an equal one at a lower
coordinate: the rank count's order), ``log k`` moves each. Then the heap is emptied worst first
into ``OUT[.., k-1]`` down to ``OUT[.., 0]``: ``OUT[.., j]`` is the coordinate ranked ``j``, 0 past
the fiber's length (as the count's ``idx(p) * (RANK == j)`` sums nothing there). Where the values
hold NaN the choice is unspecified, as it is for the rank count.
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
from .loop_frames import unravel
from .lower import SizeVars


def kernel_selection(c: Cascade, k: Kernel) -> Selection:
    """The selection kernel ``k`` (of kind ``select``) computes."""
    rank = [e for e, _ in c.einsums() if e.lhs.tensor in k.internal]
    found = selection(rank[0], k.writes[0]) if len(rank) == 1 and len(k.writes) == 1 else None
    if found is None:
        raise CompileError(f"kernel {k.name}: not a selection (a rank count and the coordinates it orders)")
    return found


def select_function(c: Cascade, k: Kernel, sizes: SizeVars) -> tirx.PrimFunc:
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
            at = unravel(r, outer)
            heap = _Heap(best, x.dtype, s.largest)
            with T.serial(0, length) as p:
                v = T.bind(x[_place(at, s.axis, p)])
                with T.If(heap.count[0] < best):
                    with T.Then():
                        heap.push(v, tirx.Cast("int64", p))
                    with T.Else():
                        with T.If(heap.beats(v, tirx.Cast("int64", p), heap.values[0], heap.coords[0])):
                            with T.Then():
                                heap.store(0, v, tirx.Cast("int64", p))
                                heap.sift_down(heap.count[0])
            with T.serial(0, best) as back:   # (the worst kept first: from the last place to the first)
                j = best - 1 - back
                with T.If(j < heap.count[0]):
                    with T.Then():
                        T.buffer_store(out, heap.coords[0], _place(at, s.axis, j))
                        heap.store(0, heap.values[j], heap.coords[j])
                        heap.sift_down(j)
                    with T.Else():
                        T.buffer_store(out, tirx.const(0, "int64"), _place(at, s.axis, j))
    return ib.get()


class _Heap:
    """The ``k`` best (value, coordinate) pairs seen of a fiber, as a heap whose root is the worst
    of them: an element enters a full heap by beating the root (``log k`` moves, not ``k``)."""

    def __init__(self, size: int, dtype: str, largest: bool) -> None:
        self.size, self.largest = size, largest
        self.depth = max(1, size.bit_length())
        self.values = T.decl_buffer((size,), dtype, scope="global")
        self.coords = T.decl_buffer((size,), "int64", scope="global")
        self.count = T.decl_buffer((1,), "int32", scope="global")
        self.at = T.decl_buffer((1,), "int32", scope="global")       # (the place being sifted)
        self.moving = T.decl_buffer((1,), "int32", scope="global")
        T.buffer_store(self.count, tirx.const(0, "int32"), [0])

    def beats(self, a: Any, ac: Any, b: Any, bc: Any) -> Any:
        """``(a, ac)`` comes before ``(b, bc)``: a better value, or an equal one at a lower coordinate."""
        better = a > b if self.largest else a < b
        return tirx.Or(better, tirx.And(a == b, ac < bc))

    def below(self, i: Any, j: Any) -> Any:
        """Entry ``i`` comes before entry ``j`` (so belongs below it in the heap)."""
        return self.beats(self.values[i], self.coords[i], self.values[j], self.coords[j])

    def store(self, i: Any, v: Any, c: Any) -> None:
        T.buffer_store(self.values, v, [i])
        T.buffer_store(self.coords, c, [i])

    def swap(self, i: Any, j: Any) -> None:
        v, c = T.bind(self.values[i]), T.bind(self.coords[i])
        self.store(i, self.values[j], self.coords[j])
        self.store(j, v, c)

    def push(self, v: Any, c: Any) -> None:
        """Add ``(v, c)`` to a heap that is not full, sifting it up past each parent it is worse than."""
        self.store(self.count[0], v, c)
        self._start(self.count[0])
        with T.serial(0, self.depth):
            i = self.at[0]
            parent = tirx.max(tirx.floordiv(i - 1, 2), 0)
            with T.If(tirx.And(self.moving[0] == 1, tirx.And(i > 0, self.below(parent, i)))):
                with T.Then():
                    self.swap(i, parent)
                    T.buffer_store(self.at, parent, [0])
                with T.Else():
                    T.buffer_store(self.moving, tirx.const(0, "int32"), [0])
        T.buffer_store(self.count, self.count[0] + 1, [0])

    def sift_down(self, n: Any) -> None:
        """Restore the heap of its first ``n`` entries after its root was replaced."""
        self._start(tirx.const(0, "int32"))
        with T.serial(0, self.depth):
            i = self.at[0]
            left = i * 2 + 1
            worst = T.bind(tirx.Select(tirx.And(left + 1 < n, self.below(_inside(left, n), _inside(left + 1, n))),
                                       left + 1, left))
            with T.If(tirx.And(self.moving[0] == 1, tirx.And(left < n, self.below(i, _inside(worst, n))))):
                with T.Then():
                    self.swap(i, worst)
                    T.buffer_store(self.at, worst, [0])
                with T.Else():
                    T.buffer_store(self.moving, tirx.const(0, "int32"), [0])

    def _start(self, i: Any) -> None:
        T.buffer_store(self.at, i, [0])
        T.buffer_store(self.moving, tirx.const(1, "int32"), [0])


def _inside(i: Any, n: Any) -> Any:
    """``i`` clamped to the places of a heap of ``n`` (reads a condition guards are still made)."""
    return tirx.max(tirx.min(i, n - 1), 0)


def _place(at: list[Any], axis: int, value: Any) -> list[Any]:
    """The fiber's coordinates ``at`` with ``value`` along ``axis``."""
    return [*at[:axis], value, *at[axis:]]
