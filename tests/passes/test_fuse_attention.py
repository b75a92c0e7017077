"""fuse-attention: every zoo transformer's attention becomes the 1-pass cascade, with the same
values as before (float64 interpreter) and one pass over the keys instead of three."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from benchmarks.capture_zoo import fresh
from einfuse import capture, zoo
from einfuse.ir import Cascade, count_passes, interpret, parse
from einfuse.passes import FuseAttention, Instruments, PassManager, parse_pipeline
from tests.codegen.test_schedules import SOFTMAX
from einfuse.targets import host_cpu
from tests.conftest import CASCADES, rel_err

warnings.filterwarnings("ignore", category=FutureWarning)
PIPELINE = "canonicalize,fuse-attention{tile=8},canonicalize"


def run(c: Cascade, text: str = PIPELINE) -> tuple[Cascade, Counter]:
    manager = PassManager(parse_pipeline(text), Instruments(verify_each=True))
    return manager.run(c), sum((r.stats for r in manager.records), Counter())


@pytest.mark.parametrize("name, layers", [("gpt2", 2), ("llama", 2), ("bert", 2), ("vit", 2), ("mixtral", 1)])
def test_every_zoo_attention_is_fused_with_the_same_values(name: str, layers: int, rng: np.random.Generator) -> None:
    model, example = zoo.build(name)
    c = capture(model, example)
    fused, stats = run(c)
    assert stats["attention"] == layers
    names = {r.name for r in fused.ranks}
    tiles = [n for n in names if n.endswith("T") and n[:-1] + "I" in names]
    assert len(tiles) == layers and all(count_passes(fused, [t, t[:-1] + "I"]) == 1 for t in tiles)
    inputs = {t.name: x.numpy() for t, x in zip([t for t in c.tensors if t.role == "input"], fresh(name, example, rng))}
    assert rel_err(interpret(fused, inputs)["out0"], interpret(c, inputs)["out0"]) <= 1e-10


class Attention(torch.nn.Module):
    """Attention as users write it: scores, a causal mask as -inf, softmax, values."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q @ k.transpose(-1, -2) / 8.0
        n = s.shape[-1]
        s = s + torch.triu(torch.full((n, n), float("-inf")), 1)
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("seq", [32, 27])
def test_three_passes_become_one(seq: int, rng: np.random.Generator) -> None:
    args = tuple(torch.from_numpy(rng.standard_normal((1, 2, seq, 64)).astype(np.float32)) for _ in range(3))
    c = capture(Attention(), args)
    keys = [r.name for r in c.ranks if r.size == seq]
    fused, stats = run(c)
    assert stats["attention"] == 1
    assert count_passes(c, keys[-1:]) == 3
    assert count_passes(fused, [r.name for r in fused.ranks if r.name.endswith(("T", "I"))]) == 1
    inputs = {"q": args[0].numpy(), "k": args[1].numpy(), "v": args[2].numpy()}
    want = torch.nn.functional.scaled_dot_product_attention(*args, is_causal=True).double().numpy()
    assert rel_err(interpret(fused, inputs)["out0"], want) <= 1e-6


PROBS_ALSO_OUTPUT = """cascade attention
rank P=8, M=8, E=4, F=4
tensor Q[P,E] input f32
tensor K[M,E] input f32
tensor V[M,F] input f32
tensor PR[P,M] output f32
tensor O[P,F] output f32
QK[p,m] = Q[p,e] * K[m,e]
MX[p] = QK[p,m] :: reduce[m] max
EX[p,m] = exp(QK[p,m] - MX[p])
SM[p] = EX[p,m]
PR[p,m] = EX[p,m] / SM[p]
O[p,f] = PR[p,m] * V[m,f]
"""


def test_does_not_fire_without_attention_or_when_the_probabilities_are_used_elsewhere() -> None:
    c = parse(SOFTMAX)
    assert run(c, "fuse-attention") == (c, Counter())
    c = parse(PROBS_ALSO_OUTPUT)
    out, stats = run(c, "fuse-attention")
    assert out == c and stats == Counter({"not-fused:intermediate-read-elsewhere": 1})


