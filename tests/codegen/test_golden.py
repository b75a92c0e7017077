"""Golden tests for generated code: the scheduled TIR (TVMScript text) of one kernel of every
kernel kind and schedule path, for every target kind, compared exactly with the text recorded
in ``tests/golden/<case>.<target>.tir``.

A kernel is made as ``einfuse.compile`` / ``einfuse kernels`` make it (``optimized``, then
``laid_out``: weights transposed and packed, operands materialised, kernels grouped) and
scheduled by its backend's ``kernel_function`` (``codegen/backends``) (``codegen.accel.kernel_function`` for the
accelerator: its tensorized PrimFunc). Targets: the CPU under each vector ISA (``avx2``,
``avx512``), ``cuda`` (``cuda:sm_80``, scheduled by dlight; no GPU needed) and ``accel``
(``accel:fusemax``).

The CPU goldens do not depend on the host: the test forces ``EINFUSE_CPU_ISA`` itself (whatever
``--isa`` the session has) and pins what ``host_cpu`` reads of the machine (cores, cache sizes,
LLVM's CPU name) to :data:`PINNED`, so that the text (which holds the core count in a GEMV's
parallel loop and tiles chosen from the cache sizes) is the same on any host.

A change to the generated code is recorded **on purpose**: ``EINFUSE_UPDATE_GOLDEN=1 python3 -m
pytest tests/codegen/test_golden.py`` rewrites the files instead of comparing them; review
``git diff tests/golden`` and commit it with the change that made it.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

import einfuse.targets
from einfuse.api import laid_out, optimized
from einfuse.codegen import accel
from einfuse.codegen.backends import backend_for
from einfuse.codegen.lower import SizeVars
from einfuse.ir import Cascade, parse
from einfuse.targets import ISA_VARIABLE, Target, host_cpu

GOLDEN = Path(__file__).parents[1] / "golden"
UPDATE = "EINFUSE_UPDATE_GOLDEN"
DIFF_LINES = 60

ISAS = ("avx2", "avx512")
TARGETS = {"avx2": "cpu", "avx512": "cpu", "cuda": "cuda:sm_80", "accel": "accel:fusemax"}
#: what the CPU target takes from the host, pinned (the ISA's vector width and registers are forced)
PINNED = {"cores": 4, "cache_bytes": 1 << 20, "llc_bytes": 32 << 20, "l1_bytes": 32 << 10}
LLVM = {"avx2": {"mcpu": "haswell"}, "avx512": {"mcpu": "skylake-avx512", "mattr": ["-prefer-256-bit"]}}


@dataclass(frozen=True)
class Case:
    """A cascade, the pipeline it is optimized with, and the kind of the kernel writing ``output``."""

    text: str
    output: str
    kind: str
    pipeline: str = "default"
    targets: tuple[str, ...] = tuple(TARGETS)


GEMV_Q = """cascade gemvq
rank M=1, K=1024, N=1024
tensor X[M,K] input f32
tensor W[N,K] param f32
tensor Y[M,N] output f32
Y[m,n] = X[m,k] * W[n,k]
"""

GEMM = """cascade gemm
rank M=64, K=256, N={cols}
tensor X[M,K] input f32
tensor W[K,N] {role} f32
tensor Y[M,N] output f32
Y[m,n] = X[m,k] * W[k,n]
"""

ATTENTION = """cascade attention
rank B=1, H=2, S=128, S_2=128, E=64, F=64
tensor Q[B,H,S,E] input f32
tensor K[B,H,S_2,E] input f32
tensor V[B,H,S_2,F] input f32
tensor O[B,H,S,F] output f32
QK[b,h,s,s_2] = Q[b,h,s,e] * K[b,h,s_2,e] * 0.125
MX[b,h,s] = QK[b,h,s,s_2] :: reduce[s_2] max
EX[b,h,s,s_2] = exp(QK[b,h,s,s_2] - MX[b,h,s])
SM[b,h,s] = EX[b,h,s,s_2]
PR[b,h,s,s_2] = EX[b,h,s,s_2] / SM[b,h,s]
O[b,h,s,f] = PR[b,h,s,s_2] * V[b,h,s_2,f]
"""

CASES = {
    "map": Case("""cascade map
rank P=64, M=256
tensor A[P,M] input f32
tensor G[P] input f32
tensor B[P,M] output f32
B[p,m] = exp(A[p,m] - G[p])
""", "B", ""),
    "reduce": Case("""cascade reduce
rank R=64, K=256
tensor X[R,K] input f32
tensor S[R] output f32
S[r] = X[r,k]
""", "S", ""),
    # panels copied out per call (AVX2: 24-wide tiles, padded); a weight's panels packed once
    # (codegen/layout.py pack_weights: columns the tile divides on either ISA)
    "gemm": Case(GEMM.format(role="input", cols=256), "Y", ""),
    "packed_gemm": Case(GEMM.format(role="param", cols=192), "Y", "", targets=ISAS),
    "gemv": Case("""cascade gemv
