"""``quantize{compute=int8}``: the IR it writes computes, in the interpreter, the int8 arithmetic of
ONNX Runtime's ``MatMulNBits accuracy_level=4`` (written here in numpy); what keeps the float
contraction, and why."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Iterator

import numpy as np
import pytest

from einfuse.errors import EinfuseError
from einfuse.ir import Cascade, interpret, parse
from einfuse.ir.quant_formats import quantize_weight
from einfuse.passes import PassManager, Quantize
from einfuse.passes.manager import PassContext
from einfuse.passes.quantize_int8 import integers, lanes
from einfuse.targets import Target, host_cpu, int8_isa

from ..conftest import rel_err

LINEAR = """cascade lin
rank M=3, K={k}, N={n}
tensor X[M,K] input f32
tensor W[N,K] param f32
tensor Y[M,N] output f32
Y[m,n] = X[m,k] * W[n,k]
"""
BLOCK = {"q4_0": 32, "int4-g32": 32, "int4-g64": 64, "int4-g128": 128}


@pytest.fixture
def int8_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The host as a target with an integer dot product: on an AVX-512 CPU without VNNI (or an
    AVX2 CPU that ``--isa other`` makes AVX-512), its AVX2 subset (the ``vpmaddubsw`` path), as
    ``--isa avx2`` would give; the host's target is read again either side."""
    if int8_isa(host_cpu()) is None:
        monkeypatch.setenv("EINFUSE_CPU_ISA", "avx2")
        host_cpu.cache_clear()
    assert int8_isa(host_cpu()) is not None
    yield
    monkeypatch.undo()
    host_cpu.cache_clear()


def linear(rng: np.random.Generator, k: int = 256, n: int = 32) -> Cascade:
    return replace(parse(LINEAR.format(k=k, n=n)), params={"W": rng.standard_normal((n, k))})


def int8_pass(c: Cascade, fmt: str, target: str = "cpu", **options: str) -> tuple[Cascade, Counter]:
    manager = PassManager([Quantize(fmt, **{"compute": "int8", **options})])
    return manager.run(c, PassContext(Target.parse(target))), manager.records[0].stats


