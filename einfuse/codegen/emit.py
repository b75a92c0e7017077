"""``einfuse kernels``: each kernel's source for a target, written to a directory with a manifest.

No device is needed: for ``cuda:*`` every kernel is lowered as for the CPU (TE), scheduled by
TVM's dlight GPU rules (GEMM, GEMV, reduction, general reduction, fallback) and compiled to CUDA
C source, one ``.cu`` per kernel; a loop kernel (the 1-pass attention) is built by
:class:`~.loop_gpu.GPULoopBuilder` (a thread block per block of 64 rows, a thread per row). For
``cpu``: each kernel's scheduled TIR and assembly. The manifest (``manifest.json``) lists per
kernel its name, kind, files, the Einsums it computes, its launch grid (CUDA) and its roofline
estimate on the target's datasheet numbers.

Not yet: ``accel:*`` has no lowering; asking for it fails saying so.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy

from ..errors import CompileError, EinfuseError
from ..ir import Cascade
from ..ir.analysis import einsum_cost, tensors_bytes
from ..ir.text import access_text
from ..passes.group_kernels import Kernel
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
    if target.kind == "accel":
        raise EinfuseError(f"no lowering for {target.name} yet (issue 6: tensorized C and its cycle model)")
    sizes = SizeVars()
    out = []
    for k in c.groups:
        files, grid = _emit(c, k, sizes, target)
        out.append(Emitted(k, files, grid, sum(einsum_cost(c, e).flops for e in k.einsums(c)),
                           tensors_bytes(c, k.inputs + (k.output,))))
    return out


def _emit(c: Cascade, k: Kernel, sizes: SizeVars, target: Target) -> tuple[dict[str, str], dict]:
    """One kernel compiled alone for ``target``: its files and (CUDA) launch grid."""
    import tvm

    from .build import kernel_function
    try:
        func = kernel_function(c, k, sizes, target)
        executable = tvm.compile(tvm.IRModule({k.name: func}), target=target.tvm_target())
    except Exception as exc:   # TVM's own error types
        raise kernel_error(exc, c, k, target) from exc
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
    return path


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