rank M=1, K=1024, N=1024
tensor X[M,K] input f32
tensor W[K,N] param f32
tensor Y[M,N] output f32
Y[m,n] = X[m,k] * W[k,n]
""", "Y", ""),
    # (a quantized weight: dequantized a few rows at a time in the GEMV, a panel at a time on tiles)
    "dequant_gemv": Case(GEMV_Q, "Y", "dequant", "default,quantize{format=q4_0}", targets=(*ISAS, "cuda")),
    "dequant_gemm": Case(GEMV_Q.replace("M=1,", "M=64,"), "Y", "dequant", "default,quantize{format=q4_0}",
                         targets=ISAS),
    # (compute=int8: activations quantized per block, integer dot products, the bias on the
    # accumulators; AVX2's vpmaddubsw path alone: the pinned AVX-512 CPU, skylake-avx512, has no VNNI)
    "int8_gemv": Case(GEMV_Q.replace("tensor Y[M,N] output f32\nY[m,n] = X[m,k] * W[n,k]",
                                     "tensor B[N] param f32\ntensor Y[M,N] output f32\nZ[m,n] = X[m,k] * W[n,k]\n"
                                     "Y[m,n] = Z[m,n] + B[n]"),
                      "Y", "int8-dot", "default,quantize{format=q4_0,compute=int8}", targets=("avx2",)),
    "int8_gemm": Case(GEMV_Q.replace("M=1,", "M=16,"), "Y", "int8-dot", "default,quantize{format=int4-g64,compute=int8}",
                      targets=("avx2",)),
    "epilogue": Case("""cascade epilogue
rank M=64, K=256, N=256
tensor X[M,K] input f32
tensor W[K,N] param f32
tensor B[N] param f32
tensor Y[M,N] output f32
Z[m,n] = X[m,k] * W[k,n]
U[m,n] = Z[m,n] + B[n]
Y[m,n] = gelu_tanh(U[m,n])
""", "Y", "epilogue"),
    "softmax": Case("""cascade softmax
rank R=64, K=256
tensor X[R,K] input f32
tensor Y[R,K] output f32
M[r] = X[r,k] :: reduce[k] max
E[r,k] = exp(X[r,k] - M[r])
S[r] = E[r,k]
Y[r,k] = E[r,k] / S[r]
""", "Y", "rows"),
    "layernorm": Case("""cascade layernorm
rank R=64, K=256
tensor X[R,K] input f32
tensor G[K] param f32
tensor Y[R,K] output f32
MU[r] = X[r,k] * 0.00390625
D[r,k] = X[r,k] - MU[r]
V[r] = D[r,k] * D[r,k] * 0.00390625
Y[r,k] = D[r,k] / sqrt(V[r] + 0.00001) * G[k]
""", "Y", "rows"),
    # (an accelerator's phases go through DRAM: no attention kernel there)
    "attention": Case(ATTENTION, "O", "attention", "unfused", targets=(*ISAS, "cuda")),
    "loop": Case(ATTENTION, "O", "loop"),
}


def with_params(c: Cascade) -> Cascade:
    """``c`` with zeros for its parameters (the packed layout needs their data, not their values)."""
    size = {r.name: int(r.size) for r in c.ranks}
    return replace(c, params={t.name: np.zeros([size[r.rank] for r in t.ranks], np.float32)
                              for t in c.tensors if t.role == "param"})


def scheduled_tir(case: Case, target: Target) -> str:
    """The scheduled TIR of the kernel of ``case`` writing its output, built as compile builds it."""
    c = laid_out(optimized(with_params(parse(case.text)), pipeline=case.pipeline, target=target.name), target)
    (index,) = [i for i, k in enumerate(c.groups) if k.output == case.output]
    kernel = c.groups[index]
    assert kernel.kind == case.kind, f"kernel {kernel.name} is {kernel.kind or 'single'}, not {case.kind or 'single'}"
    if target.kind == "accel":
        return accel.kernel_function(c, kernel, SizeVars(), target, index).func.script()
    return backend_for(target).kernel_function(c, kernel, SizeVars()).script()


@contextmanager
def pinned_target(key: str) -> Iterator[Target]:
    """The target ``key`` names; for a CPU ISA, ``host_cpu`` under that ISA with the host's own
    numbers pinned (:data:`PINNED`), the session's ISA and ``host_cpu`` restored after."""
    if key not in ISAS:
        yield Target.parse(TARGETS[key])
        return
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(ISA_VARIABLE, key)
            host_cpu.cache_clear()
            tvm = {"kind": "llvm", **LLVM[key], "num-cores": PINNED["cores"]}
            pinned = replace(host_cpu(), tvm=tvm, **PINNED)
            mp.setattr(einfuse.targets, "host_cpu", lambda: pinned)   # (Target.parse("cpu") in the passes too)
            yield Target.parse("cpu")
    finally:
        host_cpu.cache_clear()


def check_golden(path: Path, text: str) -> None:
    """``text`` equals the file at ``path`` (a unified diff if not); with ``$EINFUSE_UPDATE_GOLDEN``
    set, the file is rewritten instead."""
    text = text.rstrip("\n") + "\n"
    if os.environ.get(UPDATE) == "1":
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"no golden file {path}: record it with {UPDATE}=1", pytrace=False)
    want = path.read_text()
    if want != text:
        diff = list(difflib.unified_diff(want.splitlines(), text.splitlines(), str(path), "generated", lineterm=""))
        more = f"\n... ({len(diff) - DIFF_LINES} more lines)" if len(diff) > DIFF_LINES else ""
        pytest.fail(f"generated code differs from {path.name} (if on purpose: {UPDATE}=1 rewrites it):\n"
                    + "\n".join(diff[:DIFF_LINES]) + more, pytrace=False)


@pytest.mark.parametrize("name, key", [(n, k) for n, case in CASES.items() for k in case.targets])
def test_scheduled_tir_matches_its_golden(name: str, key: str) -> None:
    with pinned_target(key) as target:
        text = scheduled_tir(CASES[name], target)
    check_golden(GOLDEN / f"{name}.{key}.tir", text)


def test_every_golden_file_has_its_case() -> None:
    """A golden left behind by a renamed or removed case fails here, not silently."""
    expected = {f"{n}.{k}.tir" for n, case in CASES.items() for k in case.targets}
    assert {p.name for p in GOLDEN.glob("*.tir")} <= expected
