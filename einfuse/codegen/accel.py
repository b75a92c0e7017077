"""Kernels for ``accel:fusemax`` as C that runs on this CPU and counts the accelerator's cycles.

Each kernel is lowered as for the CPU (TE; the 1-pass attention by the loop builder, one row at
a time, no vectors) and emitted as C by TVM's ``c`` target. Its GEMM-like work is tensorized
onto the 2D array: every contraction block is tiled to ``pe_rows x pe_cols x tile_k``
(``tile_with_tensor_intrin``, padding where the tile does not divide) and each tile becomes one
call of ``fm_mac2d`` (a ``TensorIntrin`` per operand layout), which the runtime
(``fusemax/fusemax_rt.c``) computes and charges ``tile_k`` cycles of the array for. Row sums and
maxes go onto the 1D array's ``fm_reduce``, one-op maps onto its ``fm_vec``, ``vector_pes``
elements a call. The rest of a kernel's work is charged when it starts: ``fm_configure`` (the
target's numbers), ``fm_begin(i)``, then ``fm_2d``/``fm_1d``/``fm_dram`` with the ops and bytes
:mod:`einfuse.targets.accel` derives from its Einsums less those its intrinsics charge (the 1-pass
attention's per-key work on the 2D array, per-row state on the 1D array; see there).

:func:`simulate` builds the whole cascade into one shared library with the runtime, runs its
kernels in order on given inputs and returns the outputs and each kernel's counters.

Before (a contraction block)::

    for i, j, k: C[i, j] += A[i, k] * B[j, k]

After (tiles of 256 x 256 x 16)::

    for i_o, j_o, k_o: fm_mac2d(&C[i_o*256, j_o*256], &A[i_o*256, k_o*16], &B[j_o*256, k_o*16], ...)
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import sympy
from tvm import s_tir, tirx
from tvm.script import tirx as T

from ..errors import CompileError
from ..ir import Access, Call, Cascade, Einsum
from ..ir.dtypes import DTYPES
from ..ir.scope import declarations, reduced_vars
from ..ir.kernels import KINDS, Kernel
from ..targets import Target
from ..targets.accel import Timing, contraction, dram_bytes_per_cycle, kernel_einsums, kernel_work, placement
from ..targets.presets import Accelerator
from .loop import LoopBuilder
from .loop_frames import serial_launch
from .lower import KernelBuilder, SizeVars

RUNTIME = Path(__file__).parent / "fusemax"
CFLAGS = [f"-I{RUNTIME}", "-O2", "-Dinff=__builtin_inff()", "-Dhalf=_Float16"]   # (TVM's C spells infinity ``inff``
# and a float16 ``half``: quantized weights' scales)
MAX_KERNELS = 4096   # FM_MAX_KERNELS of fusemax.h


_LIBM = ("fabs", "sqrt", "exp", "log", "tanh", "pow", "floor", "ceil", "trunc", "sin", "cos", "erf")


@lru_cache(maxsize=1)
def _register_libm() -> None:
    """TVM's ``c`` target has no lowering of its math intrinsics: calls of C's libm (``fabsf`` for
    float32), registered once."""
    def lower(name: str) -> Any:
        def call(op: Any) -> Any:
            dtype = str(op.ty) if hasattr(op, "ty") else op.dtype
            return tirx.call_pure_extern(dtype, name + ("f" if dtype == "float32" else ""), *op.args)
        return call
    for name in _LIBM:
        tirx.register_intrin_lowering(f"tirx.{name}", target="c", f=lower(name), level=99)


class AccelLoopBuilder(LoopBuilder):
    """The 1-pass attention as scalar C: serial loops over blocks of rows and a block's rows."""

    vectorized = staticmethod(T.serial)

    @property
    def lanes(self) -> int:
        return 1

    def launch(self, blocks: Any, rows: int) -> Any:
        self.row_count = 1
        return serial_launch(blocks, rows)


