"""The ``select`` kernel (``codegen/select.py``): a top-k's coordinates, captured as a rank count,
computed in one pass over each fiber; checked against the interpreter (ties included: the lower
coordinate first) and against ``torch.topk`` on fresh random values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import einfuse
from einfuse.frontends.torch_export import named_dynamic
from einfuse.ir import interpret, parse

RANKED = """cascade ranked
rank R=3, P={p}, P_2={p}, J={k}
tensor X[R,P] input f32
tensor RANK[R,P] i64
tensor OUT[R,J] output i64
RANK[r,p] = or(X[r,p_2] {before} X[r,p], and(X[r,p_2] == X[r,p], idx(p_2) < idx(p)))
OUT[r,j] = idx(p) * (RANK[r,p] == idx(j))
"""


@pytest.mark.parametrize("before", [">", "<"])
@pytest.mark.parametrize("p,k", [(40, 5), (7, 7), (300, 64), (2000, 700)])
def test_the_rank_pair_is_one_select_kernel_equal_to_the_interpreter(before: str, p: int, k: int,
                                                                      rng: np.random.Generator) -> None:
    c = parse(RANKED.format(p=p, k=k, before=before))
    model = einfuse.compile(c)
    assert [k.kind for k in model.kernels] == ["select"]
    x = rng.integers(0, 6, (3, p)).astype(np.float32)   # (ties everywhere)
    want = interpret(c, {"X": x})["OUT"]
    np.testing.assert_array_equal(model(x), want)


class TopK(torch.nn.Module):
    def __init__(self, k: int, dim: int, largest: bool) -> None:
        super().__init__()
        self.k, self.dim, self.largest = k, dim, largest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(x * 2.0, self.k, self.dim, largest=self.largest).indices


@pytest.mark.parametrize("dim,largest", [(-1, True), (1, False), (0, True)])
def test_topk_indices_match_eager(dim: int, largest: bool, rng: np.random.Generator) -> None:
    x = torch.from_numpy(rng.standard_normal((5, 37, 3)).astype(np.float32))
    model = einfuse.compile(TopK(3, dim, largest), (x,))
    assert "select" in [k.kind for k in model.kernels]
    fresh = torch.from_numpy(rng.standard_normal((5, 37, 3)).astype(np.float32))
    assert torch.equal(model(fresh), TopK(3, dim, largest)(fresh))


def test_a_symbolic_length(rng: np.random.Generator) -> None:
    x = torch.randn(2, 50)
    model = einfuse.compile(TopK(8, -1, True), (x,), dynamic_shapes=({1: named_dynamic("P", 8, 4096)},))
    for n in (8, 9, 1000):
        fresh = torch.from_numpy(rng.standard_normal((2, n)).astype(np.float32))
        assert torch.equal(model(fresh), TopK(8, -1, True)(fresh)), n
