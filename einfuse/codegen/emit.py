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
ops on each array, DRAM bytes and modelled cycles (:mod:`einfuse.targets.accel`). What each
target writes is its backend's (:mod:`.backends`): ``emit`` and ``write_extras``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import sympy

from ..errors import EinfuseError
from ..ir import Cascade
from ..ir.analysis import einsum_cost, tensors_bytes
from ..ir.text import access_text
from ..ir.kernels import Kernel
from ..targets import Target
from .backends import backend_for
from .build import kernel_error
from .lower import SizeVars


@dataclass(frozen=True)
class Emitted:
    """One kernel's source and what the manifest says of it."""

    kernel: Kernel
    files: dict[str, str]           # file name -> text
    grid: dict[str, int | str]      # launch extents (CUDA): blockIdx.x, threadIdx.x, ...
    script: str                     # the scheduled TIR
    flops: Any
    moved: Any


def emit_kernels(c: Cascade, target: Target) -> list[Emitted]:
    """The source of every kernel of ``c`` (grouped, laid out) for ``target``, by its backend."""
    backend = backend_for(target)
    sizes = SizeVars()
    out = []
    for i, k in enumerate(c.groups):
        try:
            files, grid, script = backend.emit(c, k, sizes, i)
        except Exception as exc:   # TVM's own error types
            raise kernel_error(exc, c, k, target) from exc
        out.append(Emitted(k, files, grid, script, sum(einsum_cost(c, e).flops for e in k.einsums(c)),
                           tensors_bytes(c, k.inputs + (k.output,))))
    return out


def write_kernels(c: Cascade, target: Target, directory: Path, at: dict | None = None, harness: bool = False,
                  inputs: Mapping[str, np.ndarray] | None = None) -> Path:
    """Emit every kernel of ``c`` into ``directory`` with ``manifest.json``; ``at`` binds the
    size symbols for the roofline estimate. ``harness`` adds the host program that runs them
    (:mod:`.harness`, with each kernel's call in the manifest) and ``inputs`` (by input name)
    its data: the inputs, weights and every kernel's reference output."""
    backend = backend_for(target)
    if harness and not backend.harness:
        raise EinfuseError(f"kernels: a harness runs CUDA kernels; {target.name} has none (use a cuda:* target)")
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
    extra: dict[str, Any] = {}
    if harness:
        extra = _write_harness(c, emitted, manifest, directory, inputs)
    path = directory / "manifest.json"
    path.write_text(json.dumps({"target": target.name, "kernels": manifest, **extra}, indent=1))
    backend.write_extras(c, directory, at or {})
    return path


def _write_harness(c: Cascade, emitted: list[Emitted], manifest: list[dict], directory: Path,
                   inputs: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    """The harness's files, each kernel's ``calls`` (one per device function) and ``output``
    added to its manifest entry; the manifest's
    ``data`` (the bytes written, or None)."""
    from .harness import launch_record, launches, write_data, write_harness
    kernels = [item.kernel for item in emitted]
    found = [launches(item.kernel, item.script, item.files[f"{item.kernel.name}.cu"]) for item in emitted]
    workspaces = [w for _, ws in found for w in ws]
    for entry, (calls, _), k in zip(manifest, found, kernels):
        entry["calls"] = [launch_record(c, item, workspaces) for item in calls]
        entry["output"] = k.output
    write_harness(c, kernels, [calls for calls, _ in found], workspaces, directory)
    return {"data_bytes": write_data(c, kernels, inputs, directory) if inputs is not None else None}


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