# ---- the arrays' intrinsics ---------------------------------------------------------------------

_LAYOUTS = {"ik": ("i", "k"), "ki": ("k", "i"), "jk": ("j", "k"), "kj": ("k", "j")}
_MAPS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "max": "max"}   # 1D-array maps (op code = position)
_REDUCTIONS = ("+", "max")


def _prim(buffers: dict[str, tuple], reads: list[str], writes: str, body: list[str], strided: bool) -> Any:
    """A PrimFunc from TVMScript text: ``buffers`` (name -> shape; lower-case handles), their
    reads and write, and ``body`` (statements under the root block). ``strided``: each buffer's
    rows ``s<name>`` apart (an implementation that takes any row stride)."""
    from tvm.script import from_source
    lines = ["@T.prim_func(s_tir=True)", f"def f({', '.join(n.lower() + ': T.handle' for n in buffers)}):"]
    for name, shape in buffers.items():
        stride = f", strides=[s{name.lower()}, 1]" if strided and len(shape) == 2 else ""
        if stride:
            lines.append(f"    s{name.lower()} = T.int32()")
        lines.append(f"    {name} = T.match_buffer({name.lower()}, {shape}, 'float32', offset_factor=1{stride})")

    def region(name: str) -> str:
        return f"{name}[{', '.join(f'0:{n}' for n in buffers[name])}]"
    lines += ["    with T.sblock('root'):", f"        T.reads({', '.join(region(n) for n in reads)})",
              f"        T.writes({region(writes)})"] + ["        " + line for line in body]
    return from_source("\n".join(lines), extra_vars={"T": T})


def _call(name: str, *args: str) -> str:
    return f"T.evaluate(T.call_extern('int32', '{name}', {', '.join(args)}))"


def _register(name: str, desc: Any, impl: Any) -> str:
    s_tir.TensorIntrin.register(name, desc, impl)
    return name


@lru_cache(maxsize=None)
def mac2d_intrinsics(ti: int, tj: int, tk: int) -> tuple[str, ...]:
    """Register ``fm_mac2d`` for a ``ti x tj x tk`` tile, once per layout of its two operands (the
    first read indexed by (i, k), (k, i), (j, k) or (k, j); the second by the other output
    variable, either way round); their names."""
    names = []
    extent = {"i": ti, "j": tj, "k": tk}
    for first in _LAYOUTS:
        other = "j" if "i" in first else "i"
        for second in (other + "k", "k" + other):
            xl, yl = _LAYOUTS[first], _LAYOUTS[second]
            buffers = {"X": tuple(extent[d] for d in xl), "Y": tuple(extent[d] for d in yl), "C": (ti, tj)}
            update = ["for i, j, k in T.grid(%d, %d, %d):" % (ti, tj, tk), "    with T.sblock('update'):",
                      "        vi, vj, vk = T.axis.remap('SSR', [i, j, k])",
                      f"        C[vi, vj] = C[vi, vj] + X[v{xl[0]}, v{xl[1]}] * Y[v{yl[0]}, v{yl[1]}]"]
            strides = [f"T.Cast('int64', {_stride(layout, d, row)})" for layout, row in ((xl, "sx"), (yl, "sy"))
                       for d in "ijk"]
            call = _call("fm_mac2d", "C.access_ptr('rw')", "X.access_ptr('r')", "Y.access_ptr('r')",
                         "T.Cast('int64', sc)", *strides, f"T.int32({ti})", f"T.int32({tj})", f"T.int32({tk})")
            names.append(_register(f"einfuse.fm_mac2d_{ti}x{tj}x{tk}_{first}_{second}",
                                   _prim(buffers, ["C", "X", "Y"], "C", update, False),
                                   _prim(buffers, ["C", "X", "Y"], "C", [call], True)))
    return tuple(names)


