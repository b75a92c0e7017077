"""The benchmark helpers' arithmetic (the benchmarks themselves are not run by pytest)."""
from __future__ import annotations

import pytest

from benchmarks.costmodel import spearman


@pytest.mark.parametrize("a, b, rho", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([0.1, 0.5, 0.2], [7, 9, 8], 1.0),
    # ties share their mean rank: ranks [0, 1.5, 1.5, 3, 4] and [2, 0.5, 3, 0.5, 4], r = 2.75 / 9.5
    ([1, 2, 2, 5, 9], [3, 1, 4, 1, 5], 2.75 / 9.5),
])
def test_spearman_by_hand(a: list[float], b: list[float], rho: float) -> None:
    assert spearman(a, b) == pytest.approx(rho)


@pytest.mark.parametrize("fmt", ["q4_0", "int4-g32"])
def test_onnx_runtimes_matmulnbits_gets_the_same_quantized_weight(fmt: str) -> None:
    """benchmarks/quant.py repacks einfuse's quantized values for ``MatMulNBits``: ORT's product
    is the product with the weight einfuse's interpreter dequantizes (a like-for-like peer)."""
    import numpy as np
    from dataclasses import replace

    from benchmarks.quant import ort_matmul_nbits
    from einfuse.ir import interpret, parse
    from einfuse.passes import PassManager, Quantize
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((64, 256)), rng.standard_normal((3, 256)).astype(np.float32)
    c = replace(parse("cascade l\nrank M=3, K=256, N=64\ntensor X[M,K] input f32\ntensor W[N,K] param f32\n"
                      "tensor Y[M,N] output f32\nY[m,n] = X[m,k] * W[n,k]\n"), params={"W": w})
    want = interpret(PassManager([Quantize(fmt)]).run(c), {"X": x})["Y"]
    got = ort_matmul_nbits(w, fmt, 3, 0)(x)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def _host_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("fmt", ["q4_0", "int4-g128"])
def test_vnni_prototype_is_the_quantized_arithmetic(fmt: str, isa: str) -> None:
    """benchmarks/vnni_proto.py's kernels: the int8 activations and their scales as numpy
    quantizes them (exactly), the product as numpy computes the same arithmetic in float64 and
    as ORT's ``MatMulNBits accuracy_level=4`` does (the source library), one row and 10 rows
    (a register tile and an overhang)."""
    import numpy as np

    from benchmarks.quant import _values, ort_matmul_nbits
    from benchmarks.vnni_proto import QuantMatmul, check, spec_for
    if not _host_has("avx512_vnni" if isa == "avx512" else "avx2"):
        pytest.skip(f"this host cannot run {isa}")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256))
    q, scale, zero = _values(w, fmt)
    for rows in (1, 10):
        x = rng.standard_normal((rows, 256)).astype(np.float32)
        x[0, :32] = 0.0                                    # a block of zeros quantizes to zeros
        qm = QuantMatmul(spec_for(fmt, rows, 64, 256, isa), q, scale, zero)
        got = check(qm, x, q, scale, zero)
        assert got["xq_mismatch"] == 0 and got["xd_mismatch"] == 0
        assert got["rel_err"] <= 1e-6
        assert got["vs_float"] <= 0.02                     # the activations' 8-bit error, no more
        ort = ort_matmul_nbits(w, fmt, rows, 4)(x)
        assert np.abs(qm.y.numpy() - ort).max() / np.abs(ort).max() <= 1e-5


def test_vnni_prototype_builds_for_avx_vnni() -> None:
    """The 8-lane kernel builds for an AVX2 host with AVX-VNNI: ymm ``vpdpbusd``, no zmm."""
    import tvm

    from benchmarks.vnni_proto import kernels, spec_for
    s = spec_for("q4_0", 8, 64, 256, "avxvnni")
    asm = tvm.compile(kernels(s), target=s.target()).mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "%ymm" in asm and "zmm" not in asm
