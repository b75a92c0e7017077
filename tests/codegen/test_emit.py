"""einfuse kernels: CUDA source per kernel that nvcc compiles, CPU sources, the manifest, refusals."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from typing import Any

import pytest
import torch
from tvm import tirx

import einfuse
from einfuse import zoo
from einfuse.codegen.backends import cpu as cpu_backend
from einfuse.codegen.loop_frames import serial_launch
from einfuse.codegen.loop_gpu import GPULoopBuilder
from einfuse.errors import EinfuseError
from einfuse.ir import parse
from tests.codegen.test_loop import _Causal
from tests.codegen.test_schedules import SOFTMAX
from tests.conftest import params, rel_err

NVCC = shutil.which("nvcc")


def _ptx(source: Path, arch: str) -> bool:
    import tvm
    from tvm.support import nvcc
    with tvm.target.Target({"kind": "cuda", "arch": arch}):   # (compile_cuda reads the current target)
        return len(nvcc.compile_cuda(source.read_text(), target_format="ptx", arch=arch, compiler="nvcc")) > 0


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
def test_every_mlp_kernel_compiles_with_nvcc_for_sm_80_and_sm_90(tmp_path: Path) -> None:
    model, args = zoo.build("mlp")
    manifest = json.loads(einfuse.kernels(model, args, target="cuda:sm_80", output=tmp_path).read_text())
    assert manifest["target"] == "cuda:sm_80" and len(manifest["kernels"]) == 3
    for k in manifest["kernels"]:
        (cu,) = k["files"]
        assert cu.endswith(".cu") and "__global__" in (tmp_path / cu).read_text()
        assert k["launch"].get("blockIdx.x") and k["launch"].get("threadIdx.x")
        assert k["roofline_ms"] is not None and k["roofline_ms"] > 0
        assert _ptx(tmp_path / cu, "sm_80") and _ptx(tmp_path / cu, "sm_90")


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("name, arch", [("gpt2", "sm_80"), ("llama", "sm_90"), ("bert", "sm_90"), ("vit", "sm_90"),
                                        ("mixtral", "sm_90"), ("convnet", "sm_90")])
def test_every_kernel_of_every_zoo_model_compiles_with_nvcc(name: str, arch: str, tmp_path: Path) -> None:
    """Each distinct kernel source, emitted for ``arch``, to PTX for it, and the harness's host
    program (``--harness``: its launches of every kernel)."""
    model, args = zoo.build(name)
    manifest = json.loads(einfuse.kernels(model, args, target=f"cuda:{arch}", output=tmp_path, harness=True).read_text())
    sources = {}   # (layers repeat kernels under other names: each distinct source once)
    for k in manifest["kernels"]:
        text = (tmp_path / k["files"][0]).read_text()
        sources.setdefault(text.replace(k["kernel"], "KERNEL"), tmp_path / k["files"][0])
    jobs = [(cu, arch) for cu in [*sources.values(), tmp_path / "main.cu"]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [f"{cu.name} {arch}: {err}" for (cu, arch), err in zip(jobs, pool.map(_nvcc, jobs)) if err]
    assert not failed, failed


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("fmt", ["q4_0", "int4-g128", "q8_0", "b1"])
def test_quantized_kernels_and_their_harness_compile_with_nvcc(fmt: str, tmp_path: Path) -> None:
    model, args = zoo.build("mlp")
    manifest = json.loads(einfuse.kernels(model, args, target="cuda:sm_90", output=tmp_path, harness=True,
                                          quantize=fmt).read_text())
    jobs = [(tmp_path / k["files"][0], "sm_90") for k in manifest["kernels"]] + [(tmp_path / "main.cu", "sm_90")]
    assert all(("weight_p" in cu.read_text() or "weight_q" in cu.read_text()) for cu, _ in jobs[:-1])   # (packed reads)
    failed = [f"{cu.name}: {err}" for cu, err in zip([cu for cu, _ in jobs], map(_nvcc, jobs)) if err]
    assert not failed, failed


def _nvcc(job: tuple[Path, str]) -> str:
    """nvcc's error output compiling one source to PTX (the host program: to an object), empty
    when it compiled."""
    cu, arch = job
    mode, suffix = ("-c", ".o") if cu.name == "main.cu" else ("-ptx", f".{arch}.ptx")
    out = subprocess.run([NVCC, mode, f"-arch={arch}", "-std=c++17", str(cu), "-o", str(cu.with_suffix(suffix))],
                         capture_output=True, text=True)
    return "" if out.returncode == 0 else out.stderr[-500:]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
def test_unfused_attention_and_softmax_kernels_compile_with_nvcc(tmp_path: Path) -> None:
    model, args = zoo.build("gpt2")
    manifest = json.loads(einfuse.kernels(model, args, target="cuda:h100", output=tmp_path,
                                          pipeline="unfused").read_text())
    kinds = {k["kind"] for k in manifest["kernels"]}
    assert "attention" in kinds
    (attention,) = [k for k in manifest["kernels"] if k["kind"] == "attention"][:1]
    assert _ptx(tmp_path / attention["files"][0], "sm_90")


def test_cpu_kernels_are_written_as_tir_and_assembly(tmp_path: Path) -> None:
    path = einfuse.kernels(parse(SOFTMAX), target="cpu", output=tmp_path)
    (kernel,) = json.loads(path.read_text())["kernels"]
    assert sorted(kernel["files"]) == [f"{kernel['kernel']}.s", f"{kernel['kernel']}.tir"]
    assert "T.prim_func" in (tmp_path / f"{kernel['kernel']}.tir").read_text()
    assert kernel["roofline_ms"] is None   # (the host has measured peaks, not a datasheet: see report())


@pytest.mark.parametrize("name", params(["mlp", "convnet", "gpt2", "llama", "bert", "vit", "mixtral"],
                                        slow=("gpt2", "llama", "bert", "vit")))
def test_cpu_kernels_of_every_zoo_model_are_written(name: str, tmp_path: Path) -> None:
    model, args = zoo.build(name)
    kernels = json.loads(einfuse.kernels(model, args, target="cpu", output=tmp_path).read_text())["kernels"]
    assert kernels and all((tmp_path / f).stat().st_size > 0 for k in kernels for f in k["files"])
    assert len(list(tmp_path.glob("*.s"))) == len(list(tmp_path.glob("*.tir"))) == len(kernels)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
def test_the_1pass_attention_compiles_for_the_gpu_a_thread_per_row(tmp_path: Path) -> None:
    args = tuple(torch.randn(1, 2, 100, 64) for _ in range(3))
    manifest = json.loads(einfuse.kernels(_Causal(), args, target="cuda:sm_90", output=tmp_path).read_text())
    (loop,) = [k for k in manifest["kernels"] if k["kind"] == "loop"]
    assert loop["launch"] == {"blockIdx.x": 4, "threadIdx.x": 64}   # 2 heads x 2 blocks of 64 queries
    assert _ptx(tmp_path / loop["files"][0], "sm_80") and _ptx(tmp_path / loop["files"][0], "sm_90")
    # K and V tiles (64 keys x 64 wide) through shared memory, copied by the block between two barriers
    source = (tmp_path / loop["files"][0]).read_text()
    tiles = re.findall(r"__shared__ alignas\(\d+\) float (\w+)\[4096\];", source)
    assert len(tiles) == 2 and source.count("__syncthreads()") == 2
    assert all(re.search(rf"{t}\[.*threadIdx\.x.*\] = ", source) for t in tiles)   # (each thread copies its share)


class _SerialThreads(GPULoopBuilder):
    """The GPU loop kernel with its blocks and threads as serial loops, so the CPU can run it:
    each thread stages a tile's K and V whole (it cannot wait for the others), with no barrier."""

    def launch(self, blocks: Any, rows: int) -> Any:
        self.row_count, self.thread, self.threads = 1, tirx.const(0, "int64"), 1
        return serial_launch(blocks, rows)

    def barrier(self) -> None:
        pass


