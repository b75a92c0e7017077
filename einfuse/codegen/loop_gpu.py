"""A loop kernel (the 1-pass attention) for a GPU: one thread block per block of rows, one thread
per row.

The CPU builder (:mod:`.loop`) emits a block of 64 rows at a time with vectors and register
tiles. Here each of the block's 64 threads runs the loop's body for its own row: its running
state (max, denominator, numerator x V) and its row of a tile's scores live in its registers or
local memory, and it streams K and V tiles from global memory through the caches (no shared
memory, so no barriers: threads never read each other's values). The body's Einsums are emitted
as the CPU builder emits them with a block of one row and no vector lanes: scalar loops per
thread, the same filters, the same tile skipping (``live``, ``full``).

Not yet: K and V tiles staged through shared memory, tensor cores.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .loop import LoopBuilder, _Entered, _loop


class GPULoopBuilder(LoopBuilder):
    """Builds a ``loop`` kernel as a PrimFunc bound to CUDA blocks and threads."""

    vectorized = staticmethod(T.serial)

    @property
    def lanes(self) -> int:
        return 1

    def launch(self, blocks: Any, rows: int) -> Any:
        """``blockIdx.x`` over the blocks of rows, ``threadIdx.x`` over a block's rows: each thread
        emits one row (the builder's block of rows is then one row)."""
        stack = ExitStack()
        stack.enter_context(T.sblock("root"))
        block = stack.enter_context(_bound(blocks, "blockIdx.x"))
        thread = stack.enter_context(_bound(rows, "threadIdx.x"))
        self.row_count = 1
        return _Entered(stack, (block, thread))


class _bound(_loop):
    """A loop bound to a CUDA thread axis, entered as int64 like :class:`~.loop._loop`."""

    def __init__(self, extent: Any, axis: str) -> None:
        extent = tirx.const(extent, "int64") if isinstance(extent, int) else extent
        if isinstance(extent, tirx.IntImm):
            extent = tirx.const(int(extent.value), "int32")
        self.frame = T.thread_binding(0, tirx.Cast("int32", extent) if str(extent.ty) != "int32" else extent,
                                      thread=axis)
