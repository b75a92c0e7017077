"""Pass counts (EINSUM_CASCADES.md §2.3, every row of its table), FLOPs, bytes and views."""
from __future__ import annotations

import numpy as np
import pytest
import sympy

from einfuse.errors import VerificationError
from einfuse.ir import interpret, parse, to_text
from einfuse.ir.analysis import analyze_passes, cascade_costs, compulsory_bytes, count_passes, total_cost
from einfuse.ir.views import inline_views

from ..conftest import load, rel_err

# (fixture, ranks, levels of full traversals by output tensor, passes, full-fiber live tensors)
TABLE = [
    ("cascade1", ["K"], {"Y": 1, "Z": 2}, 2, {"A"}),
    ("cascade2", ["K"], {"X": 1, "Y": 1}, 1, set()),
    ("cascade3", ["I"], {"RY": 1, "RZ": 1}, 1, set()),
    ("attn_3pass", ["M"], {"QK": 1, "GM": 1, "SN": 2, "SD": 2, "A": 3, "AV": 3}, 3, {"QK", "SN"}),
    ("attn_deferred", ["M"], {"QK": 1, "GM": 1, "SN": 2, "SD": 2, "SNV": 2}, 2, {"QK"}),
    ("attn_2pass", ["M1", "M0"], {"BQK": 1, "LM": 1, "SLN": 1, "SLD": 1, "A": 3, "AV": 3}, 2, {"SLN"}),
    ("attn_1pass", ["M1", "M0"], {"BQK": 1, "LM": 1, "SLN": 1, "SLD": 1, "SLNV": 1}, 1, set()),
    ("attn_1pass", ["M0"], {"BQK": 1, "LM": 1, "SLN": 2, "SLD": 2, "SLNV": 2}, 2, {"BQK"}),
    ("attn_1pass_causal", ["M1", "M0"], {"BQK": 1, "LM": 1, "SLN": 1, "SLD": 1, "SLNV": 1}, 1, set()),
    ("layernorm", ["D"], {"MU": 1, "XC": 2, "VAR": 2, "Y": 3}, 3, {"X", "XC"}),
    ("layernorm_2p", ["D"], {"S1": 1, "S2": 1, "Y": 2}, 2, {"X"}),
    ("mlp_block", ["K"], {"Z": 1}, 1, set()),
]


@pytest.mark.parametrize("name,ranks,levels,passes,live", TABLE, ids=[f"{t[0]}-{''.join(t[1])}" for t in TABLE])
def test_pass_count_table(name: str, ranks: list[str], levels: dict[str, int], passes: int, live: set[str]) -> None:
    report = analyze_passes(load(name), ranks)
    full = {x.einsum.lhs.tensor: x.level for x in report.levels if x.full}
    assert full == levels
    assert report.passes == passes == count_passes(load(name), ranks)
    assert {t.name for t in report.live if t.full_fiber} == live


def test_two_pass_summaries_live_across_passes() -> None:
    report = analyze_passes(load("attn_2pass"), ["M1", "M0"])
    assert {t.name for t in report.live} == {"SLN", "LM", "SLD", "CF"}
    partial = {x.einsum.lhs.tensor: x.level for x in report.levels if not x.full}
    assert partial == {"GM": 1, "CF": 2, "SD": 2}


def test_count_passes_refuses_unknown_ranks() -> None:
    with pytest.raises(VerificationError, match="count_passes: unknown rank 'Z'"):
        count_passes(load("attn_3pass"), ["Z"])


def test_inline_views_substitutes_tiling_views_and_keeps_filters(rng: np.random.Generator) -> None:
    c = load("attn_1pass_causal")
    inlined = inline_views(c)
    text = to_text(inlined)
    assert "BK[" not in text and "BV[" not in text
    assert "BQK[m1,m0,p] = Q[e,p] * K[e,m1*M0+m0:m1*M0+m0<=p]" in text
    assert "SLNV[f,m1,p] = SLN[m1,m0,p] * V[f,m1*M0+m0]" in text
    x = {"Q": rng.standard_normal((32, 64)), "K": rng.standard_normal((32, 64)), "V": rng.standard_normal((32, 64))}
    assert rel_err(interpret(inlined, x)["AV"], interpret(c, x)["AV"]) < 1e-12


def test_inline_views_keeps_outputs_and_reductions() -> None:
    c = load("reshape_transpose")
    assert inline_views(c) == c
    assert inline_views(load("cascade2")) == load("cascade2")  # X[] = A[k] reduces: not a view


def test_matmul_flops_bytes_and_intensity() -> None:
    c = parse("cascade mm\nrank M=S, N=64, K=128\ntensor A[M,K] input f32\ntensor B[K,N] input f32\n"
              "tensor Z[M,N] output f32\nZ[m,n] = A[m,k] * B[k,n]\n")
    (e, cost), = cascade_costs(c)
    S = sympy.Symbol("S", integer=True, positive=True)
    assert cost.flops == 2 * S * 64 * 128
    assert cost.bytes == 4 * (S * 128 + 128 * 64 + S * 64)
    assert sympy.simplify(cost.intensity - (2 * S * 64 * 128) / (4 * (S * 192 + 8192))) == 0
    assert compulsory_bytes(c) == cost.bytes


def test_loop_costs_count_every_trip() -> None:
    costs = dict((e.lhs.tensor, k) for e, k in cascade_costs(load("attn_1pass")))
    # BQK inside `for m1`: 4 trips x (E=32 * M0=16 * P=24) points x (mul + add)
    assert costs["BQK"].flops == 4 * 32 * 16 * 24 * 2
    # K read tile by tile still moves K once: E*M*4 bytes (+ Q once, + BQK written once)
    assert costs["BQK"].bytes == 4 * (32 * 64 + 32 * 24 + 4 * 16 * 24)
    assert costs["AV"].flops == 32 * 24  # one division per output point, after the loop


def test_total_cost_sums_einsums() -> None:
    c = load("mlp_block")
    total = total_cost(c)
    assert total.flops == 8 * 24 * 32 * 2 + 8 * 24 + 8 * 24
    assert total.bytes == sum(k.bytes for _, k in cascade_costs(c))
