"""The ``quantize`` pass: every format's storage and dequantization, run exactly by the
interpreter, within the format's error of the float weight; what is left in float and why;
compiled kernels against the interpreter."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse import zoo
from einfuse.errors import EinfuseError
from einfuse.ir import Cascade, interpret, parse
from einfuse.passes import Canonicalize, PassManager, Quantize, pipeline
from einfuse.ir.quant_formats import FORMATS

from ..conftest import rel_err

LINEAR = """cascade lin
rank M=4, K={k}, N=24
tensor X[M,K] input f32
tensor W[N,K] param f32
tensor Y[M,N] output f32
Y[m,n] = X[m,k] * W[n,k]
"""
#: The largest relative (Frobenius) error of each format's weights on normal data.
BOUNDS = {"int8": 0.01, "q8_0": 0.01, "q4_0": 0.12, "int4-g32": 0.12, "int4-g64": 0.12, "int4-g128": 0.12, "b1": 0.7}


def linear(rng: np.random.Generator, k: int = 300) -> Cascade:
    return replace(parse(LINEAR.format(k=k)), params={"W": rng.standard_normal((24, k))})


def quantized(c: Cascade, fmt: str) -> tuple[Cascade, Counter]:
    manager = PassManager([Quantize(fmt)])
    return manager.run(c), manager.records[0].stats


def dequantized(c: Cascade) -> np.ndarray:
    """The weight as the interpreter reads it (``W_dq`` made an output)."""
    marked = replace(c, tensors=tuple(replace(t, role="output") if t.name == "W_dq" else t for t in c.tensors))
    return interpret(marked, {"X": np.zeros((c.rank("M").size, c.rank("K").size))})["W_dq"].T   # ([n, k])


def by_hand(fmt: str, p: dict[str, np.ndarray], k: int) -> np.ndarray:
    """Each format's dequantization written out in numpy, from its stored (reduction-major) arrays."""
    ks = np.arange(k)
    p = {name: a.T for name, a in p.items()}   # ([n, k-ish])
    if fmt == "int8":
        return p["W_q"] * p["W_s"][:, None].astype(np.float64)
    if fmt == "q8_0":
        return p["W_q"][:, :k] * p["W_d"].astype(np.float64)[:, ks // 32]
    if fmt == "q4_0":
        byte = p["W_p"][:, ks // 32 * 16 + ks % 16].astype(np.int64)
        q = np.where(ks % 32 < 16, byte & 15, byte >> 4)
        return (q - 8) * p["W_d"].astype(np.float64)[:, ks // 32]
    if fmt.startswith("int4-g"):
        group = int(fmt[6:])
        byte = p["W_p"][:, ks // 2].astype(np.int64)
        q = np.where(ks % 2 == 0, byte & 15, byte >> 4)
        return (q - p["W_z"][:, ks // group]) * p["W_s"][:, ks // group].astype(np.float64)
    bit = (p["W_p"][:, ks // 8].astype(np.int64) >> (ks % 8)) & 1
    return (2 * bit - 1) * p["W_a"][:, None].astype(np.float64)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("k", [256, 300])   # (300: no whole number of blocks, groups or bytes: padded)
def test_each_format_round_trips_through_the_interpreter(fmt: str, k: int, rng: np.random.Generator) -> None:
    c = linear(rng, k)
    q, stats = quantized(c, fmt)
    assert stats == {f"quantized:{fmt}": 1} and "W" not in q.params and "W" not in {t.name for t in q.tensors}
    got = dequantized(q)
    np.testing.assert_allclose(got, by_hand(fmt, dict(q.params), k), rtol=2 ** -23, atol=0)   # (float32's rounding)
    assert np.linalg.norm(got - c.params["W"]) / np.linalg.norm(c.params["W"]) <= BOUNDS[fmt]
    x = rng.standard_normal((4, k))
    assert rel_err(interpret(q, {"X": x})["Y"], x @ got.astype(np.float64).T) <= 1e-6


def test_packed_weights_take_their_packed_bytes(rng: np.random.Generator) -> None:
    q, _ = quantized(linear(rng, 256), "q4_0")
    assert sum(a.nbytes for a in q.params.values()) == 24 * (256 // 2 + 256 // 32 * 2)   # 18 bytes per 32 weights


def test_what_cannot_be_quantized_stays_in_float_with_its_reason(rng: np.random.Generator) -> None:
    short = linear(rng, 16)
    assert quantized(short, "q4_0")[1] == {"kept:short-reduction": 1}
    shared = parse(LINEAR.format(k=64).replace("Y[m,n] = X[m,k] * W[n,k]", "T[m,n] = X[m,k] * W[n,k]\n"
                                               "Y[m,n] = T[m,n] + W[n,m]").replace("rank M=4", "rank M=24"))
    shared = replace(shared, params={"W": rng.standard_normal((24, 64))})
    assert quantized(shared, "int8")[1] == {"kept:shared": 1}
    with pytest.raises(EinfuseError, match="unknown quantization format 'q3_k'; known: int8, q8_0, q4_0"):
        PassManager(pipeline("quantize{format=q3_k}")).run(short)


def test_canonicalize_does_not_fold_a_dequantization_back(rng: np.random.Generator) -> None:
    q, _ = quantized(linear(rng), "q8_0")
    assert PassManager([Canonicalize()]).run(q) == q


@pytest.mark.parametrize("fmt", ["int8", "q4_0", "int4-g128"])
def test_a_quantized_zoo_model_compiles_and_matches_the_interpreter(fmt: str, tmp_path: Path) -> None:
    model, args = zoo.build("mlp")
    compiled = einfuse.compile(model, args, quantize=fmt, cache_dir=tmp_path)
    got = compiled(*args).numpy()
    want = interpret(compiled.ir, {compiled.inputs[0]: args[0].numpy()})[compiled.outputs[0]]
    assert rel_err(got, want) <= 1e-5
    with torch.no_grad():
        assert rel_err(got, model(*args).numpy()) <= 2 * BOUNDS[fmt]


def test_einfuse_compile_quantize_writes_a_model_with_packed_weights(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from einfuse.cli import main
    assert main(["compile", "zoo:mlp", "--quantize", "q8_0", "-o", str(tmp_path / "out"), "--no-cache"]) == 0
    text = (tmp_path / "out" / "kernels.tir").read_text()
    assert '"int8"' in text and "_dq" in text and "kernels" in capsys.readouterr().out


def test_a_group_of_one_sign_keeps_zero_representable(rng: np.random.Generator) -> None:
    """int4-gG's range always holds 0 (as GPTQ's and ONNX Runtime's): a group of positive weights
    dequantizes near itself instead of saturating at its zero point."""
    c = linear(rng, 64)
    w = c.params["W"].copy()
    w[:, :32] = 1.0 + 0.1 * rng.random((24, 32))
    q, _ = quantized(replace(c, params={"W": w}), "int4-g32")
    got = dequantized(q)
    assert np.abs(got[:, :32] - w[:, :32]).max() <= 1.1 / 15


def salient(rng: np.random.Generator, k: int = 256) -> tuple[Cascade, np.ndarray]:
    """A Linear and calibration rows where a few input channels see 30x larger activations (the
    case AWQ is for)."""
    x = rng.standard_normal((64, k)) * np.where(np.arange(k) % 16 == 0, 30.0, 1.0)
    return replace(parse(LINEAR.format(k=k).replace("rank M=4", "rank M=64")), params={"W": rng.standard_normal((24, k))}), x


@pytest.mark.parametrize("fmt", ["q4_0", "int4-g128"])
def test_awq_calibrates_on_the_inputs_and_errs_at_most_as_much_as_rtn(fmt: str, rng: np.random.Generator) -> None:
    from einfuse.passes import PassContext
    c, x = salient(rng)
    errors = {}
    for method in ("rtn", "awq"):
        manager = PassManager([Quantize(fmt, method=method)])
        q = manager.run(c, PassContext(inputs={"X": x}))
        assert manager.records[0].stats[f"quantized:{fmt}"] == 1
        got = interpret(q, {"X": x})["Y"]
        assert rel_err(got, x @ dequantized(q).astype(np.float64).T) <= 1e-6   # (the 1/s folded into W_dq)
        errors[method] = rel_err(got, x @ c.params["W"].T)
    assert errors["awq"] < errors["rtn"], errors
    with pytest.raises(EinfuseError, match="calibrates on example inputs"):
        PassManager([Quantize(fmt, method="awq")]).run(c)
    with pytest.raises(EinfuseError, match="unknown quantization method 'gptq'; known: rtn, awq"):
        PassManager(pipeline("quantize{method=gptq}")).run(c)


def test_the_lm_head_is_kept_unless_asked(rng: np.random.Generator) -> None:
    lm = parse("""cascade lm
rank T=4, V=64, D=32, E=32
tensor ids[T] input i64
tensor E[V,D] param f32
tensor H[V,E] param f32
tensor W[E,D] param f32
tensor X[T,D] temp f32
tensor Y[T,E] temp f32
tensor L[T,V] output f32
X[t,d] = E[ids[t],d]
Y[t,e] = X[t,d] * W[e,d]
L[t,v] = Y[t,e] * H[v,e]
""")
    lm = replace(lm, params={n: rng.standard_normal(s) for n, s in {"E": (64, 32), "H": (64, 32), "W": (32, 32)}.items()})
    assert quantized(lm, "q8_0")[1] == {"quantized:q8_0": 1, "kept:lm-head": 1}
    manager = PassManager(pipeline("quantize{format=q8_0,head=true}"))
    manager.run(lm)
    assert manager.records[0].stats == {"quantized:q8_0": 2}


def test_the_quantization_report_measures_each_weight(rng: np.random.Generator) -> None:
    from einfuse.ir.quant_formats import dequantize, quantize_weight
    from einfuse.passes.quant_report import layer_rows, layers_table
    c, x = salient(rng)
    (row,) = layer_rows(c, "q4_0", "awq", inputs={"X": x})
    w = c.params["W"]
    assert (row.float_bytes, row.stored_bytes) == (24 * 256 * 4, 24 * 256 // 32 * 18 + 256 * 4)   # (+ AWQ's scales)
    back = dequantize(quantize_weight(w, "q4_0"))
    assert row.weight_error == pytest.approx(np.linalg.norm(back - w) / np.linalg.norm(w))
    assert row.output_error == pytest.approx(np.linalg.norm(x @ (back - w).T) / np.linalg.norm(x @ w.T))
    assert row.awq_output_error < row.output_error
    assert "1 of 1 weights quantized" in layers_table([row], "q4_0")
    (short,) = layer_rows(linear(rng, 16), "q4_0")
    assert short.kept == "short-reduction" and short.weight_error is None


@pytest.mark.slow
def test_einfuse_quantize_prints_each_weight_and_the_output_error(capsys: pytest.CaptureFixture[str]) -> None:
    from einfuse.cli import main
    assert main(["quantize", "zoo:mlp", "--format", "int8"]) == 0
    out = capsys.readouterr().out
    assert out.count("quantized") >= 3 and "output out0: relative error" in out and "cosine" in out
    error = float(out.split("relative error ")[1].split(",")[0])
    assert 0 < error <= 2 * BOUNDS["int8"]
