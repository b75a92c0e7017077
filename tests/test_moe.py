"""Mixture-of-experts models captured in each of transformers' experts implementations (eager,
grouped_mm, batched_mm) and compiled through the ``moe`` pass and the ``grouped`` kernels,
against eager on fresh inputs; a block the pass does not match compiles as written and the
report says why; the report's routing section."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse import zoo

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
CASES = [pytest.param(f, i, marks=() if (f, i) == ("mixtral", "eager") else pytest.mark.slow)
         for f in ("mixtral", "qwen2_moe", "olmoe") for i in IMPLEMENTATIONS]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def hidden(family: str, implementation: str) -> torch.nn.Module:
    return zoo._LastHidden(zoo.causal_lm(family, experts_implementation=implementation).model).eval()


@pytest.mark.parametrize("family,implementation", CASES)
def test_moe_model_matches_eager_in_each_implementation(family: str, implementation: str, tmp_path: Path) -> None:
    model = hidden(family, implementation)
    compiled = einfuse.compile(model, (torch.randint(0, 96, (1, 24)),), cache_dir=tmp_path)
    assert model.model.config._experts_implementation == implementation   # (restored after capture)
    assert [k.kind for k in compiled.kernels].count("grouped") == 2 * model.model.config.num_hidden_layers
    ids = torch.randint(0, 96, (1, 24))
    with torch.no_grad():
        assert rel(compiled(ids), model(ids)) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_deepseek_block_with_shared_and_grouped_routing_matches_eager(implementation: str, tmp_path: Path) -> None:
    block = zoo.causal_lm("deepseek_v3", experts_implementation=implementation).model.layers[0].mlp
    block.gate.e_score_correction_bias.normal_()   # (its groups then differ from its experts' order)
    compiled = einfuse.compile(block, (torch.randn(1, 24, 64),), cache_dir=tmp_path)
    x = torch.randn(1, 24, 64)
    with torch.no_grad():
        assert rel(compiled(x), block(x)) <= 1e-4


class GatheredWeights(torch.nn.Module):
    """gpt-fast's MoE: each (token, slot) gathers its expert's whole matrices and contracts them in
    one einsum over both (a gather over two variables, which ``moe`` does not sort)."""

    def __init__(self, width: int = 32, ffn: int = 48, experts: int = 4) -> None:
        super().__init__()
        self.gate = torch.nn.Parameter(torch.randn(experts, width))
        self.w1 = torch.nn.Parameter(torch.randn(experts, ffn, width) / 4)
        self.w2 = torch.nn.Parameter(torch.randn(experts, width, ffn) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = (x @ self.gate.T).softmax(-1).topk(2, -1)
        h = torch.nn.functional.silu(torch.einsum("td,tafd->taf", x, self.w1[experts]))
        return torch.einsum("tad,ta->td", torch.einsum("taf,tadf->tad", h, self.w2[experts]), weights)


def test_a_block_moe_does_not_match_compiles_as_written_and_the_report_says_why(tmp_path: Path) -> None:
    model = GatheredWeights().eval()
    compiled = einfuse.compile(model, (torch.randn(16, 32),), cache_dir=tmp_path)
    x = torch.randn(16, 32)
    with torch.no_grad():
        assert rel(compiled(x), model(x)) <= 1e-4
    assert "not rewritten: its expert gather reads more than the row" in compiled.report()


@pytest.mark.parametrize("moe,tokens,mode", [(None, 24, "dropless"), ("capacity", 24, "capacity"), (None, 4, "unsorted")])
def test_the_report_counts_each_blocks_rows_per_expert(moe: str | None, tokens: int, mode: str, tmp_path: Path) -> None:
    model = hidden("mixtral", "eager")
    ids = torch.randint(0, 96, (1, tokens))
    compiled = einfuse.compile(model, (ids,), cache_dir=tmp_path, moe=moe)
    routing = compiled.routing((ids,))
    assert sorted(routing) == sorted(f"moe{i}_{t}" for i in (0, 1) for t in (("expert",) if mode == "unsorted"
                                                                             else ("expert", "place")))
    lines = [line for line in compiled.report((ids,)).splitlines() if line.startswith("experts moe0")]
    rows = np.bincount(routing["moe0_expert"], minlength=4)
    assert len(lines) == 1 and f"{mode}; rows per expert {rows.tolist()}" in lines[0]
    if mode == "capacity":   # (capacity 2 * int(1.25 * ceil(24 / 4)) = 14: the places past 4 * 14 dropped)
        assert f"dropped {int((routing['moe0_place'] >= 56).sum())}" in lines[0]


@pytest.mark.parametrize("family", [pytest.param("mixtral"), pytest.param("qwen2_moe", marks=pytest.mark.slow),
                                    pytest.param("olmoe", marks=pytest.mark.slow)])
def test_compile_lm_generates_hfs_greedy_tokens_on_moe_models(family: str, tmp_path: Path) -> None:
    lm = zoo.causal_lm(family, experts_implementation="eager")
    compiled = einfuse.compile_lm(lm, max_len=64, cache_dir=tmp_path)
    ids = torch.randint(3, 96, (1, 20))
    with torch.no_grad():
        want = lm.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=12), want)
    experts = [line for line in compiled.decode_model.report().splitlines() if line.startswith("experts ")]
    assert len(experts) == 2 and all(": unsorted" in line for line in experts)   # (a token's k rows: own experts)


@pytest.mark.slow
def test_torch_compile_backend_runs_transformers_grouped_mm_experts_whole() -> None:
    """Under dynamo the experts run as configured (``grouped_mm``: sort, histc, cumsum and
    transformers' grouped GEMM op), and each has a rule: nothing falls back to eager."""
    import warnings

    from einfuse.dynamo import EagerFallbackWarning
    torch._dynamo.reset()
    model = hidden("mixtral", "grouped_mm")
    ids = torch.randint(0, 96, (1, 24))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got, want = torch.compile(model, backend="einfuse")(ids), model(ids)
    assert not [w for w in caught if issubclass(w.category, EagerFallbackWarning)]
    assert rel(got, want) <= 1e-4
    torch._dynamo.reset()


@pytest.mark.slow
def test_a_dynamic_sequence_sorts_a_symbolic_number_of_rows(tmp_path: Path) -> None:
    model = hidden("mixtral", "eager")
    seq = torch.export.Dim("seq", min=2, max=128)
    compiled = einfuse.compile(model, (torch.randint(0, 96, (1, 24)),), dynamic_shapes={"input_ids": {1: seq}},
                               cache_dir=tmp_path)
    assert [k.kind for k in compiled.kernels].count("grouped") == 4
    for n in (5, 40):
        ids = torch.randint(0, 96, (1, n))
        with torch.no_grad():
            assert rel(compiled(ids), model(ids)) <= 1e-4
