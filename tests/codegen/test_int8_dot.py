"""The ``int8-dot`` kernel (``quantize{compute=int8}``): compiled, on each ISA's code path (AVX-512
VNNI; AVX2's ``vpmaddubsw``), against the interpreter running the same IR and against float32 torch
within the format's error, with its element-wise epilogues; a NaN in a row makes that row's outputs
NaN, as in torch; the AVX-VNNI kernel builds.

A layer reading the model's input quantizes exactly what the interpreter does (:data:`EXACT`). A
layer reading a computed activation may not: the kernel computes it in float32 (its sums in another
order, GELU's erf approximated), and a value that close to a rounding boundary of the int8
quantization rounds the other way, moving some outputs by one step of that block's scale
(about 1e-3 of the largest: :data:`FLIPPED`), rarely, more often the more rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse.ir import interpret
from einfuse.targets import host_cpu, int8_isa

from ..conftest import rel_err

EXACT = 2e-6     # (float32's rounding of the per-block scaling and sum)
FLIPPED = 1e-2   # (an int8 activation rounded the other way: a wrong layout or scale errs by O(1))
INTRINSIC = {"avx512": "vpdpbusd.512", "avxvnni": "vpdpbusd.256", "avx2": "pmadd.ub.sw"}


@pytest.fixture(params=["avx2", "avx512"])
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The ISA forced (``EINFUSE_CPU_ISA``): the integer dot product it gives here, or None."""
    monkeypatch.setenv("EINFUSE_CPU_ISA", request.param)
    host_cpu.cache_clear()
    yield int8_isa(host_cpu())
    host_cpu.cache_clear()


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()


def linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(256, 64).eval()


@pytest.mark.parametrize("fmt, rows", [("q4_0", 1), ("q4_0", 3), ("int4-g32", 16), ("int4-g64", 3)])
def test_compiled_matches_the_interpreter_and_float32(fmt: str, rows: int, isa: str | None, tmp_path: Path,
                                                      rng: np.random.Generator) -> None:
    model = linear()
    x = torch.from_numpy(rng.standard_normal((rows, 256)).astype(np.float32))
    x[0, 32:64] = 0   # (a block of zeros)
    compiled = einfuse.compile(model, (x,), quantize=f"format={fmt},compute=int8", cache_dir=tmp_path, tuning_db=False)
    kinds = [k.kind for k in compiled.kernels]
    assert kinds == ["int8-dot"] if isa else "int8-dot" not in kinds   # (the bias on the accumulators)
    if isa:
        assert INTRINSIC[isa] in compiled.source("tir")
    got = compiled(x).numpy()
    assert rel_err(got, interpret(compiled.ir, {compiled.inputs[0]: x.numpy()})[compiled.outputs[0]]) <= EXACT
    with torch.no_grad():
        assert rel_err(got, model(x).numpy()) <= 0.2


class Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(256, 64), torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.a(x))
        return torch.nn.functional.silu(self.b(h)) + h


