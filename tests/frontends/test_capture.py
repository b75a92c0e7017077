"""Capturing PyTorch models: every zoo model against torch eager, dynamic shapes, views, errors."""
from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse import zoo
from einfuse.errors import CaptureError, UnsupportedOperatorError
from einfuse.frontends import capture
from einfuse.ir import interpret, to_text

from benchmarks.capture_zoo import fresh as fresh_inputs

from ..conftest import rel_err

warnings.filterwarnings("ignore", category=FutureWarning)


def run(c, args: tuple) -> np.ndarray:
    names = [t.name for t in c.tensors if t.role == "input"]
    return interpret(c, dict(zip(names, args)))["out0"]


@pytest.mark.parametrize("name", list(zoo.BUILDERS))
def test_zoo_model_matches_eager(name: str, rng: np.random.Generator) -> None:
    model, example = zoo.build(name)
    cascade = capture(model, example)
    args = fresh_inputs(name, example, rng)
    with torch.no_grad():
        want = model(*args).double().numpy()
    assert rel_err(run(cascade, args), want) <= 1e-4


def test_capture_is_the_public_entry_point() -> None:
    import einfuse
    assert einfuse.capture is capture


def test_dynamic_sequence_llama_serves_two_lengths(rng: np.random.Generator) -> None:
    model, example = zoo.build("llama")
    seq = torch.export.Dim("seq", min=2, max=256)
    cascade = capture(model, example, dynamic_shapes={"input_ids": {1: seq}})
    assert str(cascade.rank("S").size) == "seq"
    for length in (9, 40):
        ids = torch.from_numpy(rng.integers(0, 96, (1, length)))
        with torch.no_grad():
            want = model(ids).double().numpy()
        assert rel_err(run(cascade, (ids,)), want) <= 1e-4


def test_params_travel_with_the_cascade_and_inputs_keep_their_names() -> None:
    class TwoOut(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, tokens: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lin(tokens) * scale, tokens.sum(-1)

    c = capture(TwoOut(), (torch.randn(2, 4), torch.randn(3)))
    roles = {t.name: t.role for t in c.tensors if t.role != "temp"}
    assert roles == {"lin_weight": "param", "lin_bias": "param", "tokens": "input", "scale": "input",
                     "out0": "output", "out1": "output"}
    assert set(c.params) == {"lin_weight", "lin_bias"}


def test_views_are_index_renaming(rng: np.random.Generator) -> None:
    class Views(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.view(2, 3, 4, 5).permute(0, 2, 1, 3).transpose(1, 3)[:, 1:4, :, ::2]
            y = y.unsqueeze(0).expand(2, -1, -1, -1, -1)[1:].squeeze(0).select(0, 1)
            a, b = y.split([1, 2], dim=0)
            return torch.flatten((b.contiguous() + 0.0).clone(), 1)[..., None].reshape(-1)

    x = torch.from_numpy(rng.standard_normal((6, 20)).astype(np.float32))
    c = capture(Views(), (x,))
    assert [e.lhs.tensor for e, _ in c.einsums()] == ["add", "out0"]  # only the +0.0 computes
    assert rel_err(run(c, (x,)), Views()(x).double().numpy()) == 0.0


def test_repeat_reads_modulo_the_size(rng: np.random.Generator) -> None:
    class Repeat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.repeat(2, 3, 1) + x.repeat(3, 1)[None]
    x = torch.from_numpy(rng.standard_normal((4, 5)).astype(np.float32))
    c = capture(Repeat(), (x,))
    assert [e.lhs.tensor for e, _ in c.einsums()] == ["add", "out0"]   # (repeats are views)
    assert rel_err(run(c, (x,)), Repeat()(x).double().numpy()) == 0.0


def test_pad_and_copy(rng: np.random.Generator) -> None:
    """``F.pad`` (a view when the value is 0; a negative pad crops) and ``copy_`` (Mamba's)."""
    class Pad(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
            z = x.clone()
            z.copy_(y)
            pad = torch.nn.functional.pad
            return pad(x, (2, 1)) * 2, pad(x, (1, 0, 0, 2), value=-3.0), pad(x, (-1, 2)), z + 1
    x, y = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in ((4, 5), (5,)))
    got = interpret(capture(Pad(), (x, y)), {"x": x.numpy(), "y": y.numpy()})
    for name, want in zip(("out0", "out1", "out2", "out3"), Pad()(x, y)):
        assert rel_err(got[name], want.double().numpy()) <= 1e-7


def test_nearest_interpolation_is_a_view(rng: np.random.Generator) -> None:
    interpolate = torch.nn.functional.interpolate

    class Nearest(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return (interpolate(x, scale_factor=2) + 0.0, interpolate(x, size=(7, 9)) + 0.0,
                    interpolate(x, size=(3, 2)) + 0.0, interpolate(x[:, :, 0], size=11) + 0.0)
    x = torch.from_numpy(rng.standard_normal((1, 2, 4, 5)).astype(np.float32))
    got = interpret(capture(Nearest(), (x,)), {"x": x.numpy()})
    for name, want in zip(("out0", "out1", "out2", "out3"), Nearest()(x)):
        assert rel_err(got[name], want.double().numpy()) == 0.0

    class Fractional(torch.nn.Module):   # (torch's source index: min(floor(i / 1.5), in - 1))
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return interpolate(x, scale_factor=1.5), interpolate(x, scale_factor=(2.5, 0.7))
    got = interpret(capture(Fractional(), (x,)), {"x": x.numpy()})
    for name, want in zip(("out0", "out1"), Fractional()(x)):
        assert rel_err(got[name], want.double().numpy()) == 0.0


class SdpaAttention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class EagerAttention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1])) + mask
        return torch.matmul(torch.softmax(scores, dim=-1), v)


