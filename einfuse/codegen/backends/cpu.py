"""The CPU backend (LLVM): loop kernels built as TIR, the rest lowered through TE and scheduled
by the rules of :mod:`..schedules.cpu` (or a tuning record); cached; weights packed into panels."""
from __future__ import annotations

from typing import Any

from ...ir import Cascade
from ...ir.kernels import Kernel
from ...targets import cost, host_peaks
from ..decode import decode_function
from ..grouped import grouped_function
from ..int8_dot import int8_function
from ..loop import LoopBuilder
from ..lower import SizeVars
from ..schedules.cpu import rule_schedule, schedule
from ..select import select_function
from .base import TEBackend, register_backend


@register_backend
class CPUBackend(TEBackend):
    """``cpu`` (the host, or a named ISA): LLVM."""

    kind = "cpu"
    pipeline = ("transpose-weights,pack-weights,materialize-operands{decode=true},"
                "group-kernels{grouped=true,select=true,decode=true}")
    cached = True

    def loop_function(self, c: Cascade, k: Kernel, sizes: SizeVars) -> Any:
        if k.kind == "int8-dot":
            return int8_function(c, k, sizes, self.target)
        if k.kind == "grouped":
            return grouped_function(c, k, sizes, self.target)
        if k.kind == "select":
            return select_function(c, k, sizes)
        if k.kind == "decode":
            return decode_function(c, k, sizes)
        return LoopBuilder(c, k, sizes, self.target).prim_func()

    def schedule(self, func: Any, k: Kernel) -> Any:
        return schedule(func, k, self.target)

    def rule_schedule(self, func: Any, k: Kernel) -> Any:
        return rule_schedule(func, k, self.target)

    def emit(self, c: Cascade, k: Kernel, sizes: SizeVars, index: int) -> tuple[dict[str, str], dict, str]:
        """The kernel's scheduled TIR and the host's assembly of it."""
        func = self.kernel_function(c, k, sizes)
        executable = self.compiled_alone(func, k.name)
        return {f"{k.name}.tir": func.script(), f"{k.name}.s": executable.mod.inspect_source("asm")}, {}, func.script()

    def machine(self) -> Any:
        """The cost model's machine on the host's measured peaks."""
        return cost.measured(self.target, host_peaks())