def _stride(layout: tuple[str, str], d: str, row: str) -> str:
    """An operand's element stride along ``d`` (0 where it does not use it)."""
    return {layout[0]: row, layout[1]: "T.int64(1)"}.get(d, "T.int64(0)")


@lru_cache(maxsize=None)
def map1d_intrinsics(lanes: int, op: str) -> tuple[str, ...]:
    """Register ``fm_vec`` for ``lanes`` elements of ``C = A op B``, with B a vector or one value
    for all lanes (a row's max or sum); their names."""
    names = []
    for broadcast in (False, True):
        buffers = {"A": (lanes,), "B": (1,) if broadcast else (lanes,), "C": (lanes,)}
        b = "B[0]" if broadcast else "B[vk]"
        value = _nan_max("A[vk]", b) if op == "max" else f"A[vk] {_MAPS[op]} {b}"
        update = [f"for k in T.serial({lanes}):", "    with T.sblock('update'):",
                  "        vk = T.axis.remap('S', [k])", f"        C[vk] = {value}"]
        call = _call("fm_vec", "C.access_ptr('w')", "A.access_ptr('r')", "B.access_ptr('r')", f"T.int32({lanes})",
                     f"T.int32({list(_MAPS).index(op)})", f"T.int32({0 if broadcast else 1})")
        names.append(_register(f"einfuse.fm_vec_{op}_{lanes}{'_bcast' if broadcast else ''}",
                               _prim(buffers, ["A", "B"], "C", update, False),
                               _prim(buffers, ["A", "B"], "C", [call], False)))
    return tuple(names)


def _nan_max(a: str, b: str) -> str:
    """TVMScript of ``op_lowering.nan_max(a, b)``, the NaN-propagating max the lowering emits."""
    return f"T.Select(T.isnan({a}), {a}, T.max({a}, {b}))"


@lru_cache(maxsize=None)
def reduce1d_intrinsic(lanes: int, op: str) -> str:
    """Register ``fm_reduce``: ``lanes`` elements of X summed (or maxed) into Y[0]; its name."""
    buffers = {"X": (lanes,), "Y": (1,)}
    value = _nan_max("Y[0]", "X[vk]") if op == "max" else "Y[0] + X[vk]"
    update = [f"for k in T.serial({lanes}):", "    with T.sblock('update'):",
              "        vk = T.axis.remap('R', [k])", f"        Y[0] = {value}"]
    call = _call("fm_reduce", "Y.access_ptr('rw')", "X.access_ptr('r')", f"T.int32({lanes})",
                 f"T.int32({_REDUCTIONS.index(op)})")
    return _register(f"einfuse.fm_reduce_{'sum' if op == '+' else op}_{lanes}",
                     _prim(buffers, ["Y", "X"], "Y", update, False), _prim(buffers, ["Y", "X"], "Y", [call], False))


def tensorize(sch: s_tir.Schedule, block: str, names: tuple[str, ...], reduction: bool,
              padding: bool = True) -> s_tir.Schedule | None:
    """``sch`` with ``block`` tiled onto the first of the intrinsics ``names`` that matches, or None.
    Operands read through a view (``X[n//24, n%24, d]``) are first copied in the block's own index
    order (``reindex``); ``padding``: the tile may overhang (not for a max: it would pad with 0)."""
    from tvm.s_tir.schedule.transform import tile_with_tensor_intrin
    with _quiet_stderr():   # (TVM's printer warns on stderr while it formats a mismatch)
        return _first_match(sch, block, names, reduction, padding, tile_with_tensor_intrin)


