"""A loop kernel (the 1-pass attention) for a GPU: one thread block per block of rows, one thread
per row, K and V tiles through shared memory.

The CPU builder (:mod:`.loop`) emits a block of 64 rows at a time with vectors and register
tiles. Here each of the block's 64 threads runs the loop's body for its own row: its running
state (max, denominator, numerator x V) and its row of a tile's scores live in its registers or
local memory. The inputs the body reads per tile and not per row (K and V: read with the tile's
variable, without the row's) are staged: at the start of each tile the block's threads copy the
tile of each into shared memory together (thread ``r`` copies elements ``r``, ``r + 64``, ...,
guarded like the global read), between two ``__syncthreads()``, before any row decides to skip
the tile; every row then reads them from shared memory (64 rows reading one copy instead of 64
reads of global memory each). The body's Einsums are emitted as the CPU builder emits them with a
block of one row and no vector lanes: scalar loops per thread, the same filters, the same tile
skipping (``live``, ``full``).

Before (per thread, tile ``t``): ``S[i] = sum_e Q[e,row] * K[e, t*T+i]`` (K from global memory)
After: ``sync; Ks[e,i] = K[e, t*T+i] (the block's threads share the copy); sync;
S[i] = sum_e Q[e,row] * Ks[e,i]``.

Not yet: tensor cores.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from ..ir import Access
from ..ir.dtypes import DTYPES
from ..ir.scope import access_vars, reads
from .loop import LoopBuilder
from .loop_frames import Entered, LoopFrame
from .op_lowering import cast


class GPULoopBuilder(LoopBuilder):
    """Builds a ``loop`` kernel as a PrimFunc bound to CUDA blocks and threads."""

    vectorized = staticmethod(T.serial)
    shared_bytes = 48 * 1024     # the tiles staged at most (CUDA's static shared memory per block)
    block_rows = 64              # threads per block, one per query row

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
        self.row_count, self.thread, self.threads = 1, thread, rows
        return Entered(stack, (block, thread))

    # ---- K and V tiles through shared memory -------------------------------------------------------

    def streamed(self) -> dict[tuple, tuple[Access, list[str]]]:
        """The accesses to stage: inputs read in the body with the tile's variable and without the
        row's, each with its variables other than the tile's and the rows' (the tile's shape)."""
        out: dict[tuple, tuple[Access, list[str]]] = {}
        for e in self.body:
            for a in reads(e):
                names = access_vars(a)
                local = [v for v in dict.fromkeys(names) if v not in self.rows and v != self.loop.var]
                if (a.tensor in self.k.inputs and self.loop.var in names and self.block not in names
                        and all(isinstance(self.var_extent(v), int) for v in local)):
                    out[(a.tensor, a.indices)] = (a, local)
        return out

    def emit_block(self, env: dict[str, Any], start: Any) -> None:
        """Shared buffers for the staged tiles (while they fit), then the block as on a CPU."""
        self.staged: dict[tuple, tuple[Any, Access, list[str]]] = {}
        used = 0
        for key, (a, local) in self.streamed().items():
            shape = [self.var_extent(v) for v in local]
            dtype = self.decls[a.tensor].dtype
            size = math.prod(shape) * (4 if dtype == "f32" else 2)
            if used + size > self.shared_bytes or dtype not in ("f32", "f16", "bf16"):
                continue
            used += size
            buf = T.decl_buffer(shape, DTYPES[self.decls[a.tensor].dtype].tvm, scope="shared")
            self.staged[key] = (buf, a, local)
        super().emit_block(env, start)

    def stage(self, env: dict[str, Any]) -> None:
        """The block's threads copy this tile of each staged input to shared memory together."""
        if not self.staged:
            return
        self.barrier()
        for buf, a, local in self.staged.values():
            shape = [int(n) for n in buf.shape]
            size = math.prod(shape)
            with LoopFrame(T.serial, -(-size // self.threads)) as i:
                flat = i * self.threads + self.thread
                with T.If(flat < size):
                    with T.Then():
                        coords, rest = [], flat
                        for n in reversed(shape):
                            coords.append(tirx.floormod(rest, n))
                            rest = tirx.floordiv(rest, n)
                        coords.reverse()
                        at = {**env, **dict(zip(local, coords))}
                        value, _ = super().read(a, at, DTYPES[self.decls[a.tensor].dtype].tvm)
                        T.buffer_store(buf, value, coords)
        self.barrier()

    def barrier(self) -> None:
        """``__syncthreads()``."""
        T.evaluate(tirx.call_intrin("int32", "tirx.tvm_storage_sync", "shared"))

    def read(self, a: Access, env: dict[str, Any], work: str) -> tuple[Any, Any]:
        """A staged input from its shared tile (its validity as the global read's); else as on a CPU."""
        staged = getattr(self, "staged", {}).get((a.tensor, a.indices))
        if staged is None:
            return super().read(a, env, work)
        buf, _, local = staged
        _, valid = super().read(a, env, work)   # (its guard only: the tile holds the fill where it fails)
        return cast(tirx.BufferLoad(buf, [env[v] for v in local]), work), valid


class _bound(LoopFrame):
    """A loop bound to a CUDA thread axis, entered as int64 like :class:`~.loop_frames.LoopFrame`."""

    def __init__(self, extent: Any, axis: str) -> None:
        extent = tirx.const(extent, "int64") if isinstance(extent, int) else extent
        if isinstance(extent, tirx.IntImm):
            extent = tirx.const(int(extent.value), "int32")
        self.frame = T.thread_binding(0, tirx.Cast("int32", extent) if str(extent.ty) != "int32" else extent,
                                      thread=axis)
