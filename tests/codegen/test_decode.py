"""The ``decode`` kernel (``ir/decode.py``, ``codegen/decode.py``): a decode step's attention over
the cache as flash-decoding; checked against the interpreter (float64) on a written cascade and
against torch eager on the decode program's own attention (``lm.cached_attention``), at cache
lengths around the chunk and block sizes, with GQA, batches, softcapping, masked chunks and NaN."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import einfuse
from einfuse.codegen.decode import BLOCK, CHUNK
from einfuse.frontends.torch_export import named_dynamic
from einfuse.ir import interpret, parse
from einfuse.ir.decode import decode_attentions
from einfuse.lm import _StepCache, cached_attention

# The cascade of one decode step's attention (2 key heads of 3 query rows, width 8, the cache
# L tokens, the step's own key, an additive mask over the L + 1 keys), as lm.merged_attention
# is captured: S = QK * 0.25 + MASK, one max over both parts, each part's exponentials and sums.
CASCADE = """cascade decode
rank G=2, R=3, D=8, L=L, LX=L + 1, T=1
tensor Q[G,R,D] input f32
tensor K[L,G,D] input f32
tensor V[L,G,D] input f32
tensor KN[G,T,D] input f32
tensor VN[G,T,D] input f32
tensor MASK[LX] input f32
tensor QK[G,R,L] f32
tensor S[G,R,L] f32
tensor MAX[G,R] f32
tensor QN[G,R,T] f32
tensor SN[G,R,T] f32
tensor MAXN[G,R] f32
tensor TOP[G,R] f32
tensor E[G,R,L] f32
tensor EN[G,R,T] f32
tensor DEN[G,R] f32
tensor DENN[G,R] f32
tensor NUM[G,R,D] f32
tensor NUMN[G,R,D] f32
tensor OUT[G,R,D] output f32
QK[g,r,l] = Q[g,r,d] * K[l,g,d]
S[g,r,l] = QK[g,r,l] * 0.25 + MASK[l]
MAX[g,r] = S[g,r,l] :: reduce[l] max
QN[g,r,t] = Q[g,r,d] * KN[g,t,d]
SN[g,r,t] = QN[g,r,t] * 0.25 + MASK[L+t]
MAXN[g,r] = SN[g,r,t] :: reduce[t] max
TOP[g,r] = max(MAX[g,r], MAXN[g,r])
E[g,r,l] = exp(S[g,r,l] - TOP[g,r])
EN[g,r,t] = exp(SN[g,r,t] - TOP[g,r])
DEN[g,r] = E[g,r,l]
DENN[g,r] = EN[g,r,t]
NUM[g,r,d] = E[g,r,l] * V[l,g,d]
NUMN[g,r,d] = EN[g,r,t] * VN[g,t,d]
OUT[g,r,d] = (NUM[g,r,d] + NUMN[g,r,d]) / (DEN[g,r] + DENN[g,r])
"""

LENGTHS = [1, 2, BLOCK - 1, BLOCK + 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]


def _inputs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    shapes = {"Q": (2, 3, 8), "K": (n, 2, 8), "V": (n, 2, 8), "KN": (2, 1, 8), "VN": (2, 1, 8), "MASK": (n + 1,)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def decode_model() -> Any:
    return einfuse.compile(parse(CASCADE))


def test_the_cascade_is_one_decode_kernel(decode_model: Any) -> None:
    (found,) = decode_attentions(parse(CASCADE))
    assert (found.key, found.qk.lhs.tensor, found.top.tensor, found.output) == ("l", "QK", "TOP", "OUT")
    assert set(found.keyed) == {"QK", "S", "E"}
    assert [k.kind for k in decode_model.kernels] == ["decode"]


@pytest.mark.parametrize("n", LENGTHS)
def test_the_kernel_equals_the_interpreter(decode_model: Any, n: int,
                                           rng: np.random.Generator) -> None:
    x = _inputs(rng, n)
    want = interpret(parse(CASCADE), {k: v.astype(np.float64) for k, v in x.items()})["OUT"]
    assert _relative(decode_model(*x.values()), want) < 1e-5


def test_masked_chunks_and_nan(decode_model: Any, rng: np.random.Generator) -> None:
    n = 2 * CHUNK + 7
    x = _inputs(rng, n)
    x["MASK"][:CHUNK + 3] = -np.inf   # (a chunk whose every key is absent adds nothing)
    want = interpret(parse(CASCADE), {k: v.astype(np.float64) for k, v in x.items()})["OUT"]
    assert _relative(decode_model(*x.values()), want) < 1e-5
    x["MASK"][:] = -np.inf   # (every key masked: 0/0, NaN as eager gives)
    assert np.isnan(decode_model(*x.values())).all()
    x = _inputs(rng, n)
    x["K"][CHUNK + 1, 1, 0] = np.nan   # (a NaN key makes its head's rows NaN, the other head's not)
    got = decode_model(*x.values())
    assert np.isnan(got[1]).all() and not np.isnan(got[0]).any()


def test_a_score_read_elsewhere_leaves_the_attention_to_the_other_kernels() -> None:
    text = CASCADE.replace("tensor OUT[G,R,D] output f32", "tensor OUT[G,R,D] output f32\ntensor SEEN[G,R,L] output f32")
    c = parse(text + "SEEN[g,r,l] = S[g,r,l]\n")
    assert decode_attentions(c) == []
    assert "decode" not in [k.kind for k in einfuse.compile(c).kernels]


class _Attention(torch.nn.Module):
    """One layer's decode attention as the decode program computes it (``lm.cached_attention``)."""

    layer_idx = 0

    def __init__(self, softcap: float | None) -> None:
        super().__init__()
        self.softcap = softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                k_past: torch.Tensor, v_past: torch.Tensor) -> torch.Tensor:
        _StepCache.current = _StepCache([k_past, v_past])
        try:
            return cached_attention(self, q, k, v, mask, softcap=self.softcap)[0]
        finally:
            _StepCache.current = None


def _step(b: int, h: int, g: int, d: int, n: int, masked: float) -> tuple[torch.Tensor, ...]:
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, g, 1, d), torch.randn(b, g, 1, d)
    mask = torch.where(torch.rand(b, 1, 1, n + 1) < 0.3, masked, 0.0)
    mask[..., -1] = 0.0
    return q, k, v, mask, torch.randn(n, b, g, d), torch.randn(n, b, g, d)


@pytest.mark.parametrize("b,h,g,softcap", [(1, 8, 2, None), (2, 4, 4, None), (1, 6, 3, 5.0)])
def test_the_decode_programs_attention_is_one_kernel_equal_to_eager(b: int, h: int, g: int,
                                                                     softcap: float | None) -> None:
    d = 16
    dynamic = {"q": None, "k": None, "v": None, "mask": {3: named_dynamic("L1", 3, 4097)},
               "k_past": {0: named_dynamic("L", 2, 4096)}, "v_past": {0: named_dynamic("L", 2, 4096)}}
    model = einfuse.compile(_Attention(softcap), _step(b, h, g, d, 40, 0.0), dynamic_shapes=dynamic)
    assert [k.kind for k in model.kernels].count("decode") == b   # (a kernel a row of the batch)
    for n, masked in [(2, 0.0), (CHUNK + 3, torch.finfo(torch.float32).min), (700, -math.inf)]:
        args = _step(b, h, g, d, n, masked)
        with torch.no_grad():
            want = _Attention(softcap)(*[x.double() for x in args])
        got = model(*args).double()
        assert float((got - want).norm() / want.norm()) < 1e-5, n