def _first_match(sch: s_tir.Schedule, block: str, names: tuple[str, ...], reduction: bool, padding: bool,
                 tile: Any) -> s_tir.Schedule | None:
    """:func:`tensorize`'s trials: each intrinsic on the block as it is, then on reindexed operands."""
    for copied, name in [(c, n) for c in (False, True) for n in names]:
        trial = s_tir.Schedule(sch.mod)
        rv = trial.get_sblock(block)
        try:
            if copied:
                for i in range(len(trial.get(rv).reads)):
                    trial.reindex(rv, ("read", i))
            loop = tile(trial, rv, name, allow_padding=padding)
            if loop is None:
                continue
            if reduction:
                trial.decompose_reduction(rv, trial.get_loops(rv)[0])
            trial.tensorize(loop, name)
        except (RuntimeError, ValueError):   # (TVM's ScheduleError, TVMError: this intrinsic does not match)
            continue
        return trial
    return None


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null (C++ code writes there directly), then restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def intrinsics_for(e: Einsum, array: str, acc: Accelerator) -> tuple[tuple[str, ...], bool, bool] | None:
    """The intrinsics that may compute ``e`` on ``array``, whether it reduces, and whether its tile
    may be padded; None where none can (a map of more than one op, a cast, a filter...)."""
    if array == "2d":
        return (mac2d_intrinsics(acc.pe_rows, acc.pe_cols, acc.tile_k), True, True) if contraction(e) else None
    if any(ix.filter for ix in e.lhs.indices):
        return None
    op = e.reduce.op if e.reduce else "+"
    if reduced_vars(e):
        if isinstance(e.rhs, Access) and op in _REDUCTIONS and len(reduced_vars(e)) == 1:
            return (reduce1d_intrinsic(acc.vector_pes, op),), True, op != "max"
        return None
    if isinstance(e.rhs, Call) and e.rhs.op in _MAPS and all(isinstance(a, Access) for a in e.rhs.args):
        return map1d_intrinsics(acc.vector_pes, e.rhs.op), False, True
    return None


# ---- one kernel ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class AccelKernel:
    """One kernel's PrimFunc for the accelerator and the tensors whose Einsums call an intrinsic."""

    func: Any
    tensorized: tuple[str, ...]


def kernel_function(c: Cascade, k: Kernel, sizes: SizeVars, target: Target, index: int) -> AccelKernel:
    """``k`` lowered to a PrimFunc whose tiles call the arrays' intrinsics and which charges the
    rest of its work when it starts (as kernel ``index``)."""
    acc = target.device
    _register_libm()
    if KINDS[k.kind].loop:
        func, done = AccelLoopBuilder(c, k, sizes, target).prim_func(), {}
    else:
        func, done = _tensorized(KernelBuilder(c, k, sizes).prim_func(), c, k, acc)
    work = kernel_work(c, k, acc, counted=frozenset(done))
    # (DRAM bytes per second and the clock as integers: TVM's C prints a double to 7 digits)
    configure = [tirx.const(n, "int32") for n in (acc.pe_rows, acc.pe_cols, acc.vector_pes)] + \
        [tirx.const(round(n), "int64") for n in (acc.dram_gib_s * 2 ** 30, acc.mhz * 1e6)]
    calls = [("fm_configure", configure), ("fm_begin", [tirx.const(index, "int32")])] + \
        [(fn, [_float(x, sizes)]) for fn, x in (("fm_2d", work.ops_2d), ("fm_1d", work.ops_1d),
                                                 ("fm_dram", work.dram_bytes))]
    body = [tirx.Evaluate(tirx.call_extern("int32", fn, *args)) for fn, args in calls]
    return AccelKernel(func.with_body(tirx.SeqStmt([*body, func.body])), tuple(done.values()))


def _tensorized(func: Any, c: Cascade, k: Kernel, acc: Accelerator) -> tuple[Any, dict[int, str]]:
    """``func`` with each Einsum's block on its array's intrinsics where one matches; those
    Einsums (by position in :func:`~einfuse.targets.accel.kernel_einsums`) with their tensors."""
    sch = s_tir.Schedule(func)
    where = placement(c, k)
    done = {}
    for i, (e, _) in enumerate(kernel_einsums(c, k)):
        found = intrinsics_for(e, where[i], acc) if declarations(c)[e.lhs.tensor].dtype == "f32" else None
        names = [b.name_hint for b in _blocks(sch)]
        # (a masked or cast reduction is computed in X_value, then selected into X)
        block = next((n for n in (e.lhs.tensor + "_value", e.lhs.tensor) if n in names), None)
        tiled = tensorize(sch, block, *found) if found is not None and block is not None else None
        if tiled is not None:
            sch = tiled
            done[i] = e.lhs.tensor
    return sch.mod["main"], done


