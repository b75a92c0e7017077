"""``einfuse kernels --harness``: a CUDA directory that builds with nvcc alone, whose host program
is checked here by building it against a CPU stub of the kernels (no GPU on this machine)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from einfuse import zoo
from einfuse.api import kernels
from einfuse.codegen.harness import launch_from_record
from einfuse.errors import EinfuseError
from einfuse.ir import interpret

from ..conftest import load, rel_err

STUB = Path(__file__).parent / "harness_stub"
NVCC = shutil.which("nvcc")
_SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\)\s*\{')
_SUPPORT = r"""#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <cuda_fp16.h>
typedef unsigned char uchar;   // (TVM's name in the kernels' signatures)
struct Tensor { const char* name; size_t bytes; const char* dtype; bool given; void* dev; };
extern Tensor tensors[];
extern int n_tensors;
static Tensor& find(const char* name) {
  for (int i = 0; i < n_tensors; i++) if (!std::strcmp(tensors[i].name, name)) return tensors[i];
  std::fprintf(stderr, "stub: no tensor %s\n", name); std::exit(3);
}
static void expect(const char* name, const char* workspace, const void* p) {   // (a tensor's, or the kernel's own)
  for (int i = 0; i < n_tensors; i++)
    if (!std::strcmp(tensors[i].name, name) || !std::strcmp(tensors[i].name, workspace)) {
      if (tensors[i].dev == p) return;
      break;
    }
  std::fprintf(stderr, "stub: argument %s is not its buffer\n", name); std::exit(3);
}
static void produce(const char* name, void* p) {   // (the reference itself, perturbed if asked)
  Tensor& t = find(name);
  std::string path = std::string("data/") + name + ".bin";
  if (FILE* f = std::fopen(path.c_str(), "rb")) { std::fread(p, 1, t.bytes, f); std::fclose(f); }
  const char* bad = std::getenv("STUB_PERTURB");
  if (bad && !std::strcmp(bad, name)) ((float*)p)[0] += 1.0f;
}
"""


def stub_kernels(directory: Path) -> str:
    """C++ definitions of the kernels, read from each ``.cu`` file's own signature: each checks
    that every argument is the buffer of the tensor it names and writes its output's reference."""
    manifest = json.loads((directory / "manifest.json").read_text())
    out = [_SUPPORT]
    for entry in manifest["kernels"]:
        (source,) = [f for f in entry["files"] if f.endswith(".cu")]
        for function, params in _SIGNATURE.findall((directory / source).read_text()):
            body, declared = [], []
            for param in (p.strip() for p in params.split(",")):
                name = param.split()[-1]
                tensor = name[: -len("_ptr")]
                declared.append(param.replace("__restrict__", ""))
                body.append(f'  expect("{tensor}", "{entry["kernel"]}__{tensor}", {name});')
                if tensor == entry["output"]:
                    body.append(f'  produce("{tensor}", {name});')
            out.append(f'extern "C" void {function}({", ".join(declared)}) {{\n' + "\n".join(body) + "\n}\n")
    return "\n".join(out)



def build_stub(directory: Path) -> Path:
    (directory / "stub_kernels.cpp").write_text(stub_kernels(directory))
    subprocess.run(["g++", "-std=c++17", "-O1", f"-I{STUB}", "-x", "c++", "main.cu", "-x", "none",
                    "stub_kernels.cpp", "-o", "run_stub"], cwd=directory, check=True, capture_output=True)
    return directory / "run_stub"


def mlp_directory(tmp_path: Path, data: bool = True, quantize: str | None = None) -> Path:
    model, args = zoo.build("mlp")
    kernels(model, args, target="cuda:h100", output=tmp_path / "k", harness=True, data=data, quantize=quantize)
    return tmp_path / "k"


