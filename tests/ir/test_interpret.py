"""The reference interpreter against direct numpy on every documented cascade."""
from __future__ import annotations

import time

import numpy as np
import pytest

from einfuse.ir import interpret, parse, to_text

from ..conftest import load, rel_err

TOL = 1e-10


def softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
                      scale: float = 1.0) -> np.ndarray:
    """Attention in FuseMax orientation: q[E,P], k[E,M], v[F,M] -> [F,P]; mask[M,P] keeps True."""
    s = (k.T @ q) * scale
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    a = np.exp(s - s.max(axis=0))
    return v @ (a / a.sum(axis=0))


def qkv(rng: np.random.Generator, e: int, m: int, p: int) -> dict[str, np.ndarray]:
    return {"Q": rng.standard_normal((e, p)), "K": rng.standard_normal((e, m)),
            "V": rng.standard_normal((e, m))}


@pytest.mark.parametrize("name", ["attn_3pass", "attn_deferred", "attn_2pass", "attn_1pass"])
def test_attention_cascades_match_softmax_attention(name: str, rng: np.random.Generator) -> None:
    c = load(name)
    sizes = {r.name: r.size for r in c.ranks}
    x = qkv(rng, sizes["E"], sizes["M"], sizes["P"])
    assert rel_err(interpret(c, x)["AV"], softmax_attention(x["Q"], x["K"], x["V"])) < TOL


@pytest.mark.parametrize("length", [7, 33])
def test_causal_attention_with_symbolic_length(length: int, rng: np.random.Generator) -> None:
    x = qkv(rng, 32, length, length)
    causal = np.arange(length)[:, None] <= np.arange(length)[None, :]
    got = interpret(load("attn_causal"), x)["AV"]
    assert rel_err(got, softmax_attention(x["Q"], x["K"], x["V"], causal)) < TOL
    design = interpret(load("design_attention"), {**x, "Q": np.resize(x["Q"], (64, length)),
                                                  "K": np.resize(x["K"], (64, length)),
                                                  "V": np.resize(x["V"], (64, length))})
    q, k, v = (np.resize(x[n], (64, length)) for n in "QKV")
    assert rel_err(design["AV"], softmax_attention(q, k, v, causal, 0.125)) < TOL


@pytest.mark.parametrize("cmp", ["<=", ">="])
def test_tiled_causal_attention_is_exact_when_whole_tiles_are_masked(cmp: str, rng: np.random.Generator) -> None:
    """With '>=' the *leading* tiles of late queries are fully masked: a dense exp(-inf - -inf)
    would be NaN there; empty semantics must give the exact answer."""
    text = (load("attn_1pass_causal").__str__()).replace("m1*M0+m0<=p", f"m1*M0+m0{cmp}p")
    x = qkv(rng, 32, 64, 64)
    m, p = np.arange(64)[:, None], np.arange(64)[None, :]
    mask = m <= p if cmp == "<=" else m >= p
    got = interpret(parse(text), x)["AV"]
    assert np.all(np.isfinite(got))
    assert rel_err(got, softmax_attention(x["Q"], x["K"], x["V"], mask)) < TOL


def test_fusemax_cascades_1_2_3_compute_the_same_value(rng: np.random.Generator) -> None:
    a, b = rng.standard_normal(16), rng.standard_normal(16)
    want = (a @ b) * a.sum()
    for name in ("cascade1", "cascade2", "cascade3"):
        got = interpret(load(name), {"A": a, "B": b})["Z"]
        assert got.shape == () and rel_err(got, want) < TOL, name


def test_mlp_block(rng: np.random.Generator) -> None:
    x, w, b = rng.standard_normal((8, 32)), rng.standard_normal((32, 24)), rng.standard_normal(24)
    y = x @ w + b
    want = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
    assert rel_err(interpret(load("mlp_block"), {"X": x, "W": w, "b": b})["G"], want) < TOL


@pytest.mark.parametrize("name", ["layernorm", "layernorm_2p"])
def test_layernorm(name: str, rng: np.random.Generator) -> None:
    x, g, b = rng.standard_normal((6, 32)) * 3 + 1, rng.standard_normal(32), rng.standard_normal(32)
    want = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5) * g + b
    got = interpret(load(name), {"X": x, "gamma": g, "beta": b, "invD": 1 / 32, "eps": 1e-5})["Y"]
    assert rel_err(got, want) < 1e-9


def test_embedding_gather_and_one_hot(rng: np.random.Generator) -> None:
    ids, emb = rng.integers(0, 50, 10), rng.standard_normal((50, 16))
    out = interpret(load("embedding"), {"ids": ids, "OH": np.eye(50)[ids], "EMB": emb})
    assert rel_err(out["X1"], emb[ids]) == 0.0
    assert rel_err(out["X2"], emb[ids]) < TOL


