"""``CompiledModel``: a compiled cascade that takes and returns torch tensors.

Inputs travel to TVM through DLPack without a copy when they are contiguous and 64-byte aligned
(what generated code assumes); anything else is copied into an aligned buffer first, never passed
as is (an unaligned view would crash TVM, TVM_0.27_NOTES.md §8.7). Outputs come back as torch
tensors sharing TVM's memory.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import tvm

# TVM's thread pool reads this once; left unset, it ran one thread on this 2-core machine (2x slower).
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))
from tvm import relax

from ..errors import EinfuseError, InputError, InterpretError
from ..frontends.torch_export import TORCH_DTYPES
from ..ir import Cascade
from ..ir.analysis import einsum_cost, format_number, format_table, tensors_bytes
from ..ir.scope import declarations
from ..ir.sizes import bind_sizes
from ..targets import Target, cost
from . import persist
from .backends import backend_for
from .backends.cuda import device_source
from .profile import kernel_seconds
from ..ir.kernels import Kernel
from ..passes.moe import ROUTING
from ..ir.quant_formats import PACKED


class CompiledModel:
    """A compiled model: call it with torch tensors (positionally, in the cascade's input order)."""

    def __init__(self, cascade: Cascade, executable: Any, kernels: list[Kernel], target: Target | str,
                 compile_seconds: float, sources: dict[str, str] | None = None, library: Any = None,
                 tuning: Any = None, tuned: Sequence[str] = ()) -> None:
        self.ir = cascade
        self.executable = executable
        self.kernels = kernels
        self.compile_seconds = compile_seconds
        self._sources = sources or {}
        self._library = library  # the persist.Library it was loaded from (a loaded module cannot be re-exported)
        self.stored: Any = None  # the persist.Library of its compile-cache entry, which an export copies
        self.tuning = tuning     # the TuningDatabase its kernels' schedules came from, if any
        self.tuned = list(tuned)  # the kernels scheduled from a tuning record
        self.backend = backend_for(target)
        self.target = self.backend.target.name
        self.device = self.backend.torch_device   # (where inputs go and outputs are)
        self._vm: Any = None   # (made on the first call: a GPU model can be inspected where no GPU is)
        self._main: Any = None  # (its main function)
        self._decls = declarations(cascade)
        self.inputs = [t.name for t in cascade.tensors if t.role == "input"]
        self._dtypes = {n: TORCH_DTYPES[self._decls[n].dtype] for n in self.inputs}
        results = [t.name for t in cascade.tensors if t.role == "output"]
        self.outputs = [n for n in results if not ROUTING.fullmatch(n)]   # (the rest: the routing, for report())
        self._results = {n: i for i, n in enumerate(results)}
        self._shapes_seen: set[tuple] = set()   # input shapes already checked against the sizes
        self.size_ranges = dict(cascade.size_ranges)   # each Dim symbol's (min, max or None)

    def __call__(self, *args: Any) -> Any:
        """Run on torch tensors; one output comes back as a tensor, several as a tuple."""
        values = self._run(self.to_tvm(args))
        outs = tuple(map(self._to_torch, values))
        return outs[0] if len(outs) == 1 else outs

    def _run(self, args: list[Any]) -> list[Any]:
        if self._main is None:
            self._main = self._machine()["main"]   # (looking it up took 1.9 us a call)
        return self._values(self._main(*args))

    def _values(self, result: Any) -> list[Any]:
        """The outputs of a run: ``main`` returns one tensor alone, several as a tuple (each item
        read through the FFI: 1.8 us)."""
        if isinstance(result, tvm.runtime.Tensor):
            return [result]
        return [result[self._results[n]] for n in self.outputs]

    def _to_torch(self, value: Any) -> torch.Tensor:
        """An output as a torch tensor, zero-copy; on a CPU through the DLPack capsule directly
        (what ``torch.from_dlpack`` does there after its checks: 2.9 against 1.4 us)."""
        if self.device == "cpu":
            return torch._C._from_dlpack(value.__dlpack__())
        return torch.from_dlpack(value)

    def routing(self, args: tuple) -> dict[str, np.ndarray]:
        """The routing of each mixture-of-experts block on ``args`` (the ``moe`` pass's outputs:
        each row's expert, where it went), by name; empty for a model without."""
        wanted = [n for n in self._results if ROUTING.fullmatch(n)]
        if not wanted:
            return {}
        result = self._machine()["main"](*self.to_tvm(args))
        return {n: result[self._results[n]].numpy() for n in wanted}   # (several results: a tuple)

    def _machine(self) -> Any:
        """The Relax VM on the model's device, made on first use."""
        if self._vm is None:
            device = self.backend.device()
            if not device.exist:
                raise EinfuseError(f"this model was compiled for {self.target} and this machine has no GPU: "
                                   "inspect it (.source('cuda'), .kernels, .report()) or run it where one is")
            self._vm = relax.VirtualMachine(self.executable, device, memory_cfg="pooled")  # no page faults per call
        return self._vm

    def to_tvm(self, args: tuple) -> list[Any]:
        """Check ``args`` against the inputs and hand them to TVM (copying only when needed)."""
        if self._vm is None:
            self._machine()   # (fails first where the model's device is missing)
        if len(args) != len(self.inputs):
            raise InputError(f"expected {len(self.inputs)} input(s) ({', '.join(self.inputs)}), got {len(args)}")
        checked = [self._checked(name, x) for name, x in zip(self.inputs, args)]
        key = tuple([x.shape for x in checked])
        if key not in self._shapes_seen:   # (solving the sizes with sympy took 0.4 ms per call)
            shapes = {name: tuple(x.shape) for name, x in zip(self.inputs, checked)}
            try:
                bind_sizes(self.ir, self._decls, shapes)
            except InterpretError as exc:
                raise InputError(str(exc)) from None
            self._check_ranges(shapes)
            self._shapes_seen.add(key)
        return [self._handed(x) for x in checked]

    def _handed(self, x: torch.Tensor) -> Any:
        """``x`` as TVM takes it: on the model's device, contiguous, 64-byte aligned (copied only if not)."""
        if not (x.is_cpu if self.device == "cpu" else x.device.type == self.device):   # (x.device: 0.9 us)
            x = x.to(self.device)
        if self.device == "cuda":   # (CUDA allocations are aligned)
            x = x.detach().contiguous()
        elif not x.is_contiguous() or x.data_ptr() % 64 or x.requires_grad:
            x = _aligned_copy(x.detach())
        return tvm.runtime.from_dlpack(x)

    def run_trusted(self, *args: torch.Tensor) -> tuple:
        """Run on tensors the caller guarantees are of the inputs' dtypes and of shapes the model
        takes (:mod:`einfuse.lm`'s decode step: a new cache length each call, which ``__call__``
        would check with sympy, 0.4 ms); the outputs as a tuple of tensors."""
        return tuple(map(self._to_torch, self._run([self._handed(x) for x in args])))

    def _checked(self, name: str, x: Any) -> torch.Tensor:
        """Input ``name`` as a torch tensor (a numpy array is taken as one) of the compiled dtype,
        or an InputError saying what it is instead."""
        if type(x) is torch.Tensor and x.dtype is self._dtypes[name] and x.layout is torch.strided and not x.is_meta:
            return x   # (the usual case, checked first)
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x) if x.dtype.kind in "biuf" else x
        if not isinstance(x, torch.Tensor):
            kind = type(x).__name__ if type(x).__module__ == "builtins" else f"{type(x).__module__}.{type(x).__name__}"
            raise InputError(f"input '{name}' is {'None' if x is None else f'of type {kind}'}; "
                             "the model takes torch tensors (or numpy arrays)")
        if x.is_meta or x.layout != torch.strided:
            raise InputError(f"input '{name}' is a {'meta' if x.is_meta else str(x.layout)} tensor; "
                             "the model takes dense tensors with data")
        want = self._dtypes[name]
        if x.dtype != want:
            raise InputError(f"input '{name}' has dtype {x.dtype}; the model was compiled for {want}")
        return x

    def _check_ranges(self, shapes: dict[str, tuple]) -> None:
        """An InputError for a dimension over a Dim symbol whose size lies outside the Dim's
        ``min``/``max`` (the range the model was captured for)."""
        for name, shape in shapes.items():
            for dim, (tr, n) in enumerate(zip(self._decls[name].ranks, shape)):
                symbol = str(self.ir.rank(tr.rank).size)
                lo, hi = self.size_ranges.get(symbol, (1, None))
                if not tr.iterative and (n < lo or (hi is not None and n > hi)):
                    raise InputError(f"input '{name}' dimension {dim} (Dim '{symbol}') is {n}, outside the range "
                                     f"the model was captured for: {lo} <= {symbol} <= {'inf' if hi is None else hi}")

    # ---- inspection --------------------------------------------------------------------------

    def source(self, stage: str = "tir") -> str:
        """Generated code: ``"tir"`` (scheduled TIR of every kernel), ``"llvm"`` or ``"asm"`` (the
        host's), ``"cuda"`` (the kernels' CUDA C, for a ``cuda:*`` target)."""
        if stage == "tir":
            return self._sources.get("tir", "")
        if stage not in ("llvm", "ll", "asm", "s", "cuda"):
            raise EinfuseError(f"unknown source stage '{stage}'; use tir, llvm, asm or cuda")
        if stage == "cuda" and self.device != "cuda":
            raise EinfuseError(f"no CUDA source: this model was compiled for {self.target}")
        if self._library is not None:
            raise EinfuseError(f"a loaded model keeps no {stage} source; compile the model to see it")
        if stage == "cuda":
            return device_source(self.executable.mod)
        mod = self.executable.mod
        host = mod.imports[0] if mod.imports else mod
        if stage in ("llvm", "ll"):
            return host.inspect_source("ll")
        return host.inspect_source("asm")

    def report(self, args: tuple | None = None, table: list[dict[str, Any]] | None = None) -> str:
        """A table per kernel: the Einsums it computes, FLOPs, bytes and, given inputs, the cost
        model's estimate (:mod:`einfuse.targets.cost`, on the host's measured peaks) and what
        bounds it, each kernel's measured time alone and its share, and the model's time per call
        (``table``: rows :meth:`kernel_times` already measured); for a mixture of experts, each
        block's routing on ``args`` (:mod:`.experts_report`)."""
        from .experts_report import experts_lines
        table = table if table is not None else self.kernel_times(args)
        total = sum(r["measured_s"] or 0.0 for r in table) or 1.0
        rows = [(r["kernel"], str(r["einsums"]), format_number(r["flops"]), format_number(r["bytes"]),
                 "-" if r["predicted_s"] is None else f"{r['predicted_s'] * 1e3:.3f}", r["bound"] or "-",
                 "-" if r["measured_s"] is None else f"{r['measured_s'] * 1e3:.3f}",
                 "-" if r["measured_s"] is None else f"{r['measured_s'] / total:.0%}") for r in table]
        lines = format_table(("kernel", "einsums", "FLOPs", "bytes", "predicted ms", "bound", "ms", "share"), rows,
                             ruler=False)
        lines.append(f"{len(self.kernels)} kernels ({len(self.tuned)} tuned), compiled for {self.target} "
                     f"in {self.compile_seconds:.1f} s")
        lines.append(weights_line(self.ir, self.kernels))
        lines += experts_lines(self, args)
        if args is not None:
            lines.append(f"measured: {self.time(args) * 1e3:.3f} ms per call (median)")
        return "\n".join(lines)

    def kernel_times(self, args: tuple | None = None) -> list[dict[str, Any]]:
        """Per kernel: name, Einsum count, FLOPs and bytes (sympy), and given inputs the cost
        model's estimate (seconds, bound, FLOPs per DRAM byte; CPU targets) and the measured
        seconds of the kernel run alone."""
        times: dict[str, float] = {}
        machine, sizes = None, {}
        if args is not None:
            sizes = bind_sizes(self.ir, self._decls, {n: tuple(a.shape) for n, a in zip(self.inputs, args)})
            times = kernel_seconds(self.ir, self.kernels, self.backend, sizes, self.tuning)
            machine = self.backend.machine()
        out = []
        for k in self.kernels:
            est = cost.kernel_estimate(self.ir, k, machine, sizes) if machine is not None else None
            out.append({"kernel": k.name, "einsums": len(k.einsums(self.ir)),
                        "flops": sum(einsum_cost(self.ir, e).flops for e in k.einsums(self.ir)),
                        "bytes": tensors_bytes(self.ir, k.inputs + (k.output,)),
                        "predicted_s": est.seconds if est else None, "bound": est.bound if est else None,
                        "intensity": est.intensity if est else None, "measured_s": times.get(k.name)})
        return out

    def time(self, args: tuple, number: int = 10, repeat: int = 5) -> float:
        """Median seconds per call on ``args``."""
        tvm_args = self.to_tvm(args)
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                self._run(tvm_args)
            samples.append((time.perf_counter() - start) / number)
        return float(np.median(samples))

    # ---- persistence ---------------------------------------------------------------------------

    def export(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """Write ``model.so`` (kernels, graph and weights), ``kernels.tir`` and ``model.json``
        (with the text files ``extra``, by name) into directory ``path``, replacing an export
        there as a whole (:mod:`einfuse.codegen.persist`)."""
        return persist.export(self, path, extra)


def build(cascade: Cascade, target: Target, tuning: Any = None) -> CompiledModel:
    """``cascade`` (grouped by its target's codegen pipeline) compiled by the target's backend
    into a model on its device; kernels with a record in ``tuning`` (a
    :class:`~einfuse.codegen.tuning.TuningDatabase`) take its best schedule."""
    start = time.perf_counter()
    executable, kernels, tir, tuned = backend_for(target).compile(cascade, tuning)
    return CompiledModel(cascade, executable, kernels, target, time.perf_counter() - start, {"tir": tir},
                         tuning=tuning, tuned=tuned)


def load(path: str | Path) -> CompiledModel:
    """A model written by :meth:`CompiledModel.export`, checked before it is loaded (a damaged,
    foreign or other-version export is a :class:`~einfuse.errors.LoadError`)."""
    e = persist.read(path)
    return CompiledModel(e.cascade, e.executable, e.kernels, e.meta["target"], e.meta["compile_seconds"],
                         {"tir": e.tir}, e.library, e.tuning, e.meta["tuned"])


def aligned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous tensor whose data starts on a 64-byte boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.empty(nbytes + 64, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % 64
    return raw[offset:offset + nbytes].view(dtype).view(tuple(shape))


def _aligned_copy(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x`` whose data starts on a 64-byte boundary."""
    return aligned_empty(x.shape, x.dtype).copy_(x)


def weights_line(c: Cascade, kernels: Sequence[Kernel]) -> str:
    """The bytes of the parameters the kernels read, and of a quantized model the packed integers' share and the
    kernels that dequantize them (docs/quantization.md)."""
    read = {name for k in kernels for name in k.inputs}
    params = [t.name for t in c.tensors if t.role == "param" and t.name in read]
    packed = [t.name for t in c.tensors if t.name in params and t.dtype in PACKED]
    line = f"weights: {format_number(tensors_bytes(c, params))} bytes"
    if not packed:
        return line
    readers = sum(bool(set(packed) & set(k.inputs)) for k in kernels)
    return f"{line}, {format_number(tensors_bytes(c, packed))} of them packed integers (quantized), " \
        f"dequantized in the registers of {readers} kernels"
