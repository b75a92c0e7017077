"""A self-contained CUDA directory: each kernel's ``.cu``, a host program, its data and a Makefile.

``einfuse kernels MODEL --target cuda:* -o DIR --harness`` writes, beside the kernels, what runs
them where only nvcc is (no TVM, no Python): ``main.cu`` allocates every tensor on the device,
reads the inputs and weights from ``data/``, launches the kernels in the model's order with the
launch configuration TVM chose, compares each kernel's output with the CPU reference (the
float64 interpreter's, in ``data/``) and prints its normwise relative error per kernel
(``max |got - want| / max |want|``, within :data:`TOLERANCE` of its dtype), then
times each kernel and the whole model with CUDA events. ``make && ./run`` builds and runs it.
The manifest gains each kernel's launch: its device function, grid, block, dynamic shared
memory and arguments (name, shape, dtype, strides in elements), which a user's own host code
can follow instead.

The sizes must be static (the example arguments'): a launch extent that depends on a size
symbol is refused, naming the kernel.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import CompileError, EinfuseError
from ..ir import Cascade, interpret
from ..ir.dtypes import DTYPES
from ..ir.kernels import Kernel
from ..ir.scope import declarations

_SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\(([^)]*)\)\s*\{')
_BINDING = re.compile(r"T\.thread_binding\((.+?), thread=\"(blockIdx|threadIdx)\.([xyz])\"\)")
_SHAPE = r"\(\(((?:[^()]|\([^()]*\))*)\)"   # (a shape tuple, its sizes maybe T.int64(n))
_ALLOC = re.compile(r'^    (\w+) = T\.sblock_alloc_buffer' + _SHAPE + r'(?:, "(\w+)")?(?:, scope="([\w.]+)")?', re.M)
_CTYPES = {"f32": "float", "f64": "double", "f16": "__half", "bf16": "__nv_bfloat16", "i8": "int8_t",
           "u8": "uint8_t", "i32": "int32_t", "i64": "int64_t", "bool": "bool"}
REPEAT = 20   # timed launches of each kernel and of the model
#: The largest normwise error (max |got - want| / max |want|) a kernel's output of each dtype may
#: have against the float64 reference (integers: none).
TOLERANCE = {"f32": 1e-3, "f64": 1e-9, "f16": 1e-2, "bf16": 3e-2}


@dataclass(frozen=True)
class Launch:
    """How the host launches one device function: its name, grid, block, dynamic shared bytes and
    arguments (buffer names, in the function's order: a tensor's, or a workspace's)."""

    function: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    args: tuple[str, ...]


@dataclass(frozen=True)
class Workspace:
    """A buffer a kernel's device functions pass each other through global memory (TVM allocates
    it on the host side): ``<kernel>__<buffer>``, its shape and IR dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def launches(k: Kernel, script: str, source: str) -> tuple[list[Launch], list[Workspace]]:
    """The launches of kernel ``k`` (one per device function, in order) and its workspaces, from
    its scheduled TIR (``script``) and its CUDA ``source``."""
    workspaces = {name: Workspace(f"{k.name}__{name}", shape, _ir_dtype(dtype))
                  for name, shape, dtype in _workspaces(k, script)}
    nests = _launch_nests(k, script)
    signatures = sorted(_SIGNATURE.findall(source), key=lambda sig: _suffix(sig[1]))
    if len(signatures) != len(nests):
        raise CompileError(f"kernel {k.name}: {len(signatures)} device functions for {len(nests)} launch nests")
    out = []
    if "extern __shared__" in source:   # (its size is the host code's, which the harness does not read yet)
        raise CompileError(f"kernel {k.name}: it uses dynamic shared memory, which the harness cannot size yet")
    for (bounds, function, params), extents in zip(signatures, nests):
        args = tuple(workspaces[a].name if a in workspaces else a for a in _tensor_args(k, params))
        grid = tuple(extents.get(f"blockIdx.{a}", 1) for a in "xyz")
        block = tuple(extents.get(f"threadIdx.{a}", 1) for a in "xyz")
        if bounds and int(bounds) != math.prod(block):
            raise CompileError(f"kernel {k.name}: its threads {block} are not its __launch_bounds__({bounds})")
        out.append(Launch(function, grid, block, 0, args))  # type: ignore[arg-type]
    return out, list(workspaces.values())


def _tensor_args(k: Kernel, params: str) -> list[str]:
    """The buffers a device function's parameters name (``X_ptr``: X); a scalar is refused."""
    args = []
    for param in filter(None, (p.strip() for p in params.split(","))):
        name = param.split()[-1]
        if "*" not in param or not name.endswith("_ptr"):
            raise CompileError(f"kernel {k.name}: its argument '{param}' is not a tensor (a size symbol?); "
                               "the harness needs static sizes")
        args.append(name[: -len("_ptr")])
    return args


def _launch_nests(k: Kernel, script: str) -> list[dict[str, int]]:
    """The thread-binding extents of each outermost launch nest of the script, in order."""
    bindings = [(len(line) - len(line.lstrip()), m.groups()) for line in script.splitlines()
                for m in [_BINDING.search(line)] if m]
    top = min((indent for indent, _ in bindings), default=0)
    nests: list[dict[str, int]] = []
    for indent, (extent, scope, axis) in bindings:
        number = re.fullmatch(r"(?:T\.int64\()?(\d+)\)?", extent.strip())
        if number is None:
            raise CompileError(f"kernel {k.name}: its {scope}.{axis} extent {extent} is not a constant; "
                               "the harness needs static sizes")
        if indent == top or not nests:
            nests.append({})
        nests[-1][f"{scope}.{axis}"] = int(number.group(1))
    return nests or [{}]


def _workspaces(k: Kernel, script: str) -> list[tuple[str, tuple[int, ...], str]]:
    """The global buffers the script allocates at its root: (name, shape, TVM dtype)."""
    out = []
    for name, shape, dtype, scope in _ALLOC.findall(script):
        if scope in ("", "global"):
            out.append((name, _sizes(k, shape), dtype or "float32"))
    return out


def _sizes(k: Kernel, shape: str) -> tuple[int, ...]:
    """A shape tuple's text (``T.int64(24), T.int64(6)``) as numbers; a symbolic one is refused."""
    dims = [re.fullmatch(r"(?:T\.int64\()?(\d+)\)?", d.strip()) for d in shape.split(",") if d.strip()]
    if None in dims:
        raise CompileError(f"kernel {k.name}: a buffer of the symbolic shape ({shape}); the harness needs static sizes")
    return tuple(int(d.group(1)) for d in dims)  # type: ignore[union-attr]


def _suffix(function: str) -> int:
    """A device function's position: ``k_kernel`` 0, ``k_kernel_1`` 1, ..."""
    found = re.search(r"_kernel_(\d+)$", function)
    return int(found.group(1)) if found else 0


def _ir_dtype(tvm_dtype: str) -> str:
    return next(name for name, d in DTYPES.items() if d.tvm == tvm_dtype)


def launch_from_record(record: Mapping[str, Any]) -> Launch:
    """The :class:`Launch` a manifest's call holds (:func:`launch_record`)."""
    return Launch(str(record["function"]), tuple(record["grid"]), tuple(record["block"]),  # type: ignore[arg-type]
                  int(record["shared_bytes"]), tuple(a["name"] for a in record["args"]))


def launch_record(c: Cascade, item: Launch, workspaces: list[Workspace]) -> dict[str, Any]:
    """``item`` as a call of the manifest: with each argument's shape, dtype and strides."""
    decls = declarations(c)
    buffers = _buffers(c, workspaces, [a for a in item.args if a in decls])
    args = []
    for name in item.args:
        shape, dtype, _ = buffers[name]
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        args.append({"name": name, "shape": list(shape), "dtype": dtype, "strides": strides,
                     "workspace": name not in decls})
    return {"function": item.function, "grid": list(item.grid), "block": list(item.block),
            "shared_bytes": item.shared_bytes, "args": args}


def _buffers(c: Cascade, workspaces: list[Workspace], names: list[str] | None = None) -> dict[str, tuple]:
    """(shape, IR dtype, given: read from data/) of the named tensors and of the workspaces."""
    decls = declarations(c)
    out = {n: (tuple(_shape(c, n)), decls[n].dtype, decls[n].role in ("input", "param"))
           for n in (names if names is not None else decls)}
    return {**out, **{w.name: (w.shape, w.dtype, False) for w in workspaces}}


def references(c: Cascade, kernels: list[Kernel], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every kernel's output, computed by the float64 interpreter on ``inputs``, in its dtype."""
    outs = {k.output for k in kernels}
    decls = declarations(c)   # (with the temps declared by their writes)
    marked = replace(c, tensors=tuple(replace(t, role="output") if t.name in outs else t for t in decls.values()))
    values = interpret(marked, inputs)
    return {name: values[name].astype(DTYPES[decls[name].dtype].numpy) for name in outs}


def used(c: Cascade, kernels: list[Kernel]) -> list[str]:
    """The tensors the kernels read or write, in declaration order (a weight the layouts replaced
    is left out)."""
    names = {t for k in kernels for t in (*k.inputs, k.output)}
    return [name for name in declarations(c) if name in names]   # (with those a loop declares)


def write_data(c: Cascade, kernels: list[Kernel], inputs: Mapping[str, np.ndarray], directory: Path) -> int:
    """``data/NAME.bin`` for every input, weight and kernel output (the reference) the kernels
    use; their bytes."""
    decls = declarations(c)
    keep = set(used(c, kernels))
    absent = [t.name for t in c.tensors if t.role == "param" and t.name in keep and t.name not in c.params]
    if absent:
        raise EinfuseError(f"kernels --data: the weight '{absent[0]}' has no data (a cascade's params must be given)")
    inputs = {name: np.asarray(v).astype(DTYPES[decls[name].dtype].numpy) for name, v in inputs.items()}
    data = directory / "data"   # (the references computed from the inputs as the GPU reads them)
    data.mkdir(parents=True, exist_ok=True)
    arrays = {**{t.name: c.params[t.name] for t in c.tensors if t.role == "param" and t.name in keep}, **inputs,
              **references(c, kernels, inputs)}
    arrays = {name: value for name, value in arrays.items() if name in keep}
    total = 0
    for name, value in arrays.items():
        raw = np.ascontiguousarray(np.asarray(value).astype(DTYPES[decls[name].dtype].numpy)).tobytes()
        (data / f"{name}.bin").write_bytes(raw)
        total += len(raw)
    return total


def write_harness(c: Cascade, kernels: list[Kernel], calls: list[list[Launch]], workspaces: list[Workspace],
                  directory: Path) -> None:
    """``main.cu`` and the ``Makefile`` of a directory of ``kernels`` (``NAME.cu`` each)."""
    (directory / "main.cu").write_text(main_source(c, kernels, calls, workspaces))
    objects = " ".join(f"{k.name}.cu" for k in kernels)
    (directory / "Makefile").write_text(
        "# Builds the einfuse kernels and their host harness with nvcc alone: make && ./run\n"
        "# (each kernel's source carries TVM's identical half-precision helpers: the linker keeps one)\n"
        "NVCC ?= nvcc\nARCH ?= sm_90\nNVFLAGS ?= -O3 -std=c++17 -arch=$(ARCH) -diag-suppress 177,550\n"
        "LDFLAGS ?= -Xlinker --allow-multiple-definition\n\n"
        f"run: main.cu {objects}\n\t$(NVCC) $(NVFLAGS) $(LDFLAGS) -o run main.cu {objects}\n\n"
        "clean:\n\trm -f run\n")


def main_source(c: Cascade, kernels: list[Kernel], calls: list[list[Launch]], workspaces: list[Workspace]) -> str:
    """The host program: allocate, load, launch in order, check, time."""
    buffers = _buffers(c, workspaces, used(c, kernels))
    unsupported = sorted({dtype for _, dtype, _ in buffers.values() if dtype not in _CTYPES})
    if unsupported:
        raise CompileError(f"the harness cannot hold tensors of dtype {', '.join(unsupported)} yet")
    index = {name: i for i, name in enumerate(buffers)}
    lines = [_PRELUDE]
    for item in (item for launches_ in calls for item in launches_):
        params = ", ".join(f"{_CTYPES[buffers[a][1]]}* {a}" for a in item.args)
        lines.append(f'extern "C" __global__ void {item.function}({params});')
    table = ",\n".join(f'  {{"{n}", {math.ceil(math.prod(shape) * DTYPES[dtype].bytes)}, "{dtype}", {str(given).lower()}}}'
                       for n, (shape, dtype, given) in buffers.items())
    lines.append(f"Tensor tensors[] = {{\n{table}\n}};\nint n_tensors = {len(buffers)};\n")
    lines.append("static void launch(int k) {\n  switch (k) {")
    for i, launches_ in enumerate(calls):
        body = " ".join(f"EINFUSE_LAUNCH({item.function}, dim3({', '.join(map(str, item.grid))}), "
                        f"dim3({', '.join(map(str, item.block))}), {item.shared_bytes}, "
                        + ", ".join(f"({_CTYPES[buffers[a][1]]}*)tensors[{index[a]}].dev" for a in item.args) + ");"
                        for item in launches_)
        lines.append(f"    case {i}: {body} break;")
    lines.append("  }\n}\n")
    names = ",\n".join(f'  {{"{k.name}", {index[k.output]}, {TOLERANCE.get(buffers[k.output][1], 0.0)}}}' for k in kernels)
    lines.append(f"static Kernel kernels[] = {{\n{names}\n}};\nstatic const int n_kernels = {len(kernels)};\n")
    lines.append(_MAIN.replace("REPEAT", str(REPEAT)))
    return "\n".join(lines)


def _shape(c: Cascade, name: str) -> list[int]:
    size = {r.name: r.size for r in c.ranks}
    shape = [size[r.rank] + int(r.iterative) for r in declarations(c)[name].ranks]
    if not all(isinstance(n, int) for n in shape):
        raise CompileError(f"tensor {name} has the symbolic shape {shape}; the harness needs static sizes")
    return shape


_PRELUDE = r"""// The host harness of einfuse's kernels (einfuse/codegen/harness.py): make && ./run
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define CHECK(call) do { cudaError_t e = (call); if (e != cudaSuccess) { \
  std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); std::exit(2); } } while (0)

#ifndef EINFUSE_LAUNCH   // (a test builds this program against a CPU stub of the kernels that defines it)
#define EINFUSE_LAUNCH(f, grid, block, shared, ...) f<<<grid, block, shared>>>(__VA_ARGS__)
#endif

struct Tensor { const char* name; size_t bytes; const char* dtype; bool given; void* dev; };
struct Kernel { const char* name; int output; double tolerance; };
"""

_MAIN = r"""
static bool read_file(const char* name, std::vector<char>& out, size_t bytes) {
  std::string path = std::string("data/") + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return false;
  out.resize(bytes);
  size_t got = std::fread(out.data(), 1, bytes, f);
  std::fclose(f);
  if (got != bytes) { std::fprintf(stderr, "%s: %zu bytes, want %zu\n", path.c_str(), got, bytes); std::exit(2); }
  return true;
}

static double value(const char* dtype, const char* p, size_t i) {
  if (!std::strcmp(dtype, "f32")) return ((const float*)p)[i];
  if (!std::strcmp(dtype, "f64")) return ((const double*)p)[i];
  if (!std::strcmp(dtype, "f16")) return __half2float(((const __half*)p)[i]);
  if (!std::strcmp(dtype, "bf16")) return __bfloat162float(((const __nv_bfloat16*)p)[i]);
  if (!std::strcmp(dtype, "i64")) return (double)((const int64_t*)p)[i];
  if (!std::strcmp(dtype, "i32")) return (double)((const int32_t*)p)[i];
  if (!std::strcmp(dtype, "i8")) return (double)((const int8_t*)p)[i];
  if (!std::strcmp(dtype, "u8")) return (double)((const uint8_t*)p)[i];
  return (double)((const bool*)p)[i];
}

static size_t elements(const Tensor& t) {
  if (!std::strcmp(t.dtype, "f64") || !std::strcmp(t.dtype, "i64")) return t.bytes / 8;
  if (!std::strcmp(t.dtype, "f32") || !std::strcmp(t.dtype, "i32")) return t.bytes / 4;
  if (!std::strcmp(t.dtype, "f16") || !std::strcmp(t.dtype, "bf16")) return t.bytes / 2;
  return t.bytes;
}

static void generate(const Tensor& t, int seed, std::vector<char>& out) {
  out.assign(t.bytes, 0);   // integers and booleans 0, floats uniform in [-1, 1), each tensor its own
  uint32_t state = 12345u + 7919u * (uint32_t)seed;
  for (size_t i = 0; i < elements(t); i++) {
    state = state * 1664525u + 1013904223u;
    float x = (float)(state >> 8) / 8388608.0f - 1.0f;
    if (!std::strcmp(t.dtype, "f32")) ((float*)out.data())[i] = x;
    else if (!std::strcmp(t.dtype, "f64")) ((double*)out.data())[i] = x;
    else if (!std::strcmp(t.dtype, "f16")) ((__half*)out.data())[i] = __float2half(x);
    else if (!std::strcmp(t.dtype, "bf16")) ((__nv_bfloat16*)out.data())[i] = __float2bfloat16(x);
  }
}

int main() {
  std::vector<char> host;
  int missing = 0;
  for (int i = 0; i < n_tensors; i++) {
    CHECK(cudaMalloc(&tensors[i].dev, tensors[i].bytes ? tensors[i].bytes : 1));
    if (tensors[i].given) {
      if (!read_file(tensors[i].name, host, tensors[i].bytes)) {   // (no data: made up, and nothing checked)
        generate(tensors[i], i, host);
        missing++;
      }
      CHECK(cudaMemcpy(tensors[i].dev, host.data(), tensors[i].bytes, cudaMemcpyHostToDevice));
    }
  }
  if (missing) std::printf("%d inputs or weights have no data/ file: made up, outputs not checked\n", missing);
  int failed = 0;
  std::printf("%-40s %12s %12s\n", "kernel", "rel err", "ms");   // (max |got - want| / max |want|)
  std::vector<char> want, got;
  std::vector<float> ms(n_kernels);
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  for (int k = 0; k < n_kernels; k++) {   // (in order: each reads what the ones before wrote)
    launch(k);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
  }
  for (int k = 0; k < n_kernels; k++) {
    CHECK(cudaEventRecord(start));
    for (int r = 0; r < REPEAT; r++) launch(k);
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    CHECK(cudaEventElapsedTime(&ms[k], start, stop));
    ms[k] /= REPEAT;
  }
  for (int k = 0; k < n_kernels; k++) {   // (checked after the timing: outputs are rewritten the same)
    Tensor& t = tensors[kernels[k].output];
    double err = -1.0;
    if (!missing && read_file(t.name, want, t.bytes)) {
      got.resize(t.bytes);
      CHECK(cudaMemcpy(got.data(), t.dev, t.bytes, cudaMemcpyDeviceToHost));
      double diff = 0.0, scale = 0.0;
      for (size_t i = 0; i < elements(t); i++) {
        double a = value(t.dtype, got.data(), i), b = value(t.dtype, want.data(), i);
        if (std::isnan(a) != std::isnan(b)) diff = INFINITY;
        else if (!std::isnan(a) && a != b) diff = std::fmax(diff, std::fabs(a - b));
        if (std::isfinite(b)) scale = std::fmax(scale, std::fabs(b));
      }
      err = diff / (scale > 0 ? scale : 1.0);
      failed += !(err <= kernels[k].tolerance);
    }
    std::printf("%-40s %12.3g %12.4f\n", kernels[k].name, err, ms[k]);
  }
  float total = 0.0f;
  CHECK(cudaEventRecord(start));
  for (int r = 0; r < REPEAT; r++) for (int k = 0; k < n_kernels; k++) launch(k);
  CHECK(cudaEventRecord(stop));
  CHECK(cudaEventSynchronize(stop));
  CHECK(cudaEventElapsedTime(&total, start, stop));
  std::printf("%-40s %12s %12.4f\n", "model", failed ? "FAILED" : missing ? "unchecked" : "ok", total / REPEAT);
  return failed ? 1 : 0;
}
"""
