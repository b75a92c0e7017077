"""CPU schedules on shapes the register tile and the vector width do not divide, checked against
the float64 interpreter, and the layout rewrite that makes padding possible."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse.api import laid_out
from einfuse.passes.layout import materialize_operands, pack_weights
from einfuse.ir import interpret, parse, to_text
from einfuse.targets import Target
from tests.conftest import rel_err

# ViT-style attention scores: a head-split view of a [tokens, heads*16] projection, 37 tokens.
HEAD_SPLIT = """cascade scores
rank B=1, S=37, S_2=37, H=2, E=16, F=16
tensor X[B,S,H,E] input f32
tensor Y[B,S_2,H,F] input f32
tensor P[B,H,S,S_2] output f32
tensor O[B,H,S,F] output f32
P[b,h,s,s_2] = X[b,s,h,e] * Y[b,s_2,h,e]
O[b,h,s,f] = P[b,h,s,s_2] * Y[b,s_2,h,f]
"""


def cpu() -> Target:
    return Target.parse("cpu")


def test_register_tile_narrows_to_the_output() -> None:
    t = Target("t", {}, vector_bytes=64, registers=32)
    assert t.register_tile() == (4, 64)
    assert t.register_tile(16) == (16, 16)     # a 16-wide head: 1 vector, 16 rows
    assert t.register_tile(40) == (4, 48)      # (5 rows would overhang the 256 rows assumed)
    assert t.register_tile(64, 785) == (5, 32) and not t.ragged(785, 64)   # 785 = 5 x 157
    assert not t.ragged(8, 64) and t.ragged(787, 64)


def test_materialize_copies_view_reads_of_ragged_contractions_only() -> None:
    c = parse("""cascade views
rank M=37, N=48, K=64, M2=64
tensor A[M2,K] input f32
tensor W[K,N] input f32
tensor Y[M,N] output f32
tensor Z[M2,N] output f32
Y[m,n] = A[m+3,k] * W[k,n]
Z[m2,n] = A[m2,k] * W[k,n]
""")
    out = materialize_operands(c, lambda rows, cols: rows % 4 != 0)
    text = to_text(out)
    assert "Y_A[m,k] = A[m+3,k]" in text and "Y[m,n] = Y_A[m,k] * W[k,n]" in text
    assert "Z[m2,n] = A[m2,k] * W[k,n]" in text          # 64 rows: not ragged, untouched


@pytest.mark.parametrize("rows", [16, 4])
def test_activations_read_along_the_vector_are_stored_transposed_weights_are_not(rows: int) -> None:
    """Transposed where 16 rows or more share the copy; a decode step's few query rows read the
    keys where they are (layout.REUSE)."""
    c = parse(f"""cascade scores
rank S={rows}, T=8, E=4, F=4
tensor Q[S,E] input f32
tensor K[T,E] input f32
tensor W[F,E] param f32
tensor P[S,T] output f32
tensor Y[S,F] output f32
P[s,t] = Q[s,e] * K[t,e]
Y[s,f] = Q[s,e] * W[f,e]
""")
    text = to_text(materialize_operands(c, lambda rows, cols: False))
    if rows >= 16:
        assert "P_K[e,t] = K[t,e]" in text and "P[s,t] = Q[s,e] * P_K[e,t]" in text
    else:
        assert "P[s,t] = Q[s,e] * K[t,e]" in text and "P_K" not in text
    assert "Y[s,f] = Q[s,e] * W[f,e]" in text           # weights are transposed at compile time instead


@pytest.mark.parametrize("tokens", [37, 64])
def test_attention_contractions_on_ragged_token_counts(tokens: int, tmp_path: Path, rng: np.random.Generator) -> None:
    c = parse(HEAD_SPLIT.replace("=37", f"={tokens}"))
    compiled = einfuse.compile(c, cache_dir=tmp_path)
    x = rng.standard_normal((1, tokens, 2, 16)).astype(np.float32)
    y = rng.standard_normal((1, tokens, 2, 16)).astype(np.float32)
    want = interpret(c, {"X": x, "Y": y})
    got = compiled(torch.from_numpy(x), torch.from_numpy(y))
    for name, value in zip(("P", "O"), got):
        assert rel_err(value.numpy(), want[name]) <= 1e-5


def test_view_reads_of_a_ragged_contraction_compile_padded(tmp_path: Path, rng: np.random.Generator) -> None:
    c = parse("""cascade heads
rank B=1, S=37, S_2=37, H=2, E=16, T=37, C=32
tensor A[T,C] input f32
tensor P[B,H,S,S_2] output f32
P[b,h,s,s_2] = A[b*37+s,h*16+e] * A[b*37+s_2,h*16+e] * 0.25
""")
    compiled = einfuse.compile(c, cache_dir=tmp_path)
    assert "_pad" in compiled.source("tir")            # padded to whole register tiles
    a = rng.standard_normal((37, 32)).astype(np.float32)
    assert rel_err(compiled(torch.from_numpy(a)).numpy(), interpret(c, {"A": a})["P"]) <= 1e-5


def test_ragged_rows_of_an_element_wise_kernel(tmp_path: Path, rng: np.random.Generator) -> None:
    c = parse("""cascade rows
