"""``region-route`` (BiFormer's bi-level routing attention, einfuse/kv/regions.py): compiled against
the same routing run eagerly, every region kept is dense attention, SDPA calls that are no grid
of regions stay SDPA's, bad options are clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import einfuse
from einfuse.errors import EinfuseError
from einfuse.kv import routed
from tests.conftest import rel_err


class Block(torch.nn.Module):
    """A pre-norm encoder block over grid tokens, its attention through SDPA (no class token)."""

    def __init__(self, width: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm, self.qkv, self.out = torch.nn.LayerNorm(width), torch.nn.Linear(width, 3 * width), \
            torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.out(a.transpose(1, 2).reshape(b, n, c))


def tokens(rng: np.random.Generator, n: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal((2, n, 32)).astype(np.float32))


@pytest.mark.parametrize("spec", ["region-route{regions=4,topk=3}", "region-route{regions=2,topk=1}"])
def test_the_compiled_routing_matches_it_run_eagerly(spec: str, rng: np.random.Generator) -> None:
    block = Block().eval()
    x = tokens(rng, 64)   # (an 8 x 8 grid)
    with routed(spec):
        model = einfuse.compile(block, (x,))
        fresh = tokens(rng, 64)
        with torch.no_grad():
            want = block(fresh)
    assert "select" in [k.kind for k in model.kernels]
    with torch.no_grad():
        dense = block(fresh)
    assert rel_err(model(fresh).numpy(), want.numpy()) < 1e-5
    assert rel_err(want.numpy(), dense.numpy()) > 1e-3   # (the routing changes the result)


def test_every_region_kept_is_dense_attention(rng: np.random.Generator) -> None:
    block = Block().eval()
    x = tokens(rng, 64)
    with routed("region-route{regions=2,topk=4}"):
        model = einfuse.compile(block, (x,))
    with torch.no_grad():
        assert rel_err(model(x).numpy(), block(x).numpy()) < 1e-5


def test_what_is_no_grid_of_regions_stays_sdpa(rng: np.random.Generator) -> None:
    block, sdpa = Block().eval(), torch.nn.functional.scaled_dot_product_attention
    x = tokens(rng, 50)   # (not a square)
    with routed("region-route{regions=4,topk=1}"), torch.no_grad():
        got = block(x)
    with torch.no_grad():
        assert torch.equal(got, block(x))
    assert torch.nn.functional.scaled_dot_product_attention is sdpa   # (restored)


@pytest.mark.parametrize("spec,message", [
    ("region-route{regions=2,topk=5}", "topk between 1 and regions\\^2 = 4"),
    ("region-route{regions=0}", "regions must be at least 1"),
    ("region-route{size=3}", "routing 'region-route' has no option 'size'"),
    ("kv-pages", "unknown routing 'kv-pages'"),
])
def test_bad_options_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(EinfuseError, match=message):
        with routed(spec):
            pass