@pytest.mark.parametrize("build", params(["causal", "gpt2"], slow=("gpt2",)))
def test_the_gpu_attention_code_computes_attention(build: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What each GPU thread computes, run on the CPU (threads as loops) against torch."""
    monkeypatch.setattr(cpu_backend, "LoopBuilder", _SerialThreads)
    model, args = (_Causal(), tuple(torch.randn(1, 2, 100, 64) for _ in range(3))) if build == "causal" \
        else zoo.build("gpt2", seq=70)
    compiled = einfuse.compile(model, args, cache_dir=tmp_path)
    loops = [k.name for k in compiled.kernels if k.kind == "loop"]
    functions = compiled.source("tir").split("@T.prim_func")
    assert loops and all("T.vectorized" not in f for f in functions if f"def {loops[0]}(" in f)   # (one row each)
    with torch.no_grad():
        want = model(*args)
    assert rel_err(compiled(*args).numpy(), want.numpy()) <= 1e-4


def test_compile_for_the_accelerator_points_at_kernels_and_simulate() -> None:
    with pytest.raises(EinfuseError, match="einfuse.kernels emits its C and einfuse.simulate runs it"):
        einfuse.compile(parse(SOFTMAX), target="accel:fusemax")


def test_a_model_compiled_for_a_gpu_is_inspectable_where_no_gpu_is() -> None:
    import tvm
    model, args = zoo.build("mlp")
    compiled = einfuse.compile(model, args, target="cuda:sm_80")
    assert compiled.source("cuda").count("__global__") >= 3 and "k0_gelu" in compiled.source("tir")
    assert [k.kind for k in compiled.kernels] == ["epilogue"] * 3
    if not tvm.cuda(0).exist:
        with pytest.raises(EinfuseError, match="compiled for cuda:sm_80 and this machine has no GPU"):
            compiled(*args)
    with pytest.raises(EinfuseError, match="no CUDA source: this model was compiled for cpu"):
        einfuse.compile(parse(SOFTMAX)).source("cuda")


@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_as_a_dry_run() -> None:
    from benchmarks.gpu import main
    rows = main(["--dry-run", "--models", "mlp", "--lengths", "128", "--repeat", "2"])
    assert [r["workload"] for r in rows] == ["mlp", "attn128", "attn128c"]
    assert all(r["rel_err"] <= 1e-5 and r["einfuse_ms"] > 0 and r["torch_ms"] > 0 for r in rows)