rank P=5, M=785
tensor A[P,M] input f32
tensor G[P] input f32
tensor B[P,M] output f32
B[p,m] = exp(A[p,m] - G[p])
""")
    compiled = einfuse.compile(c, cache_dir=tmp_path)
    a, g = rng.standard_normal((5, 785)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    got = compiled(torch.from_numpy(a), torch.from_numpy(g)).numpy()
    assert rel_err(got, interpret(c, {"A": a, "G": g})["B"]) <= 1e-5


SOFTMAX = """cascade softmax
rank R=6, K=37
tensor X[R,K] input f32
tensor Y[R,K] output f32
M[r] = X[r,k] :: reduce[k] max
E[r,k] = exp(X[r,k] - M[r])
S[r] = E[r,k]
Y[r,k] = E[r,k] / S[r]
"""

LAYERNORM = """cascade layernorm
rank R=6, K=64
tensor X[R,K] input f32
tensor G[K] input f32
tensor Y[R,K] output f32
MU[r] = X[r,k] * 0.015625
D[r,k] = X[r,k] - MU[r]
V[r] = D[r,k] * D[r,k] * 0.015625
Y[r,k] = D[r,k] / sqrt(V[r] + 0.00001) * G[k]
"""

GEMM_GELU = """cascade dense
rank M=8, N=48, K=32
tensor X[M,K] input f32
tensor W[K,N] input f32
tensor B[N] input f32
tensor Y[M,N] output f32
T[m,n] = X[m,k] * W[k,n]
U[m,n] = T[m,n] + B[n]
Y[m,n] = U[m,n] * 0.5 * (1 + erf(U[m,n] * 0.7071067811865476))
"""


@pytest.mark.parametrize("text", [SOFTMAX, LAYERNORM, GEMM_GELU])
def test_row_groups_and_epilogues_are_one_kernel(text: str, tmp_path: Path, rng: np.random.Generator) -> None:
    c = parse(text)
    compiled = einfuse.compile(c, cache_dir=tmp_path)
    assert [k.name for k in compiled.kernels] == ["k0_Y"]
    size = {r.name: int(r.size) for r in c.ranks}
    inputs = {t.name: rng.standard_normal([size[r.rank] for r in t.ranks]).astype(np.float32)
              for t in c.tensors if t.role == "input"}
    got = compiled(*[torch.from_numpy(inputs[t.name]) for t in c.tensors if t.role == "input"])
    assert rel_err(got.numpy(), interpret(c, inputs)["Y"]) <= 1e-5


ATTENTION = """cascade attention
rank B=1, H=4, S=SEQ, S_2=SEQ, E=16, T=SEQ, C=192
tensor X[T,C] input f32
tensor MASK[S,S_2] input f32
tensor O[B,H,S,E] output f32
QK[b,h,s,s_2] = X[s,h*16+e] * X[s_2,64+(h*16+e)]
SC[b,h,s,s_2] = QK[b,h,s,s_2] * 0.25
MK[b,h,s,s_2] = SC[b,h,s,s_2] + MASK[s,s_2]
MX[b,h,s] = MK[b,h,s,s_2] :: reduce[s_2] max
SH[b,h,s,s_2] = MK[b,h,s,s_2] - MX[b,h,s]
EX[b,h,s,s_2] = exp(SH[b,h,s,s_2])
SM[b,h,s] = EX[b,h,s,s_2]
PR[b,h,s,s_2] = EX[b,h,s,s_2] / SM[b,h,s]
O[b,h,s,e] = PR[b,h,s,s_2] * X[s_2,128+(h*16+e)]
"""


@pytest.mark.parametrize("seq", [64, 37])
def test_attention_is_one_kernel_over_query_blocks(seq: int, tmp_path: Path, rng: np.random.Generator) -> None:
    c = parse(ATTENTION.replace("SEQ", str(seq)))
    compiled = einfuse.compile(c, pipeline="unfused", cache_dir=tmp_path)
    (attention,) = [k for k in compiled.kernels if k.kind == "attention"]
    assert attention.output == "O" and {"QK", "MX", "EX", "SM", "PR"} <= set(attention.stages)
    x = rng.standard_normal((seq, 192)).astype(np.float32)
    mask = np.where(np.tril(np.ones((seq, seq))) > 0, 0.0, -np.inf).astype(np.float32)   # causal
    got = compiled(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
    assert rel_err(got, interpret(c, {"X": x, "MASK": mask})["O"]) <= 1e-5


# Attention probabilities as the output: the scores ``Q K`` (scaled, causal where filtered) join
# the softmax's row group, one query row at a time (no ``P V`` to form an attention kernel).
PROBS = """cascade probs
rank B=1, H=2, S=SEQ, S_2=SEQ, E=16
tensor Q[B,H,S,E] input f32
tensor K[B,H,S_2,E] input f32
tensor QK[B,H,S,S_2] f32 empty=-inf
tensor SC[B,H,S,S_2] f32 empty=-inf
tensor P[B,H,S,S_2] output f32
QK[b,h,s,s_2MASK] = Q[b,h,s,e] * K[b,h,s_2,e]
SC[b,h,s,s_2] = QK[b,h,s,s_2] * 0.25
MX[b,h,s] = SC[b,h,s,s_2] :: reduce[s_2] max
EX[b,h,s,s_2] = exp(SC[b,h,s,s_2] - MX[b,h,s])
SM[b,h,s] = EX[b,h,s,s_2]
P[b,h,s,s_2] = EX[b,h,s,s_2] / SM[b,h,s]
"""


@pytest.mark.parametrize("seq, mask", [(64, ":s_2<=s"), (37, "")])
def test_scores_in_a_row_group_are_computed_one_query_row_at_a_time(seq: int, mask: str, tmp_path: Path,
                                                                    rng: np.random.Generator) -> None:
    """The tiny LM's softmax kernel at 64 tokens: a row group's row loop is the query's, so the
    scores stage has no query-row loop of its own (an attention kernel's block has one)."""
    c = parse(PROBS.replace("SEQ", str(seq)).replace("MASK", mask))
    compiled = einfuse.compile(c, pipeline="none", cache_dir=tmp_path)
    (probs,) = [k for k in compiled.kernels if k.kind == "rows"]
    assert probs.output == "P" and "QK" in probs.stages
    q, k = (rng.standard_normal((1, 2, seq, 16)).astype(np.float32) for _ in range(2))
    got = compiled(torch.from_numpy(q), torch.from_numpy(k)).numpy()
    assert rel_err(got, interpret(c, {"Q": q, "K": k})["P"]) <= 1e-5


class _Decode(torch.nn.Module):
    """One token through a projection and GELU (a GEMV with an epilogue)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(1024, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.proj(x))


@pytest.mark.parametrize("rows, gemv", [(1, True), (64, False)])
def test_a_gemv_streams_the_weights_rows_and_a_gemm_packs_panels(rows: int, gemv: bool, tmp_path: Path) -> None:
    """One token: each core's half of the columns accumulated in L1 over the weights' rows, no
    packed panel; 64 tokens: register tiles over packed panels. Both with the GELU epilogue."""
    model, x = _Decode().eval(), torch.randn(rows, 1024)
    compiled = einfuse.compile(model, (x,), cache_dir=tmp_path)
    tir = compiled.source("tir")
    assert [k.kind for k in compiled.kernels] == ["epilogue"]
    assert (f"T.parallel(T.int64({cpu().cores}))" in tir and "_global" not in tir) == gemv
    with torch.no_grad():
        assert rel_err(compiled(x).numpy(), model(x).numpy()) <= 1e-5


WEIGHT_GEMM = """cascade proj
rank B=64, D=256, F=768
tensor X[B,D] input f32
tensor W[D,F] param f32
tensor Y[B,F] output f32
Y[b,f] = X[b,d] * W[d,f]
"""


def test_a_weight_is_stored_as_the_register_tiles_panels(rng: np.random.Generator) -> None:
    """``W[d,f]`` becomes ``W_p[f//nr, d, f%nr]`` with the data permuted once: the float64
    interpreter gives the same result from either."""
    c = parse(WEIGHT_GEMM)
    w = rng.standard_normal((256, 768))
    c = replace(c, params={"W": w})
    packed = pack_weights(c, cpu())
    _, nr = cpu().register_tile(768, 64)
    assert f"Y[b,f]=X[b,d]*W_p[f//{nr},d,f%{nr}]" in to_text(packed).replace(" ", "")
    assert packed.params["W_p"].shape == (768 // nr, 256, nr)
    x = rng.standard_normal((64, 256))
    assert rel_err(interpret(packed, {"X": x})["Y"], interpret(c, {"X": x})["Y"]) <= 1e-12
    for other in ("accel:fusemax", "cuda:sm_80"):   # (an accelerator's 2D array has its own layout; a GPU dlight's)
        assert "W_p" not in to_text(laid_out(c, Target.parse(other)))


class _Projection(torch.nn.Module):
    def __init__(self, cols: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(256, cols, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.proj(x))


@pytest.mark.parametrize("rows, cols, packed", [(64, 768, True), (64, 1000, False), (1, 768, False)])
def test_a_gemm_reads_prepacked_weight_panels_in_place(rows: int, cols: int, packed: bool, tmp_path: Path) -> None:
    """Columns the register tile divides: the weight's panels packed at compile time and read
    where they lie (no per-call copy, a ``_global`` buffer); ragged columns still pack per call,
    one token still runs the GEMV. All against eager."""
    model, x = _Projection(cols).eval(), torch.randn(rows, 256)
    compiled = einfuse.compile(model, (x,), cache_dir=tmp_path)
    assert any(t.name.endswith("_p") for t in compiled.ir.tensors) == packed
    tir = compiled.source("tir")
    assert ("_global" not in tir and f"T.parallel(T.int64({cpu().cores}))" not in tir) == packed
    with torch.no_grad():
        assert rel_err(compiled(x).numpy(), model(x).numpy()) <= 1e-5