def conv_ref(x: np.ndarray, w: np.ndarray, stride: int, pad_lo: int, pad_hi: int) -> np.ndarray:
    xp = np.pad(x, ((0, 0), (0, 0), (pad_lo, pad_hi), (pad_lo, pad_hi)))
    r = w.shape[2]
    oh = (xp.shape[2] - r) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], oh, oh))
    for i in range(oh):
        for j in range(oh):
            patch = xp[:, :, i * stride:i * stride + r, j * stride:j * stride + r]
            out[:, :, i, j] = np.einsum("ncrs,mcrs->nm", patch, w)
    return out


def test_conv2d_padding_and_stride(rng: np.random.Generator) -> None:
    x, w = rng.standard_normal((2, 3, 9, 9)), rng.standard_normal((4, 3, 3, 3))
    out = interpret(load("conv2d"), {"I": x, "Fw": w})
    assert rel_err(out["O"], conv_ref(x, w, 1, 0, 2)) < TOL
    assert rel_err(out["O1"], conv_ref(x, w, 1, 1, 1)) < TOL
    assert rel_err(out["O2"], conv_ref(x, w, 2, 0, 0)) < TOL


def test_moe_top2_routing(rng: np.random.Generator) -> None:
    x, wg = rng.standard_normal((12, 16)), rng.standard_normal((16, 4))
    w1, w2 = rng.standard_normal((4, 16, 24)), rng.standard_normal((4, 24, 16))
    logits = x @ wg
    gate = np.exp(logits - logits.max(1, keepdims=True))
    gate /= gate.sum(1, keepdims=True)
    want = np.zeros((12, 16))
    for t in range(12):
        for e in np.argsort(-gate[t])[:2]:
            h = x[t] @ w1[e]
            want[t] += gate[t, e] * ((h / (1 + np.exp(-h))) @ w2[e])
    got = interpret(load("moe_topk"), {"X": x, "WG": wg, "W1": w1, "W2": w2})["Y"]
    assert rel_err(got, want) < TOL


def test_dequant_gemm_both_forms(rng: np.random.Generator) -> None:
    x, wq, sc = rng.standard_normal((5, 32)), rng.integers(-127, 128, (12, 32)), rng.random((12, 4))
    w = wq * np.repeat(sc, 8, axis=1)
    out = interpret(load("dequant_gemm"), {"X": x, "WQ": wq, "Sc": sc})
    assert rel_err(out["Y1"], x @ w.T) < TOL
    assert rel_err(out["Y2"], x @ w.T) < TOL


def test_reshape_and_transpose(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 5, 12))
    out = interpret(load("reshape_transpose"), {"X": x})
    assert np.array_equal(out["XH"], x.reshape(2, 5, 3, 4).transpose(0, 2, 1, 3))
    assert np.array_equal(out["XT"], x.transpose(0, 2, 1))


def test_torch_tensors_are_accepted(rng: np.random.Generator) -> None:
    import torch
    a, b = rng.standard_normal(16), rng.standard_normal(16)
    got = interpret(load("cascade2"), {"A": torch.tensor(a, requires_grad=True), "B": torch.tensor(b)})
    assert rel_err(got["Z"], (a @ b) * a.sum()) < 1e-12


def test_transformer_sized_cascade_interprets_in_seconds(rng: np.random.Generator) -> None:
    """Two pre-LN transformer layers at seq 64, width 256, 4 heads, MLP 1024."""
    text = transformer_text(layers=2, seq=64, width=256, heads=4, hidden=1024)
    c = parse(text)
    inputs = {t.name: rng.standard_normal(tuple(_size(c, r.rank) for r in t.ranks)) * 0.1
              for t in c.tensors if t.role in ("input", "param")}
    start = time.perf_counter()
    out = interpret(c, inputs)["Y"]
    elapsed = time.perf_counter() - start
    assert np.all(np.isfinite(out)) and out.shape == (64, 256)
    assert rel_err(out, transformer_ref(inputs, layers=2, heads=4)) < 1e-10
    print(f"2-layer transformer (seq 64, width 256) interpreted in {elapsed:.2f} s")


def _size(c, rank: str) -> int:
    return c.rank(rank).size