def shape_signature(c) -> list[tuple]:
    """What each Einsum computes, without names: ops, reduce op, number of reduced variables."""
    from einfuse.ir.scope import reduced_vars

    def ops(x) -> list[str]:
        return [x.op] + [o for a in x.args for o in ops(a)] if hasattr(x, "op") else []
    return [(tuple(sorted(ops(e.rhs))), e.reduce.op if e.reduce else "+", len(reduced_vars(e))) for e, _ in c.einsums()]


def test_sdpa_and_eager_attention_give_the_same_cascade(rng: np.random.Generator) -> None:
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 4, 10, 8)).astype(np.float32)) for _ in range(3))
    mask = torch.from_numpy(np.where(rng.random((10, 10)) < 0.2, -np.inf, 0.0).astype(np.float32))
    mask.fill_diagonal_(0.0)
    sdpa, eager = capture(SdpaAttention(), (q, k, v, mask)), capture(EagerAttention(), (q, k, v, mask))
    assert shape_signature(sdpa) == shape_signature(eager)
    assert shape_signature(sdpa)[:3] == [(("mul",), "+", 1), (("mul",), "+", 0), (("add",), "+", 0)]
    want = SdpaAttention()(q, k, v, mask).double().numpy()
    assert rel_err(run(sdpa, (q, k, v, mask)), want) < 1e-5
    assert rel_err(run(eager, (q, k, v, mask)), want) < 1e-5


