"""The CUDA backend: the 1-pass attention built bound to threads (:mod:`..loop_gpu`), the rest
lowered through TE and scheduled by TVM's dlight rules (:mod:`..schedules.gpu`); not cached (the
library holds CUDA that loads only where a GPU is); no device is needed to emit it."""
from __future__ import annotations

import re
from typing import Any

from ...errors import CompileError
from ...ir import Cascade
from ...ir.kernels import Kernel
from ..loop_gpu import GPULoopBuilder
from ..lower import KernelBuilder, SizeVars
from ..schedules.gpu import schedule
from .base import TEBackend, register_backend


@register_backend
class CUDABackend(TEBackend):
    """``cuda:<gpu>``: CUDA C through TVM, one ``.cu`` per kernel."""

    kind = "cuda"
    pipeline = "transpose-weights,materialize-operands,group-kernels"
    torch_device = "cuda"
    harness = True

    def loop_function(self, c: Cascade, k: Kernel, sizes: SizeVars) -> Any:
        """The loop kernel with a thread per row."""
        return GPULoopBuilder(c, k, sizes, self.target).prim_func()

    def lower(self, c: Cascade, k: Kernel, sizes: SizeVars) -> Any:
        """Through TE with plain max/min reducers (dlight refuses others)."""
        return KernelBuilder(c, k, sizes, nan_reductions=False).prim_func()

    def schedule(self, func: Any, k: Kernel) -> Any:
        """By dlight's rules, a quantized weight's dequantization inlined into its loads first."""
        return schedule(_dequantized_inline(func), k.name, self.target)

    def emit(self, c: Cascade, k: Kernel, sizes: SizeVars, index: int) -> tuple[dict[str, str], dict, str]:
        """The kernel's CUDA C and its launch grid."""
        func = self.kernel_function(c, k, sizes)
        executable = self.compiled_alone(func, k.name)
        return {f"{k.name}.cu": device_source(executable.mod)}, _launch(func), func.script()

    def device(self) -> Any:
        import tvm
        return tvm.cuda(0)


def _dequantized_inline(func: Any) -> Any:
    """``func`` with the element-wise stages before its first reduction (a dequantization)
    inlined into their reader: dlight's rules schedule one contraction."""
    from tvm import s_tir, tirx
    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
        if any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars):
            break
        sch.compute_inline(block)
    return sch.mod["main"]


def device_source(mod: Any) -> str:
    """The CUDA source in a compiled module's tree (host llvm -> cuda)."""
    stack = [mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            return m.inspect_source()
        stack.extend(m.imports)
    raise CompileError("TVM produced no CUDA module")


def _launch(func: Any) -> dict[str, int | str]:
    """The thread-binding extents of a scheduled PrimFunc (``blockIdx.x``: 128, ...), read from its
    script (this TVM has no TIR visitor in Python)."""
    grid: dict[str, int | str] = {}
    for extent, tag in re.findall(r"T\.thread_binding\((.+?), thread=\"(\w+\.\w)\"\)", func.script()):
        number = re.fullmatch(r"(?:T\.int64\()?(\d+)\)?", extent.strip())
        grid[tag] = int(number.group(1)) if number else extent.strip()
    return grid