def transformer_text(layers: int, seq: int, width: int, heads: int, hidden: int) -> str:
    head = width // heads
    lines = ["cascade transformer",
             f"rank S={seq}, T={seq}, D={width}, H={heads}, E={head}, C={hidden}",
             "tensor X[S,D] input f32", "tensor Y[S,D] output f32"]
    body, x = [], "X"
    for i in range(layers):
        lines += [f"tensor WQ{i}[D,H,E] param f32", f"tensor WK{i}[D,H,E] param f32",
                  f"tensor WV{i}[D,H,E] param f32", f"tensor WO{i}[H,E,D] param f32",
                  f"tensor W1{i}[D,C] param f32", f"tensor W2{i}[C,D] param f32"]
        out = "Y" if i == layers - 1 else f"X{i + 1}"
        body += [
            f"MU{i}[s] = {x}[s,d] * {1 / width}",
            f"XC{i}[s,d] = {x}[s,d] - MU{i}[s]",
            f"VAR{i}[s] = XC{i}[s,d] * XC{i}[s,d] * {1 / width}",
            f"N{i}[s,d] = XC{i}[s,d] * rsqrt(VAR{i}[s] + 0.00001)",
            f"Q{i}[h,e,s] = N{i}[s,d] * WQ{i}[d,h,e] * {head ** -0.5}",
            f"K{i}[h,e,t] = N{i}[t,d] * WK{i}[d,h,e]",
            f"V{i}[h,e,t] = N{i}[t,d] * WV{i}[d,h,e]",
            f"QK{i}[h,t,s] = Q{i}[h,e,s] * K{i}[h,e,t]",
            f"GM{i}[h,s] = QK{i}[h,t,s] :: reduce[t] max",
            f"SN{i}[h,t,s] = exp(QK{i}[h,t,s] - GM{i}[h,s])",
            f"SD{i}[h,s] = SN{i}[h,t,s]",
            f"AV{i}[h,e,s] = SN{i}[h,t,s] * V{i}[h,e,t] / SD{i}[h,s]",
            f"O{i}[s,d] = AV{i}[h,e,s] * WO{i}[h,e,d]",
            f"R{i}[s,d] = {x}[s,d] + O{i}[s,d]",
            f"U{i}[s,c] = R{i}[s,d] * W1{i}[d,c]",
            f"F{i}[s,c] = gelu_tanh(U{i}[s,c])",
            f"G{i}[s,d] = F{i}[s,c] * W2{i}[c,d]",
            f"{out}[s,d] = R{i}[s,d] + G{i}[s,d]",
        ]
        x = out
    return "\n".join(lines + body) + "\n"


def transformer_ref(p: dict[str, np.ndarray], layers: int, heads: int) -> np.ndarray:
    x = p["X"]
    for i in range(layers):
        xc = x - x.mean(1, keepdims=True)
        n = xc / np.sqrt((xc * xc).mean(1, keepdims=True) + 1e-5)
        q, k, v = (np.einsum("sd,dhe->hse", n, p[f"W{w}{i}"]) for w in "QKV")
        s = np.einsum("hse,hte->hst", q, k) * q.shape[-1] ** -0.5
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        r = x + np.einsum("hst,hte,hed->sd", a, v, p[f"WO{i}"])
        u = r @ p[f"W1{i}"]
        f = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
        x = r + f @ p[f"W2{i}"]
    return x


@pytest.mark.parametrize("op, kept", [("topk", [False, True, False, True]), ("bottomk", [True, False, True, False])])
def test_populate_ranks_nan_above_infinity_as_torch_topk_does(op: str, kept: list[bool]) -> None:
    """``[1, nan, 3, nan]``: ``topk(2)`` keeps the NaNs, ``bottomk(2)`` the numbers (hypothesis
    found the interpreter and the point-by-point evaluator ordering a NaN differently)."""
    from tests.ir.naive import naive_interpret
    c = parse(f"cascade nan\nrank B=4\ntensor X[B] input f32\ntensor Y[B] output f32 empty=0\n"
              f"Y[b] = X[b] :: populate[b] {op}(2)\n")
    x = {"X": np.array([1.0, np.nan, 3.0, np.nan])}
    got = interpret(c, x)["Y"]
    assert np.array_equal(np.isnan(got) | (got != 0), kept)
    assert np.array_equal(naive_interpret(c, x)["Y"], got, equal_nan=True)


def test_u8_and_i4_tensors_verify_and_interpret() -> None:
    """The small integer dtypes of ir/dtypes.py: a u8 input (numpy uint8) and an i4 weight (held in
    int8) parse, print back, and compute as integers, returned as int64 like every integer dtype."""
    text = """cascade small_ints
rank N=4
tensor X[N] input u8
tensor W[N] param i4
tensor Y[N] output f32
tensor Z[N] output u8
Y[n] = f32(X[n]) * W[n]
Z[n] = X[n] + 1
"""
    c = parse(text)
    assert parse(to_text(c)) == c
    x, w = np.array([0, 1, 200, 254], np.uint8), np.array([-8, -1, 0, 7], np.int8)
    out = interpret(c, {"X": x, "W": w})
    assert out["Y"].dtype == np.float64 and out["Y"].tolist() == [0.0, -1.0, 0.0, 1778.0]
    assert out["Z"].dtype == np.int64 and out["Z"].tolist() == [1, 2, 201, 255]