def _blocks(sch: s_tir.Schedule) -> list[Any]:
    return [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]


def _float(x: sympy.Expr, sizes: SizeVars) -> Any:
    """A sympy count as a float64 TIR expression of the size variables."""
    x = sympy.sympify(x)
    if x.is_Number:
        return tirx.const(float(x), "float64")
    num, den = sympy.fraction(sympy.together(x))
    return tirx.Cast("float64", sizes.expr(sympy.expand(num))) / tirx.Cast("float64", sizes.expr(den))


# ---- the whole cascade, run on this CPU ------------------------------------------------------------

class Counters(ctypes.Structure):
    """``fm_counts`` of fusemax.h."""

    _fields_ = [(n, ctypes.c_double) for n in ("cycles_2d", "cycles_1d", "dram_bytes", "latency", "tiles", "calls")]


@dataclass(frozen=True)
class Simulation:
    """What :func:`simulate` returns: the cascade's outputs and each kernel's counted timing."""

    outputs: dict[str, np.ndarray]
    kernels: list[tuple[Kernel, Timing, int, tuple[str, ...]]]   # kernel, counted timing, intrinsic calls, tensorized

    @property
    def total(self) -> Timing:
        return sum((t for _, t, _, _ in self.kernels), Timing(0.0, 0.0, 0.0, 0.0))


def compile_c(c: Cascade, target: Target) -> tuple[Any, list[AccelKernel]]:
    """Every kernel of ``c`` (grouped) in one TVM module for the ``c`` target, compiled."""
    import tvm
    if len(c.groups) > MAX_KERNELS:
        raise CompileError(f"{len(c.groups)} kernels: the accelerator's runtime counts {MAX_KERNELS} at most")
    sizes = SizeVars()
    made = []
    for i, k in enumerate(c.groups):
        try:
            made.append(kernel_function(c, k, sizes, target, i))
        except Exception as exc:   # TVM's own error types
            from .build import kernel_error
            raise kernel_error(exc, c, k, target) from exc
    module = tvm.IRModule({k.name: m.func.with_attr("global_symbol", k.name) for k, m in zip(c.groups, made)})
    return tvm.compile(module, target=target.tvm_target()), made


def library(c: Cascade, target: Target, path: Path) -> list[AccelKernel]:
    """Compile ``c``'s kernels and the runtime into the shared library ``path``."""
    executable, made = compile_c(c, target)
    executable.export_library(str(path), options=[str(RUNTIME / "fusemax_rt.c"), *CFLAGS])
    return made


#: What ``write_runtime`` puts in a kernels directory's ``Makefile`` and ``report.md`` (K: a kernel).
BUILD = "cc -O2 -fPIC -shared -Iinclude -I. '-Dinff=__builtin_inff()' -Dhalf=_Float16 -o K.so K.c fusemax_rt.c -lm"
_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)