@pytest.mark.parametrize("length", [9, 21])
def test_a_dynamic_sequence_is_fused_with_a_ceiling_of_tiles(length: int, rng: np.random.Generator) -> None:
    model, example = zoo.build("llama")
    seq = torch.export.Dim("seq", min=2, max=64)
    c = capture(model, example, dynamic_shapes={"input_ids": {1: seq}})
    fused, stats = run(c)
    assert stats["attention"] == 2
    assert "S_2T=ceiling(seq/8)" in str(fused).splitlines()[1].replace(" ", "")
    ids = rng.integers(0, 96, (1, length))
    assert rel_err(interpret(fused, {"input_ids": ids})["out0"], interpret(c, {"input_ids": ids})["out0"]) <= 1e-10


def test_tile_is_an_option_or_the_targets_choice() -> None:
    assert parse_pipeline("fuse-attention{tile=128}") == [FuseAttention(tile=128)]
    c = parse((CASCADES / "attn_3pass.ein").read_text())
    chosen = host_cpu().attention_tile(32, 32, 48)    # (48 keys)
    assert PassManager([FuseAttention()]).run(c).rank("MI").size == min(chosen, 48)
    assert PassManager([FuseAttention(tile=8)]).run(c).rank("MI").size == 8


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq, width", [(64, 64), (32, 32), (48, 16)])
def test_keys_as_many_as_the_heads_width_are_fused_too(seq: int, width: int, causal: bool,
                                                       rng: np.random.Generator) -> None:
    """The frontend names variables by size: where the keys are as many as a head's width, P V
    names the keys as the softmax's writer names the values; the match renames P V's variables."""
    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 2, seq, width)).astype(np.float32)) for _ in range(3))
    manager = PassManager(parse_pipeline("canonicalize,fuse-attention"))
    fused = manager.run(capture(Attention(), (q, k, v)))
    assert manager.records[-1].stats == {"attention": 1}
    got = interpret(fused, {"q": q, "k": k, "v": v})
    with torch.no_grad():
        want = Attention()(q, k, v).numpy()
    assert rel_err(next(iter(got.values())), want) <= 1e-5


def test_keys_as_many_as_the_heads_width_compile_to_the_loop_kernel(rng: np.random.Generator) -> None:
    import einfuse

    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 2, 64, 64)).astype(np.float32)) for _ in range(3))
    compiled = einfuse.compile(Attention(), (q, k, v))
    assert "loop" in [kernel.kind for kernel in compiled.kernels]
    with torch.no_grad():
        assert rel_err(compiled(q, k, v).numpy(), Attention()(q, k, v).numpy()) <= 1e-5


def test_probabilities_read_at_a_squeezed_batch_row_fuse_and_compile(rng: np.random.Generator) -> None:
    """BLOOM's attention: the softmax over a [1, H, T, T] view, P V over [H, T, T] (P read at
    batch row 0): the 1-pass output reads the loop's results at that row, a plain read."""
    import einfuse

    class BloomLike(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.o = torch.nn.Linear(64, 64)

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi: torch.Tensor) -> torch.Tensor:
            s = alibi.baddbmm(q, k.transpose(1, 2), beta=1.0, alpha=0.25)
            p = torch.softmax(s.view(1, 4, 12, 12), dim=-1).view(4, 12, 12)
            return self.o(torch.bmm(p, v).view(1, 4, 12, 16).permute(0, 2, 1, 3).reshape(1, 12, 64))
    args = tuple(torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in ((4, 12, 16),) * 3 + ((4, 1, 12),))
    model = BloomLike().eval()
    compiled = einfuse.compile(model, args)
    assert "loop" in [k.kind for k in compiled.kernels]
    with torch.no_grad():
        assert rel_err(compiled(*args).numpy(), model(*args).numpy()) <= 1e-5