def test_causal_gqa_sdpa_uses_a_filter_and_head_groups(rng: np.random.Generator) -> None:
    class Gqa(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q = torch.from_numpy(rng.standard_normal((1, 6, 12, 8)).astype(np.float32))
    k, v = (torch.from_numpy(rng.standard_normal((1, 2, 12, 8)).astype(np.float32)) for _ in range(2))
    c = capture(Gqa(), (q, k, v), rank_names={1: "B", 6: "H", 2: "G", 12: "S", 8: "E"})
    text = to_text(c)
    assert "attn_qk[b,h,s,s_2:s_2<=s] = q[b,h,s,e] * k[b,h//3,s_2,e] :: from" in text
    assert "attn[b,h,s,e] = attn_probs[b,h,s,s_2] * v[b,h//3,s_2,e] :: from" in text
    assert rel_err(run(c, (q, k, v)), Gqa()(q, k, v).double().numpy()) < 1e-5


def test_hf_eager_attention_captures_too(rng: np.random.Generator) -> None:
    import transformers
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    model = zoo._LastHidden(transformers.GPT2Model(cfg)).eval()
    ids = torch.from_numpy(rng.integers(0, 50, (1, 12)))
    with torch.no_grad():
        want = model(ids).double().numpy()
    assert rel_err(run(capture(model, (ids,)), (ids,)), want) <= 1e-4


# ---- errors ------------------------------------------------------------------------------------------

class Odd(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.special.i0(x)
        return torch.lgamma(y) + torch.atan2(x, y)


def test_unsupported_ops_are_listed_all_at_once_with_their_lines() -> None:
    with pytest.raises(UnsupportedOperatorError) as info:
        capture(Odd(), (torch.randn(3, 4),))
    first = inspect.getsourcelines(Odd.forward)[1]
    where = f"{__file__}:{{}} in forward: {{}}"
    assert str(info.value) == "\n".join([
        "3 unsupported operator(s): aten.atan2.default, aten.i0.default, aten.lgamma.default",
        "  aten.i0.default at " + where.format(first + 1, "y = torch.special.i0(x)"),
        "  aten.lgamma.default at " + where.format(first + 2, "return torch.lgamma(y) + torch.atan2(x, y)"),
        "  aten.atan2.default at " + where.format(first + 2, "return torch.lgamma(y) + torch.atan2(x, y)"),
        "compile around them with einfuse.compile(..., fallback=True) or torch.compile(model, backend='einfuse') "
        "(they run in eager), or add a rule: docs/frontend.md, \"Adding a rule\"",
    ])
    assert [op for op, _ in info.value.ops] == ["aten.i0.default", "aten.lgamma.default", "aten.atan2.default"]


class Soft(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.i0(x) + torch.special.i0(2 * x)


def test_an_op_used_twice_is_listed_once_at_its_users_line() -> None:
    with pytest.raises(UnsupportedOperatorError) as info:
        capture(Soft(), (torch.randn(3, 4),))
    line = inspect.getsourcelines(Soft.forward)[1] + 1
    lines = str(info.value).splitlines()
    assert lines[:2] == ["1 unsupported operator(s): aten.i0.default",
                         f"  aten.i0.default at {__file__}:{line} in forward: "
                         "return torch.special.i0(x) + torch.special.i0(2 * x) (and 1 more use(s))"]


class IntBits(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bitwise_and(x, 3)


def test_an_unsupported_use_of_a_known_op_names_the_reason() -> None:
    with pytest.raises(UnsupportedOperatorError) as info:
        capture(IntBits(), (torch.arange(4),))
    line = inspect.getsourcelines(IntBits.forward)[1] + 1
    assert str(info.value) == "\n".join([
        "1 unsupported operator(s): aten.bitwise_and.Scalar",
        f"  aten.bitwise_and.Scalar at {__file__}:{line} in forward: return torch.bitwise_and(x, 3)",
        "    not supported: bitwise ops on i64 (only bool masks are supported)",
        "compile around them with einfuse.compile(..., fallback=True) or torch.compile(model, backend='einfuse') "
        "(they run in eager), or add a rule: docs/frontend.md, \"Adding a rule\"",
    ])


@pytest.mark.parametrize("model,args,kwargs,message", [
    (42, (torch.ones(1),), None, "capture: model must be a torch.nn.Module, got int"),
    (torch.nn.ReLU(), torch.ones(1), None,
     "capture: args must be a tuple of example inputs, got Tensor (write (x,) for a single input)"),
    (torch.nn.ReLU(), (torch.ones(1),), [1], "capture: kwargs must be a dict, got list"),
])
def test_bad_arguments(model: object, args: object, kwargs: object, message: str) -> None:
    with pytest.raises(CaptureError) as info:
        capture(model, args, kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


class Branchy(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def test_export_failure_is_a_capture_error() -> None:
    with pytest.raises(CaptureError) as info:
        capture(Branchy(), (torch.randn(3),))
    assert str(info.value).startswith("torch.export could not capture Branchy: GuardOnDataDependentSymNode: "
                                      "Could not guard on data-dependent expression")
    assert isinstance(info.value.__cause__, Exception)


class Elementwise(torch.nn.Module):
    """Ops beyond the zoo's: erfc, rounding division, clamp, where with scalars, remainder, log-softmax."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = torch.special.erfc(x) + torch.div(x * 7, y, rounding_mode="floor") + x.clamp(-0.5, 0.5)
        b = torch.where(x > y, 1.0, y) + torch.remainder(x * 5, 3.0) + torch.log_softmax(x, dim=-1)
        return a * b + torch.cumsum(x, dim=0) - x.amax(-1, keepdim=True) + x.mean() + (x > 0).any(-1, keepdim=True)


def test_more_elementwise_and_reduction_rules(rng: np.random.Generator) -> None:
    x, y = (torch.from_numpy(rng.standard_normal((4, 6)).astype(np.float32)) for _ in range(2))
    y = y.abs() + 0.5
    c = capture(Elementwise(), (x, y))
    assert rel_err(run(c, (x, y)), Elementwise()(x, y).double().numpy()) < 1e-5


def test_a_symbolic_size_is_a_value_in_arithmetic(rng: np.random.Generator) -> None:
    """``x + x.shape[1]`` with a dynamic length: the size is an operand (as a position offset is
    when a decode step's positions start at its cache's length)."""
    class Offset(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 + x.shape[1] - torch.arange(x.shape[1])
    length = torch.export.Dim("length", min=2, max=64)
    cascade = capture(Offset(), (torch.randn(3, 8),), dynamic_shapes={"x": {1: length}})
    for n in (5, 17):
        x = torch.from_numpy(rng.standard_normal((3, n)))
        assert rel_err(run(cascade, (x,)), Offset()(x).numpy()) <= 1e-6


class Reorder(torch.nn.Module):
    """sort and argsort, scatter_add, index_add and index_put (repeated indices: the last wins),
    cumprod, bilinear interpolation aligned and not, by a scale factor and to a size."""

    def forward(self, x: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values, order = torch.sort(x, -1, descending=True)
        put = x.clone()
        put[i] = x[:3] + 1
        up = torch.nn.functional.interpolate(x[None, None], scale_factor=2, mode="bilinear", align_corners=False)
        sized = torch.nn.functional.interpolate(x[None, None], size=(7, 9), mode="bilinear", align_corners=True)
        return (values, order, torch.argsort(x, 0), x.scatter_add(1, i[None].expand(4, 3), x[:, :3]),
                x.index_add(0, i, x[:3] * 2), put, torch.cumprod(x, 1), up, sized)


def test_sort_scatter_index_put_cumprod_and_bilinear_match_eager(rng: np.random.Generator, tmp_path: Path) -> None:
    model, i = Reorder(), torch.tensor([0, 2, 2])
    compiled = einfuse.compile(model, (torch.randn(4, 6), i), cache_dir=tmp_path)
    x = torch.from_numpy(rng.standard_normal((4, 6)).astype(np.float32))
    for got, want in zip(compiled(x, i), model(x, i)):
        assert rel_err(got.numpy(), want.numpy()) <= 1e-6
    cascade = capture(model, (x, i))
    values = interpret(cascade, {"x": x, "i": i})
    for k, want in enumerate(model(x, i)):
        assert rel_err(values[f"out{k}"], want.double().numpy()) <= 1e-6


class Bags(torch.nn.Module):
    """EmbeddingBag in each mode (per-sample weights, a padding index, an empty bag, 2-D bags)
    and transposed convolutions (stride, padding, output padding, dilation, groups; 1-D)."""

    def __init__(self) -> None:
        super().__init__()
        self.sum, self.max = torch.nn.EmbeddingBag(20, 8, mode="sum"), torch.nn.EmbeddingBag(20, 8, mode="max")
        self.mean = torch.nn.EmbeddingBag(20, 8, mode="mean", padding_idx=4)
        self.up = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.grouped = torch.nn.ConvTranspose2d(4, 6, 3, stride=3, padding=2, dilation=2, groups=2)
        self.line = torch.nn.ConvTranspose1d(4, 6, 4, stride=2)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> tuple:
        return (self.sum(ids, offsets, per_sample_weights=weights), self.mean(ids, offsets), self.max(ids, offsets),
                self.max(ids.view(2, -1)), self.up(x), self.grouped(x), self.line(x[:, :, 0]))


def test_embedding_bags_and_transposed_convolutions_match_eager(rng: np.random.Generator, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, offsets = Bags().eval(), torch.tensor([0, 2, 2])   # (bag 1 is empty)
    ids, weights, x = torch.tensor([1, 2, 4, 5, 4, 3]), torch.rand(6), torch.randn(2, 4, 5, 7)
    compiled = einfuse.compile(model, (ids, offsets, weights, x), cache_dir=tmp_path)
    ids = torch.from_numpy(rng.integers(0, 20, 6))
    x = torch.from_numpy(rng.standard_normal((2, 4, 5, 7)).astype(np.float32))
    with torch.no_grad():
        wants = model(ids, offsets, weights, x)
    for got, want in zip(compiled(ids, offsets, weights, x), wants):
        assert rel_err(got.numpy(), want.numpy()) <= 1e-5
    values = interpret(capture(model, (ids, offsets, weights, x)), {"ids": ids, "offsets": offsets, "weights": weights, "x": x})
    for k, want in enumerate(wants):
        assert rel_err(values[f"out{k}"], want.double().numpy()) <= 1e-5
