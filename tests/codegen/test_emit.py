"""einfuse kernels: CUDA source per kernel that nvcc compiles, CPU sources, the manifest, refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import einfuse
from einfuse import zoo
from einfuse.errors import EinfuseError
from einfuse.ir import parse
from tests.codegen.test_schedules import SOFTMAX

NVCC = shutil.which("nvcc")


def _ptx(source: Path, arch: str) -> bool:
    import tvm
    from tvm.support import nvcc
    with tvm.target.Target({"kind": "cuda", "arch": arch}):   # (compile_cuda reads the current target)
        return len(nvcc.compile_cuda(source.read_text(), target_format="ptx", arch=arch, compiler="nvcc")) > 0


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


def test_loop_kernels_and_the_accelerator_are_refused_naming_what_is_missing(tmp_path: Path) -> None:
    model, args = zoo.build("gpt2")
    with pytest.raises(EinfuseError, match=r"no GPU schedule for loop kernels yet \(k\d+_attn.*-p unfused"):
        einfuse.kernels(model, args, target="cuda:h100", output=tmp_path)
    with pytest.raises(EinfuseError, match="no lowering for accel:fusemax yet"):
        einfuse.kernels(parse(SOFTMAX), target="accel:fusemax", output=tmp_path)
    with pytest.raises(EinfuseError, match="code is emitted, not run here"):
        einfuse.compile(parse(SOFTMAX), target="cuda:h100")