def write_runtime(directory: Path, kernels: list[str]) -> str:
    """Make ``directory``, which holds ``K.c`` for each kernel ``K`` of ``kernels``, build on its
    own: the runtime (``fusemax.h``, ``fusemax_rt.c``), the TVM headers the C includes (copied
    from the installed TVM into ``include/``) and a ``Makefile`` making each ``K.so`` (each C file
    defines TVM's library context, so each kernel is a library). Returns report.md's line on it."""
    for name in ("fusemax.h", "fusemax_rt.c"):
        shutil.copyfile(RUNTIME / name, directory / name)
    _copy_headers([directory / f"{k}.c" for k in kernels], directory / "include")
    rule = BUILD.replace("-o K.so K.c", "-o $@ $<").replace("cc ", "$(CC) ", 1)
    (directory / "Makefile").write_text(
        f"# einfuse kernels: each kernel with the FuseMax runtime as a shared library\nCC ?= cc\n"
        f"KERNELS = {' '.join(kernels)}\nall: $(KERNELS:=.so)\n%.so: %.c fusemax_rt.c fusemax.h\n\t{rule}\n"
        "clean:\n\trm -f $(KERNELS:=.so)\n.PHONY: all clean\n")
    return (f"Build: `make`, or for one kernel K: `{BUILD}`. The libraries call TVM's runtime "
            "(TVMBackendAllocWorkspace, TVMFFIErrorSetRaisedFromCStrParts), which loads them: "
            "`tvm.runtime.load_module(\"K.so\")[\"K\"](*inputs, output)`.")


def _copy_headers(sources: list[Path], include: Path) -> None:
    """Copy the headers ``sources`` include, and those they include, from the installed TVM's
    include directories into ``include`` (a header found in none is the C library's)."""
    import tvm.libinfo
    import tvm_ffi.libinfo
    found = tvm.libinfo.find_include_path()
    roots = [Path(r) for r in ([found] if isinstance(found, str) else found)] + \
        [Path(r) for r in tvm_ffi.libinfo.include_paths()]
    pending = [name for source in sources for name in _INCLUDE.findall(source.read_text())]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        header = next((r / name for r in roots if name not in seen and (r / name).is_file()), None)
        seen.add(name)
        if header is not None:
            (include / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(header, include / name)
            pending += _INCLUDE.findall(header.read_text())


def simulate(c: Cascade, target: Target | str, inputs: dict[str, np.ndarray]) -> Simulation:
    """Run ``c``'s kernels for the accelerator ``target`` on this CPU (static sizes), in order, on
    ``inputs`` (by name); the outputs and what the runtime counted for each kernel."""
    import tvm
    target = Target.parse(target)
    acc, decls = target.device, declarations(c)
    with tempfile.TemporaryDirectory(prefix="einfuse_accel_") as tmp:
        path = Path(tmp) / "kernels.so"
        made = library(c, target, path)
        module, runtime = tvm.runtime.load_module(str(path)), ctypes.CDLL(str(path))
        runtime.fm_reset()
        values = {n: np.asarray(v, dtype=DTYPES[decls[n].dtype].numpy, order="C")   # (ascontiguousarray makes 0-d 1-d)
                  for n, v in {**c.params, **inputs}.items()}
        for k in c.groups:
            args = [tvm.runtime.tensor(values[n]) for n in k.inputs]
            out = tvm.runtime.tensor(np.zeros(_shape(c, k.output), DTYPES[decls[k.output].dtype].numpy))
            module[k.name](*args, out)
            values[k.output] = out.numpy()
        counts = (Counters * len(c.groups))()
        runtime.fm_read(counts, len(c.groups))
    rate = dram_bytes_per_cycle(acc)
    timed = [(k, Timing(x.cycles_2d, x.cycles_1d, x.dram_bytes / rate, x.latency), int(x.tiles), m.tensorized)
             for k, x, m in zip(c.groups, counts, made)]
    return Simulation({t.name: values[t.name] for t in c.tensors if t.role == "output"}, timed)


def _shape(c: Cascade, name: str) -> tuple[int, ...]:
    from ..ir.sizes import extent
    size = {r.name: r.size for r in c.ranks}
    shape = [extent(size[r.rank], r.iterative) for r in declarations(c)[name].ranks]
    if not all(isinstance(n, int) for n in shape):
        raise CompileError(f"simulating {name} needs static sizes, not {shape}")
    return tuple(shape)