@pytest.mark.parametrize("rows", [1, 5])
def test_bias_activation_and_residual_run_on_the_accumulators(rows: int, isa: str | None, tmp_path: Path,
                                                              rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.from_numpy(rng.standard_normal((rows, 256)).astype(np.float32))
    compiled = einfuse.compile(model, (x,), quantize="format=q4_0,compute=int8", cache_dir=tmp_path, tuning_db=False)
    if isa:   # (two kernels: bias and GELU; bias, SiLU and the residual add)
        assert [(k.kind, k.output) for k in compiled.kernels] == [("int8-dot", "gelu"), ("int8-dot", compiled.outputs[0])]
    got = compiled(x).numpy()
    assert rel_err(got, interpret(compiled.ir, {compiled.inputs[0]: x.numpy()})[compiled.outputs[0]]) <= FLIPPED
    with torch.no_grad():
        assert rel_err(got, model(x).numpy()) <= 0.2


def test_one_compile_with_symbolic_rows_serves_any_count(isa: str | None, tmp_path: Path,
                                                          rng: np.random.Generator) -> None:
    """One row (its own tiling), a few (a register tile and an overhang), 512 (the activations
    quantized in parallel)."""
    model = linear()
    rows = torch.export.Dim("rows", min=1, max=1024)
    compiled = einfuse.compile(model, (torch.randn(4, 256),), quantize="format=q4_0,compute=int8",
                               dynamic_shapes={"input": {0: rows}}, cache_dir=tmp_path, tuning_db=False)
    kinds = [k.kind for k in compiled.kernels]
    assert kinds == ["int8-dot"] if isa else "int8-dot" not in kinds
    for count in (1, 7, 512):
        x = rng.standard_normal((count, 256)).astype(np.float32)
        want = interpret(compiled.ir, {compiled.inputs[0]: x})[compiled.outputs[0]]
        assert rel_err(compiled(torch.from_numpy(x)).numpy(), want) <= EXACT


def test_a_batch_of_one_is_read_where_it_is(isa: str | None, tmp_path: Path, rng: np.random.Generator) -> None:
    """``[1, rows, k]`` activations (a language model's batch of one): read where they are, no copy."""
    x = torch.from_numpy(rng.standard_normal((1, 5, 256)).astype(np.float32))
    compiled = einfuse.compile(linear(), (x,), quantize="format=q4_0,compute=int8", cache_dir=tmp_path, tuning_db=False)
    assert [k.kind for k in compiled.kernels].count("int8-dot") == (1 if isa else 0)
    assert not any(t.name.endswith("_rows") for t in compiled.ir.tensors)
    want = interpret(compiled.ir, {compiled.inputs[0]: x.numpy()})[compiled.outputs[0]]
    assert rel_err(compiled(x).numpy(), want) <= EXACT


def test_a_nan_makes_its_row_nan(isa: str | None, tmp_path: Path, rng: np.random.Generator) -> None:
    model = mlp()
    x = torch.from_numpy(rng.standard_normal((3, 256)).astype(np.float32))
    compiled = einfuse.compile(model, (x,), quantize="format=q4_0,compute=int8", cache_dir=tmp_path, tuning_db=False)
    x[1, 100] = float("nan")
    got = compiled(x).numpy()
    assert np.isnan(got[1]).all() and np.isfinite(got[[0, 2]]).all()


def test_the_kernel_builds_for_avx_vnni(rng: np.random.Generator) -> None:
    """On an AVX2 host with AVX-VNNI (Alder Lake): the 8-lane ``{vex} vpdpbusd ymm``, no zmm
    (built, not run: this host may lack it)."""
    from dataclasses import replace

    from einfuse.codegen.backends import backend_for
    from einfuse.codegen.backends.cpu import CPUBackend
    from einfuse.codegen.int8_dot import int8_function
    from einfuse.codegen.lower import SizeVars
    from einfuse.ir import parse
    from einfuse.ir.kernels import kernels_of
    from einfuse.passes import PassManager, Quantize, pipeline
    from einfuse.passes.manager import PassContext
    from einfuse.targets import Target
    alder = Target("cpu", {"kind": "llvm", "mcpu": "alderlake", "num-cores": 2}, 2, 32, 16)
    assert int8_isa(alder) == "avxvnni" and backend_for("cpu").kind == "cpu"
    c = replace(parse("cascade l\nrank M=3, K=256, N=64\ntensor X[M,K] input f32\ntensor W[N,K] param f32\n"
                      "tensor Y[M,N] output f32\nY[m,n] = X[m,k] * W[n,k]\n"), params={"W": rng.standard_normal((64, 256))})
    c = PassManager([Quantize("q4_0", compute="int8"), *pipeline(CPUBackend.pipeline)]).run(c, PassContext(alder))
    (k,) = [k for k in kernels_of(c) if k.kind == "int8-dot"]
    asm = CPUBackend(alder).compiled_alone(int8_function(c, k, SizeVars(), alder), k.name).mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "%ymm" in asm and "zmm" not in asm