@pytest.mark.parametrize("quantize", [None, "q4_0"])   # (q4_0: u8 and f16 weights)
def test_the_host_program_passes_each_kernel_its_buffers_and_checks_their_outputs(tmp_path: Path,
                                                                                  quantize: str | None) -> None:
    directory = mlp_directory(tmp_path, quantize=quantize)
    run = build_stub(directory)
    ok = subprocess.run([str(run)], cwd=directory, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[-1].split()[:2] == ["model", "ok"]
    manifest = json.loads((directory / "manifest.json").read_text())
    errors = {line.split()[0]: float(line.split()[1]) for line in lines[1:-1]}
    assert errors == {k["kernel"]: 0.0 for k in manifest["kernels"]}
    wrong = manifest["kernels"][1]["output"]
    bad = subprocess.run([str(run)], cwd=directory, capture_output=True, text=True, env={"STUB_PERTURB": wrong})
    assert bad.returncode == 1 and bad.stdout.splitlines()[-1].split()[:2] == ["model", "FAILED"]
    assert float(bad.stdout.splitlines()[2].split()[1]) > 0.0   # (the second kernel's error)


def test_without_data_the_inputs_are_made_up_and_nothing_is_checked(tmp_path: Path) -> None:
    directory = mlp_directory(tmp_path, data=False)
    assert not (directory / "data").exists()
    out = subprocess.run([str(build_stub(directory))], cwd=directory, capture_output=True, text=True)
    assert out.returncode == 0 and "made up, outputs not checked" in out.stdout


def test_the_manifest_records_each_call(tmp_path: Path, rng: np.random.Generator) -> None:
    """Arguments with shapes, dtypes and row-major strides; the records round-trip; the data are
    the inputs given, the weights and the float64 references, in their dtypes."""
    directory = mlp_directory(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    for entry in manifest["kernels"]:
        (call,) = entry["calls"]
        launch = launch_from_record(call)
        assert launch.function == call["function"] and len(launch.args) == len(call["args"]) >= 2
        assert all(g >= 1 for g in launch.grid + launch.block) and entry["output"] in launch.args
        for arg in call["args"]:
            assert arg["strides"] == [int(np.prod(arg["shape"][d + 1:])) for d in range(len(arg["shape"]))]
            size = (directory / "data" / f"{arg['name']}.bin").stat().st_size
            assert size == np.prod(arg["shape"]) * {"f32": 4, "i64": 8}[arg["dtype"]]
    assert manifest["data_bytes"] == sum(f.stat().st_size for f in (directory / "data").iterdir())


def test_a_cascade_gets_random_inputs_and_its_references(tmp_path: Path, rng: np.random.Generator) -> None:
    c = load("mlp_block")
    with pytest.raises(EinfuseError, match="weight 'W' has no data"):
        kernels(c, target="cuda:sm_80", output=tmp_path, harness=True, data=True)
    c = replace(c, params={"W": rng.standard_normal((32, 24)), "b": rng.standard_normal(24)})
    kernels(c, target="cuda:sm_80", output=tmp_path, harness=True, data=True)
    x = np.fromfile(tmp_path / "data" / "X.bin", dtype=np.float32).reshape(8, 32)
    want = interpret(c, {"X": x})["G"]
    got = np.fromfile(tmp_path / "data" / "G.bin", dtype=np.float32).reshape(8, 24)
    assert x.std() > 0.5 and rel_err(got, want) <= 1e-6   # (random normal inputs; the reference of them)


def test_a_harness_is_for_cuda_targets(tmp_path: Path) -> None:
    with pytest.raises(EinfuseError, match="a harness runs CUDA kernels"):
        kernels(load("mlp_block"), target="cpu", output=tmp_path, harness=True)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed here")
def test_make_builds_the_kernels_and_their_host_program_with_nvcc(tmp_path: Path) -> None:
    """``make`` links every kernel with ``main.cu`` (every zoo model's harness compiles: test_emit.py);
    quantized, each kernel's source carries TVM's half-precision helpers."""
    directory = mlp_directory(tmp_path, data=False, quantize="q4_0")
    built = subprocess.run(["make", "ARCH=sm_90"], cwd=directory, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (directory / "run").is_file()


def test_the_gpu_directory_holds_each_workload_its_specs_and_the_runner(tmp_path: Path) -> None:
    """``benchmarks.gpu_dir``: a workload per directory with its harness (data where asked), the
    specs and the runner, which imports nothing of einfuse (the GPU machine has no TVM)."""
    import ast

    from benchmarks.gpu_dir import LIMIT, prepare, workloads
    specs = [s for s in workloads([256], {256}) if s["kind"] == "attention"]
    size = prepare(tmp_path, "cuda:h200", specs)
    assert 0 < size <= LIMIT and json.loads((tmp_path / "workloads.json").read_text()) == specs
    for spec in specs:
        assert (tmp_path / spec["name"] / "main.cu").is_file() and (tmp_path / spec["name"] / "data").is_dir()
    tree = ast.parse((tmp_path / "gpu_run.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "argparse", "json", "subprocess", "sys", "pathlib", "typing", "torch"}
    run = build_stub(tmp_path / specs[1]["name"])   # (the causal one)
    assert subprocess.run([str(run)], cwd=tmp_path / specs[1]["name"], capture_output=True).returncode == 0


@pytest.mark.parametrize("source, script, message", [
    ('extern "C" __global__ void f(float* __restrict__ x_ptr) {}\nextern "C" __global__ void g(float* y_ptr) {}',
     "", "2 device functions for 1 launch nests"),
    ('extern "C" __global__ void f(float* __restrict__ x_ptr, int n) {}', "", "is not a tensor"),
    ('extern "C" __global__ void f(float* __restrict__ x_ptr) {}',
     'for i in T.thread_binding(n, thread="threadIdx.x"):', "is not a constant"),
    ('extern "C" __global__ void __launch_bounds__(128) f(float* __restrict__ x_ptr) {}',
     'for i in T.thread_binding(64, thread="threadIdx.x"):', "are not its __launch_bounds__"),
    ('extern "C" __global__ void f(float* __restrict__ x_ptr) {\n  extern __shared__ uchar buf_dyn_shmem[];\n}', "",
     "dynamic shared memory"),
], ids=["two-functions", "size-argument", "symbolic-extent", "launch-bounds", "dynamic-shared"])
def test_a_launch_the_harness_cannot_make_is_refused_naming_the_kernel(source: str, script: str, message: str) -> None:
    from einfuse.codegen.harness import launches
    from einfuse.errors import CompileError
    from einfuse.ir.kernels import Kernel
    with pytest.raises(CompileError, match=f"kernel k0_x: .*{message}"):
        launches(Kernel("k0_x", "x", (), (), ()), script, source)


def test_launches_read_each_device_functions_nest_and_the_kernels_workspaces() -> None:
    """A kernel TVM splits in two device functions (a top-k's), passing a buffer between them."""
    from einfuse.codegen.harness import Workspace, launches
    from einfuse.ir.kernels import Kernel
    source = ('extern "C" __global__ void __launch_bounds__(32) k1_t_kernel_1(float* __restrict__ t_ptr, '
              'float* __restrict__ w_ptr) {\n}\nextern "C" __global__ void __launch_bounds__(64) k1_t_kernel('
              'float* __restrict__ w_ptr, float* __restrict__ x_ptr) {\n}')
    script = ('    w = T.sblock_alloc_buffer((T.int64(24), T.int64(6)))\n'
              '    for a in T.thread_binding(T.int64(2), thread="blockIdx.x"):\n'
              '        for b in T.thread_binding(T.int64(64), thread="threadIdx.x"):\n'
              '    for a in T.thread_binding(T.int64(3), thread="blockIdx.x"):\n'
              '        for b in T.thread_binding(T.int64(32), thread="threadIdx.x"):\n')
    calls, workspaces = launches(Kernel("k1_t", "t", (), (), ("x",)), script, source)
    assert workspaces == [Workspace("k1_t__w", (24, 6), "f32")]
    assert [(c.function, c.grid, c.block, c.args) for c in calls] == [
        ("k1_t_kernel", (2, 1, 1), (64, 1, 1), ("k1_t__w", "x")), ("k1_t_kernel_1", (3, 1, 1), (32, 1, 1), ("t", "k1_t__w"))]


def test_a_launch_reads_grid_block_and_arguments() -> None:
    from einfuse.codegen.harness import launch_from_record, launches
    from einfuse.ir.kernels import Kernel
    source = 'extern "C" __global__ void __launch_bounds__(128) k0_y_kernel(float* __restrict__ y_ptr, float* __restrict__ x_ptr) {'
    script = ('for a in T.thread_binding(T.int64(32), thread="blockIdx.x"):\n for b in T.thread_binding(4, thread="blockIdx.y"):\n'
              '  for c in T.thread_binding(128, thread="threadIdx.x"):\n   for d in T.thread_binding(2, thread="vthread.x"):')
    (got,), workspaces = launches(Kernel("k0_y", "y", (), (), ("x",)), script, source)
    assert workspaces == []
    assert (got.function, got.grid, got.block, got.shared_bytes, got.args) == ("k0_y_kernel", (32, 4, 1), (128, 1, 1), 0, ("y", "x"))
    record = {"function": got.function, "grid": list(got.grid), "block": list(got.block), "shared_bytes": 0,
              "args": [{"name": "y"}, {"name": "x"}]}
    assert launch_from_record(json.loads(json.dumps(record))) == got
