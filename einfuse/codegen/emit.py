"""``einfuse kernels``: each kernel's source for a target, written to a directory with a manifest.

No device is needed: for ``cuda:*`` every kernel is lowered as for the CPU (TE), scheduled by
TVM's dlight GPU rules (GEMM, GEMV, reduction, general reduction, fallback) and compiled to CUDA
C source, one ``.cu`` per kernel; a loop kernel (the 1-pass attention) is built by
:class:`~.loop_gpu.GPULoopBuilder` (a thread block per block of 64 rows, a thread per row, K and V
tiles through shared memory). For
``cpu``: each kernel's scheduled TIR and assembly. The manifest (``manifest.json``) lists per
kernel its name, kind, files, the Einsums it computes, its launch grid (CUDA) and its roofline
estimate on the target's datasheet numbers.

For ``accel:*``: each kernel's C (TVM's ``c`` target, GEMM tiles as ``fm_mac2d`` calls; see
:mod:`.accel`), the runtime (``fusemax.h``, ``fusemax_rt.c``) and ``report.md``: per kernel its
ops on each array, DRAM bytes and modelled cycles (:mod:`einfuse.targets.accel`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy

from ..errors import CompileError
from ..ir import Cascade
from ..ir.analysis import einsum_cost, tensors_bytes
from ..ir.text import access_text
from ..ir.kernels import Kernel
from ..targets import Target
from .build import kernel_error
from .lower import SizeVars


@dataclass(frozen=True)
class Emitted:
    """One kernel's source and what the manifest says of it."""

    kernel: Kernel
    files: dict[str, str]           # file name -> text
    grid: dict[str, int | str]      # launch extents (CUDA): blockIdx.x, threadIdx.x, ...
    flops: Any
    moved: Any


def emit_kernels(c: Cascade, target: Target) -> list[Emitted]:
    """The source of every kernel of ``c`` (grouped, laid out) for ``target``."""
    sizes = SizeVars()
    out = []
    for i, k in enumerate(c.groups):
        files, grid = _emit(c, k, sizes, target, i)
        out.append(Emitted(k, files, grid, sum(einsum_cost(c, e).flops for e in k.einsums(c)),
                           tensors_bytes(c, k.inputs + (k.output,))))
    return out


def _emit(c: Cascade, k: Kernel, sizes: SizeVars, target: Target, index: int) -> tuple[dict[str, str], dict]:
    """One kernel compiled alone for ``target`` (the ``index``-th): its files and (CUDA) launch grid."""
    import tvm

    from . import accel
    from .build import kernel_function
    try:
        if target.kind == "accel":
            func = accel.kernel_function(c, k, sizes, target, index).func.with_attr("global_symbol", k.name)
        else:
            func = kernel_function(c, k, sizes, target)
        executable = tvm.compile(tvm.IRModule({k.name: func}), target=target.tvm_target())
    except Exception as exc:   # TVM's own error types
        raise kernel_error(exc, c, k, target) from exc
    if target.kind == "accel":
        return {f"{k.name}.c": executable.mod.inspect_source()}, {}
    if target.kind == "cuda":
        return {f"{k.name}.cu": device_source(executable.mod)}, _launch(func)
    return {f"{k.name}.tir": func.script(), f"{k.name}.s": executable.mod.inspect_source("asm")}, {}


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


def write_kernels(c: Cascade, target: Target, directory: Path, at: dict | None = None) -> Path:
    """Emit every kernel of ``c`` into ``directory`` with ``manifest.json``; ``at`` binds the
    size symbols for the roofline estimate."""
    emitted = emit_kernels(c, target)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = []
    for item in emitted:
        for name, text in item.files.items():
            (directory / name).write_text(text)
        manifest.append({
            "kernel": item.kernel.name, "kind": item.kernel.kind or "single", "files": sorted(item.files),
            "einsums": [access_text(e.lhs) for e in item.kernel.einsums(c)], "launch": item.grid,
            "flops": str(item.flops), "bytes": str(item.moved), "roofline_ms": _roofline_ms(item, target, at or {})})
    path = directory / "manifest.json"
    path.write_text(json.dumps({"target": target.name, "kernels": manifest}, indent=1))
    if target.kind == "accel":
        _accel_files(c, target, directory, at or {})
    return path


def _accel_files(c: Cascade, target: Target, directory: Path, at: dict) -> None:
    """The runtime the accelerator's kernels call and ``report.md``, their modelled timing (with
    the whole model's where every size is bound)."""
    from ..targets.accel import Timing, kernel_work, timing
    from .accel import write_runtime
    building = write_runtime(directory, [k.name for k in c.groups])
    acc = target.device
    lines = [f"# {len(c.groups)} kernels for {target.name}", "",
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


def _roofline_ms(item: Emitted, target: Target, at: dict) -> float | None:
    """max(FLOPs / peak, bytes / bandwidth) on the target's datasheet float32 numbers, or None
    where the target has none (the host CPU: see ``CompiledModel.report``) or a size is unbound."""
    device = target.device
    peak = getattr(device, "peak_ops", {}).get("f32") if device is not None else None
    bandwidth = getattr(device, "bandwidth", None)
    flops, moved = sympy.sympify(item.flops).subs(at), sympy.sympify(item.moved).subs(at)
    if peak is None or bandwidth is None or flops.free_symbols or moved.free_symbols:
        return None
    return round(max(float(flops) / peak, float(moved) / bandwidth) * 1e3, 6)
