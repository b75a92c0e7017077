"""Loop kernels (``codegen/loop.py``): a ``for`` loop over tiles with running state, above all the
1-pass attention ``fuse-attention`` derives, as one TIR function, checked against the float64
interpreter and torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse.ir import interpret, parse
from einfuse.passes import PassManager, pipeline
from tests.codegen.test_schedules import ATTENTION
from tests.conftest import rel_err

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


@pytest.mark.parametrize("seq", [37, 64, 150])
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


def test_the_default_pipeline_fuses_attention() -> None:
    names = [p.name for p in pipeline("default")]
    assert names == ["canonicalize", "fuse-attention", "defer", "canonicalize"]
    assert [p.name for p in pipeline("unfused")] == ["canonicalize"]
    c = parse(ATTENTION.replace("SEQ", "80"))
    out = PassManager(pipeline("default")).run(c)
    assert "for " in str(out) and "MX[" not in str(out)       # 1 pass; the 3-pass Einsums are gone