def frobenius_err(got: np.ndarray, want: np.ndarray) -> float:
    """|got - want| / |want| over all elements (stable on a few rows of random data, where the
    largest single error can exceed the format's typical one)."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def reference(x: np.ndarray, w: np.ndarray, fmt: str) -> np.ndarray:
    """The int8 arithmetic in numpy: ``x`` quantized per block (f32, ties to even, a block of
    zeros to zeros), exact integer dots with the weight's 4-bit values less their zero points,
    scaled by both scales in float64."""
    block = BLOCK[fmt]
    q, scale, zero = integers(quantize_weight(w, fmt), fmt)
    xb = x.astype(np.float32).reshape(x.shape[0], -1, block)
    top = np.abs(xb).max(-1)
    inv = np.where(top > 0, np.float32(127) / np.where(top > 0, top, 1), 0).astype(np.float32)
    xq = np.rint(xb * inv[..., None]).astype(np.int64)
    wb = q.astype(np.int64).reshape(q.shape[0], -1, block) - (8 if zero is None else zero.astype(np.int64)[..., None])
    dots = np.einsum("mbk,nbk->mnb", xq, wb).astype(np.float64)
    return np.einsum("mnb,nb,mb->mn", dots, scale.astype(np.float64), (top / np.float32(127)).astype(np.float64))


@pytest.mark.usefixtures("int8_host")
@pytest.mark.parametrize("fmt", list(BLOCK))
def test_the_ir_computes_the_int8_arithmetic(fmt: str, rng: np.random.Generator) -> None:
    c = linear(rng)
    q, stats = int8_pass(c, fmt)
    assert stats["compute:int8"] == 1 and not any(k.startswith("int8:") for k in stats)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[1, :BLOCK[fmt]] = 0   # (a block of zeros: zeros, not NaN)
    got = interpret(q, {"X": x})["Y"]
    assert rel_err(got, reference(x, c.params["W"], fmt)) <= 1e-12
    assert frobenius_err(got, x @ c.params["W"].T) <= 0.15   # (the format's error and the activations')


ACTIVATIONS = """cascade reads
rank A=1, M=3, K=256, H=8, D=32, N=32
tensor X[A,M,K] input f32
tensor Z[A,H,M,D] input f32
tensor W[N,K] param f32
tensor V[N,K] param f32
tensor Y[M,N] output f32
tensor U[M,N] output f32
Y[m,n] = X[0,m,k] * W[n,k]
U[m,n] = Z[0,k//32,m,k%32] * V[n,k]
"""


@pytest.mark.usefixtures("int8_host")
def test_activations_read_through_a_batch_of_one_or_a_reshape(rng: np.random.Generator) -> None:
    """A batch of one (``X[0,m,k]``) is read where it is; heads read back as the width
    (``Z[0,k//32,m,k%32]``, an attention output) are copied to ``[rows, k]`` first."""
    c = replace(parse(ACTIVATIONS), params={"W": rng.standard_normal((32, 256)), "V": rng.standard_normal((32, 256))})
    q, stats = int8_pass(c, "q4_0")
    assert stats["compute:int8"] == 2 and not any(k.startswith("int8:") for k in stats)
    assert {t.name for t in q.tensors} - {t.name for t in c.tensors} >= {"Z_rows", "X_q", "Z_rows_q"}
    x, z = (rng.standard_normal(shape).astype(np.float32) for shape in ((1, 3, 256), (1, 8, 3, 32)))
    got = interpret(q, {"X": x, "Z": z})
    assert rel_err(got["Y"], reference(x[0], c.params["W"], "q4_0")) <= 1e-12
    rows = z[0].transpose(1, 0, 2).reshape(3, 256)
    assert rel_err(got["U"], reference(rows, c.params["V"], "q4_0")) <= 1e-12


@pytest.mark.usefixtures("int8_host")
def test_the_weight_is_stored_in_the_kernels_layout(rng: np.random.Generator) -> None:
    q, _ = int8_pass(linear(rng), "int4-g64")
    L = lanes(host_cpu())
    shapes = {name: a.shape for name, a in q.params.items()}
    assert shapes == {"W_p": (32 // L, 4, 8, 4 * L), "W_s": (32 // L, 4, L), "W_z": (32 // L, 4, L)}


@pytest.mark.usefixtures("int8_host")
def test_a_nan_makes_its_row_nan(rng: np.random.Generator) -> None:
    q, _ = int8_pass(linear(rng), "q4_0")
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[2, 40] = np.nan
    got = interpret(q, {"X": x})["Y"]
    assert np.isnan(got[2]).all() and np.isfinite(got[:2]).all()


@pytest.mark.parametrize("fmt, k, n, target, options, reason", [
    ("q8_0", 256, 32, "cpu", {}, "format"),
    ("q4_0", 300, 32, "cpu", {}, "partial-block"),
    ("q4_0", 256, 20, "cpu", {}, "channels"),
    ("q4_0", 256, 32, "cuda:sm_80", {}, "target"),
    ("int4-g32", 256, 32, "cpu", {"method": "awq"}, "awq"),
])
def test_what_keeps_the_float_contraction_says_why(fmt: str, k: int, n: int, target: str, options: dict,
                                                   reason: str, rng: np.random.Generator) -> None:
    if target == "cpu" and int8_isa(host_cpu()) is None and reason != "format":   # (the format is checked first)
        reason = "target"
    c = linear(rng, k, n)
    manager = PassManager([Quantize(fmt, compute="int8", **options)])
    q = manager.run(c, PassContext(Target.parse(target), inputs={"X": rng.standard_normal((3, k))}))
    assert manager.records[0].stats[f"int8:{reason}"] == 1 and "W_dq" in {t.name for t in q.tensors}
    x = rng.standard_normal((3, k))
    assert frobenius_err(interpret(q, {"X": x})["Y"], x @ c.params["W"].T) <= 0.15


def test_an_unknown_compute_is_an_error(rng: np.random.Generator) -> None:
    with pytest.raises(EinfuseError, match="unknown quantized compute 'int4'"):
        int8_pass(linear(rng), "q4_0", compute="int4")
