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


@pytest.mark.parametrize("fmt", ["q4_0", "int4-g128"])
def test_einfuse_int8_is_onnx_runtimes_accuracy_level_4(fmt: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``quantize{compute=int8}`` compiled computes what ORT's ``MatMulNBits accuracy_level=4``
    does (the source library) on the same quantized weight (one row and ten: a register tile and
    an overhang)."""
    import numpy as np
    import torch

    import einfuse
    from benchmarks.quant import ort_matmul_nbits
    from benchmarks.run import MatMul
    from einfuse.targets import host_cpu, int8_isa
    if int8_isa(host_cpu()) is None:   # (AVX-512 without VNNI: its AVX2 subset has the vpmaddubsw path)
        monkeypatch.setenv("EINFUSE_CPU_ISA", "avx2")
    assert int8_isa(host_cpu()) is not None
    torch.manual_seed(0)
    model = MatMul(256).eval()
    w = model.w.detach().numpy().T.astype(np.float64)
    for rows in (1, 10):
        x = torch.randn(rows, 256)
        got = einfuse.compile(model, (x,), quantize=f"format={fmt},compute=int8", cache_dir=tmp_path)(x).numpy()
        ort = ort_matmul_nbits(w, fmt, rows, 4)(x.numpy())
        # (1e-5, but for a row where one int8 activation rounds the other way: ORT's inverse
        # scale may differ in its last bit, a step of one block's scale, 1e-3)
        row_err = np.abs(got - ort).max(axis=1) / np.abs(ort).max()
        assert row_err.max() <= 1e-2 and (row_err > 1e-5).sum() <= 1


def test_coverage_compiles_the_lstm_through_the_backend() -> None:
    from benchmarks.coverage import check, markdown
    row = check("lstm")
    assert row["graphs"] == 1 and row["error"] is None and row["fell_back"] == [] and row["rel_err"] <= 1e-4
    assert "1 of 1 match eager" in markdown([row])


def test_overhead_benchmark_times_each_step_of_a_call_and_matches_eager() -> None:
    import torch

    from benchmarks.overhead import measure, runs_for
    with torch.no_grad():
        runs, kernels = runs_for(3)
        got, want = runs["einfuse"](), runs["eager"]()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6) and kernels >= 1
        times = measure(runs, repeat=3, rounds=1)
    assert set(times) == set(runs) and all(t > 0 for t in times.values())
