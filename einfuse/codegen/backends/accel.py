"""The accelerator backend (``accel:fusemax``): each kernel as C whose tiles call the arrays'
intrinsics (:mod:`..accel`), for ``einfuse kernels`` and :func:`einfuse.simulate`; it builds no
model to run here (the accelerator is simulated, not a device)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import sympy

from ...errors import EinfuseError
from ...ir import Cascade
from ...ir.kernels import Kernel
from ...targets.accel import Timing, kernel_work, timing
from .. import accel
from ..lower import SizeVars
from .base import Backend, register_backend


@register_backend
class AccelBackend(Backend):
    """``accel:<name>``: C for TVM's ``c`` target plus the FuseMax runtime."""

    kind = "accel"
    #: (an accelerator's phases go through DRAM: a softmax does not join the P V reading it)
    pipeline = "transpose-weights,materialize-operands,group-kernels{attention=false}"

    def kernel_function(self, c: Cascade, k: Kernel, sizes: SizeVars, tuning: Any = None) -> Any:
        """The kernel with its tiles on the arrays' intrinsics (:func:`..accel.kernel_function`)."""
        return self._function(c, k, sizes, list(c.groups).index(k))

    def _function(self, c: Cascade, k: Kernel, sizes: SizeVars, index: int) -> Any:
        """Kernel ``k``, the ``index``-th (which the runtime counts its cycles under)."""
        return accel.kernel_function(c, k, sizes, self.target, index).func.with_attr("global_symbol", k.name)

    def check_runs(self) -> None:
        raise EinfuseError(f"compile: {self.target.name} is not a device to run on; einfuse.kernels emits its C "
                           "and einfuse.simulate runs it here counting its cycles (docs/accelerator.md)")

    def emit(self, c: Cascade, k: Kernel, sizes: SizeVars, index: int) -> tuple[dict[str, str], dict, str]:
        """The kernel's C."""
        func = self._function(c, k, sizes, index)
        executable = self.compiled_alone(func, k.name)
        return {f"{k.name}.c": executable.mod.inspect_source()}, {}, func.script()

    def check_simulates(self) -> None:
        pass

    def simulate(self, c: Cascade, values: dict[str, np.ndarray]) -> Any:
        """Run the kernels' C here on ``values``, counting cycles (:func:`..accel.simulate`)."""
        return accel.simulate(c, self.target, values)

    def write_extras(self, c: Cascade, directory: Path, at: dict) -> None:
        """The runtime the kernels call and ``report.md``, their modelled timing (with the whole
        model's where every size is bound)."""
        building = accel.write_runtime(directory, [k.name for k in c.groups])
        acc = self.target.device
        lines = [f"# {len(c.groups)} kernels for {self.target.name}", "",
                 "| kernel | 2D-array ops | 1D-array ops | DRAM bytes | cycles | 2D util | 1D util |", "|---" * 7 + "|"]
        total: Timing | None = Timing(0.0, 0.0, 0.0, 0.0)
        for k in c.groups:
            work = kernel_work(c, k, acc)
            bound = all({x.name for x in sympy.sympify(part).free_symbols} <= set(at) for part in work.__dict__.values())
            row = timing(work, acc, at) if bound else None
            total = total + row if total is not None and row is not None else None
            lines.append(f"| {k.name} | {work.ops_2d} | {work.ops_1d} | {work.dram_bytes} | {_cycles(row)} |")
        if total is not None:
            lines += ["", f"Whole model: {total.latency:.0f} cycles = {total.latency / acc.mhz / 1e3:.4g} ms at "
                          f"{acc.mhz:g} MHz; 2D array busy {total.utilisation()[0]:.2f}, 1D array "
                          f"{total.utilisation()[1]:.2f} of that time."]
        (directory / "report.md").write_text("\n".join(lines + ["", building]) + "\n")


def _cycles(row: Any) -> str:
    return f"{row.latency:.0f} | {row.utilisation()[0]:.2f} | {row.utilisation()[1]:.2f}" if row else "- | - | -"
