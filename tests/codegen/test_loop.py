"""Loop kernels (``codegen/loop.py``): a ``for`` loop over tiles with running state, above all the
1-pass attention ``fuse-attention`` derives, as one TIR function, checked against the float64
interpreter and torch."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse.api import laid_out
from einfuse.codegen.loop import LoopBuilder
from einfuse.codegen.lower import SizeVars
from einfuse.ir import interpret, parse
from einfuse.passes import PassManager, pipeline
from einfuse.passes.group_kernels import group_kernels
from einfuse.targets import host_cpu
from tests.codegen.test_schedules import ATTENTION
from tests.conftest import params, rel_err

RUNNING_SUM = """cascade running
rank P=5, M=12, MT=3, MI=4
tensor X[P,M] input f32
tensor Y[P] output f32
tensor R[MT+,P] f32
R[0,p] = 0
for mt in MT {
  S[mt,p] = X[p,mt*4+mi]
  R[mt+1,p] = R[mt,p] * 0.5 + S[mt,p]
}
Y[p] = R[MT,p]
"""


def test_a_loop_with_running_state_is_one_kernel(tmp_path: Path, rng: np.random.Generator) -> None:
    c = parse(RUNNING_SUM)
    compiled = einfuse.compile(c, cache_dir=tmp_path)
    assert [k.kind for k in compiled.kernels if k.output == "Y"] == ["loop"]
    x = rng.standard_normal((5, 12)).astype(np.float32)
    assert rel_err(compiled(torch.from_numpy(x)).numpy(), interpret(c, {"X": x})["Y"]) <= 1e-6


@pytest.mark.parametrize("seq", params([37, 64, 150], slow=(150,)))
def test_fused_attention_with_a_mask_is_one_loop_kernel(seq: int, tmp_path: Path, rng: np.random.Generator) -> None:
    """Ragged last tiles (37, 150), more tiles than one and more query blocks than one (150)."""
    c = parse(ATTENTION.replace("SEQ", str(seq)))
    compiled = einfuse.compile(c, cache_dir=tmp_path)
    (loop,) = [k for k in compiled.kernels if k.kind == "loop"]
    assert loop.output == "O"
    assert not any(k.kind == "attention" for k in compiled.kernels)
    x = rng.standard_normal((seq, 192)).astype(np.float32)
    mask = np.where(np.tril(np.ones((seq, seq))) > 0, 0.0, -np.inf).astype(np.float32)   # causal, as a bias
    got = compiled(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
    assert rel_err(got, interpret(c, {"X": x, "MASK": mask})["O"]) <= 1e-5


class _Causal(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("seq", [70, 200])
def test_causal_attention_skips_masked_tiles_and_matches_torch(seq: int, tmp_path: Path) -> None:
    q, k, v = (torch.randn(1, 2, seq, 64) for _ in range(3))
    compiled = einfuse.compile(_Causal(), (q, k, v), cache_dir=tmp_path)
    assert [kn.kind for kn in compiled.kernels].count("loop") == 1
    assert "if " in compiled.source("tir")          # the test that skips a tile above the diagonal
    want = _Causal()(q, k, v).numpy()
    assert rel_err(compiled(q, k, v).numpy(), want) <= 1e-5


@pytest.mark.parametrize("width", [80, 96])
def test_heads_wider_than_the_register_tile_take_whole_unrolled_vectors(width: int, tmp_path: Path) -> None:
    """A head of 80 or 96 (Phi's) is done in column chunks of at most the rule's width, each a
    few whole vectors unrolled: a 24-lane vectorized loop, which LLVM splits with shuffles, ran
    5.7x slower at 96."""
    q, k, v = (torch.randn(1, 2, 100, width) for _ in range(3))
    compiled = einfuse.compile(_Causal(), (q, k, v), cache_dir=tmp_path)
    (name,) = [kn.name for kn in compiled.kernels if kn.kind == "loop"]
    loop = compiled.source("tir").split(f"def {name}(")[1].split("@T.prim_func")[0]
    lanes = host_cpu().vector_lanes
    vectorized = {int(n) for n in re.findall(r"T\.vectorized\((\d+)\)", loop)}
    assert lanes in vectorized and not {2 * lanes, 3 * lanes} & vectorized   # (16 or 24 lanes at once before)
    assert rel_err(compiled(q, k, v).numpy(), _Causal()(q, k, v).numpy()) <= 1e-5


def test_the_default_pipeline_fuses_attention() -> None:
    names = [p.name for p in pipeline("default")]
    assert names == ["canonicalize", "fuse-attention", "defer", "canonicalize", "moe"]
    assert [p.name for p in pipeline("unfused")] == ["canonicalize"]
    c = parse(ATTENTION.replace("SEQ", "80"))
    out = PassManager(pipeline("default")).run(c)
    assert "for " in str(out) and "MX[" not in str(out)       # 1 pass; the 3-pass Einsums are gone


RESCALED = """cascade rescaled
rank P=16, M=48, MT=3, MI=16, F=32
tensor X[P,M] input f32
tensor V[M,F] input f32
tensor G[MT,P] input f32
tensor Y[P,F] output f32
tensor R[MT+,P,F] f32
R[0,p,f] = 0
for mt in MT {
  S[mt,p,f] = X[p,mt*16+mi] * V[mt*16+mi,f]
  H[mt,p] = G[mt,p] * 0.5
  R[mt+1,p,f] = S[mt,p,f] + R[mt,p,f] * H[mt,p]
}
Y[p,f] = R[MT,p,f]
"""


def _builder(text: str) -> LoopBuilder:
    c = laid_out(parse(text), host_cpu())
    (kernel,) = [k for k in group_kernels(c) if k.kind == "loop"]
    return LoopBuilder(c, kernel, SizeVars(), host_cpu())


def test_a_contraction_is_stored_through_the_map_that_rescales_it_into_one_slot(
        tmp_path: Path, rng: np.random.Generator) -> None:
    """``P V`` then the numerator's rescale, FuseMax's ``RNV``: the contraction moves down next
    to its reader (past ``H``), is applied to the register tile as it is stored, and the running
    tensor, read only where its next value is written, keeps one slot."""
    b = _builder(RESCALED)
    s, h, r = (next(e for e in b.body if e.lhs.tensor == n) for n in "SHR")
    assert b.body == [h, s, r] and b.epilogue(s, r, frozenset({"mt"}), []) and b.in_place == {"R"}
    c = parse(RESCALED)
    compiled = einfuse.compile(c, cache_dir=tmp_path)
    feeds = {"X": rng.standard_normal((16, 48)), "V": rng.standard_normal((48, 32)),
             "G": rng.standard_normal((3, 16))}
    feeds = {n: x.astype(np.float32) for n, x in feeds.items()}
    got = compiled(*(torch.from_numpy(feeds[n]) for n in "XVG")).numpy()
    assert rel_err(got, interpret(c, feeds)["Y"]) <= 1e-6


def test_a_contraction_read_twice_is_stored_and_a_running_tensor_read_elsewhere_keeps_two_slots() -> None:
    twice = RESCALED.replace("  R[mt+1,p,f] = S[mt,p,f] + R[mt,p,f] * H[mt,p]\n",
                             "  R[mt+1,p,f] = S[mt,p,f] + R[mt,p,f] * H[mt,p]\n  T[mt,p,f] = S[mt,p,f] * R[mt,p,f]\n")
    twice = twice.replace("tensor R[MT+,P,F] f32", "tensor R[MT+,P,F] f32\ntensor T[MT,P,F] f32")
    twice = twice.replace("Y[p,f] = R[MT,p,f]", "Y[p,f] = R[MT,p,f] + T[MT-1,p,f]")
    b = _builder(twice)
    s, r = (next(e for e in b.body if e.lhs.tensor == n) for n in "SR")
    assert not b.epilogue(s, r, frozenset({"mt"}), [e for e in b.body if e.lhs.tensor == "T"])
    assert b.in_place == set()


def test_unfused_causal_scores_on_padded_register_tiles_match_torch(tmp_path: Path) -> None:
    """100 keys: the scores' register tiles overhang (padded), and the causal mask's select,
    the scores kernel's last stage, stays a stage of its own."""
    q, k, v = (torch.randn(1, 2, 100, 64) for _ in range(3))
    compiled = einfuse.compile(_Causal(), (q, k, v), pipeline="unfused", cache_dir=tmp_path)
    assert not any(kn.kind == "loop" for kn in compiled.kernels)
    assert rel_err(compiled(q, k, v).numpy(), _Causal()(q, k, v).numpy()) <= 1e-5
