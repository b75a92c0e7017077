"""IEEE special values as torch eager has them, compiled (CPU) and in the float64 interpreter:
NaN propagates and +-inf behave as in eager through every op and reduction, and a fully masked
attention row gives what eager gives (0 for SDPA, NaN for a spelled-out softmax)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import einfuse
from einfuse.api import optimized
from einfuse.ir import Cascade, interpret

warnings.filterwarnings("ignore", category=FutureWarning)


def assert_same(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Same NaN positions, same infinities, finite parts within ``tol`` relative error."""
    got, want = torch.as_tensor(got).double(), want.double()
    assert got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    for sign in (1, -1):
        assert torch.equal(got * sign == np.inf, want * sign == np.inf), (got, want)
    finite = torch.isfinite(want)
    if finite.any():
        scale = max(float(want[finite].abs().max()), 1e-30)
        assert float((got[finite] - want[finite]).abs().max()) / scale <= tol


def interpreted(c: Cascade, args: tuple) -> torch.Tensor:
    """The float64 interpreter's output of ``c`` on ``args`` (its inputs in order)."""
    names = [t.name for t in c.tensors if t.role == "input"]
    (out,) = interpret(c, dict(zip(names, args))).values()
    return torch.from_numpy(out)


class Fn(torch.nn.Module):
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


def special(rng: np.random.Generator, rows: int = 8, cols: int = 48) -> torch.Tensor:
    """Random rows with a NaN, +inf, -inf, a row of -inf, a row with NaN and +inf, and
    values where float32 exp overflows or is tiny (rows 4, 5)."""
    x = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32) * 3)
    col = lambda: int(rng.integers(cols))  # noqa: E731
    x[0, col()] = np.nan
    x[1, col()] = np.inf
    x[2, col()] = -np.inf
    x[3, :] = -np.inf
    x[4, :4] = torch.tensor([88.5, 88.8, 89.0, 100.0])
    x[5, :3] = torch.tensor([-87.0, -100.0, -1e30])
    x[6, 0], x[6, 1] = np.nan, np.inf
    return x


OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp": torch.exp, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "erf": torch.erf,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": torch.relu,
    "clamp": lambda x: x.clamp(-1.0, 1.0), "hardtanh": F.hardtanh,
    "amax": lambda x: x.amax(-1), "amin": lambda x: x.amin(-1),
    "softmax": lambda x: torch.softmax(x, -1), "log_softmax": lambda x: torch.log_softmax(x, -1),
    "where": lambda x: torch.where(x != 0, x, 2.0), "sign": torch.sign,
    "log1p": torch.log1p, "expm1": torch.expm1, "softplus": F.softplus,
}


@pytest.mark.parametrize("name", list(OPS))
def test_special_values_follow_eager(name: str, tmp_path: Path, rng: np.random.Generator) -> None:
    x = special(rng)
    model = Fn(OPS[name])
    want = model(x)
    assert_same(einfuse.compile(model, (x,), cache_dir=tmp_path)(x), want)
    # the float64 interpreter: the same, away from float32's overflow (rows 4 and 5)
    keep = [0, 1, 2, 3, 6, 7]
    assert_same(interpreted(einfuse.capture(model, (x,)), (x,))[keep], want[keep])


@pytest.mark.parametrize("op", [torch.log1p, torch.expm1], ids=["log1p", "expm1"])
def test_log1p_and_expm1_keep_small_arguments_exact(op: Callable, tmp_path: Path) -> None:
    """Each element within float32's rounding, also where ``1 + x`` rounds to 1."""
    x = torch.tensor([1e-9, -3e-8, 1e-7, -1e-5, 1e-3, -0.3, 0.49, 0.51, 2.0, -0.999], dtype=torch.float32)
    got = einfuse.compile(Fn(op), (x,), cache_dir=tmp_path)(x).double()
    want = op(x.double())
    assert float(((got - want) / want).abs().max()) <= 4e-7


def test_gelu_of_nan_is_nan(tmp_path: Path, rng: np.random.Generator) -> None:
    """(Not of +inf: eager's vectorized erf gives NaN there, einfuse the limit, +inf.)"""
    x = special(rng)
    x[torch.isinf(x)] = 0.0
    model = Fn(F.gelu)
    assert_same(einfuse.compile(model, (x,), cache_dir=tmp_path)(x), model(x))


@pytest.mark.parametrize("op", [torch.maximum, torch.minimum], ids=["maximum", "minimum"])
def test_maximum_and_minimum_propagate_nan_of_either(op: Callable, tmp_path: Path, rng: np.random.Generator) -> None:
    a, b = special(rng), special(rng)
    a[7, :4] = torch.tensor([np.nan, 1.0, np.nan, -np.inf])
    b[7, :4] = torch.tensor([1.0, np.nan, np.nan, np.nan])
    model = Fn(op)
    assert_same(einfuse.compile(model, (a, b), cache_dir=tmp_path)(a, b), model(a, b))


def test_an_mlp_with_a_nan_input_gives_nan_rows(tmp_path: Path, rng: np.random.Generator) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 16), torch.nn.Softmax(-1))
    x = torch.from_numpy(rng.standard_normal((8, 32)).astype(np.float32))
    x[3, 5] = np.nan
    x[6, 0] = np.inf
    with torch.no_grad():
        want = model(x)
        got = einfuse.compile(model, (x,), cache_dir=tmp_path)(x)
    assert torch.isnan(want[3]).all()
    assert_same(got, want)


class _SDPA(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _Spelled(torch.nn.Module):
    """Attention as models spell it out: softmax(Q K^T * scale + mask) V."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask, -1) @ v


def attention_inputs(rng: np.random.Generator, seq: int = 40) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(rng.standard_normal((2, seq, 16)).astype(np.float32)) for _ in range(3))


def padding_masks(rng: np.random.Generator, seq: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean mask with fully masked rows (left padding: the first rows see nothing) and
    random holes, and the same as an additive float mask."""
    keep = torch.from_numpy(rng.random((seq, seq)) > 0.3)
    keep[:3] = False
    keep[int(rng.integers(3, seq))] = False
    additive = torch.zeros(seq, seq).masked_fill(~keep, -np.inf)
    return keep, additive


def check_attention(model: torch.nn.Module, args: tuple, tmp_path: Path, pipeline: str = "default") -> torch.Tensor:
    """``model`` compiled and interpreted (captured, and after its pipeline) against eager; eager's output."""
    want = model(*args)
    assert_same(einfuse.compile(model, args, cache_dir=tmp_path, pipeline=pipeline)(*args), want)
    captured = einfuse.capture(model, args)
    assert_same(interpreted(captured, args), want)
    assert_same(interpreted(optimized(captured), args), want)   # (fuse-attention keeps the semantics)
    return want


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_a_fully_masked_sdpa_row_is_zero(kind: str, tmp_path: Path, rng: np.random.Generator) -> None:
    keep, additive = padding_masks(rng)
    want = check_attention(_SDPA(), (*attention_inputs(rng), keep if kind == "bool" else additive), tmp_path)
    assert (want[:, ~keep.any(-1)] == 0).all()


def test_a_fully_masked_spelled_out_softmax_row_is_nan(tmp_path: Path, rng: np.random.Generator) -> None:
    keep, additive = padding_masks(rng)
    want = check_attention(_Spelled(), (*attention_inputs(rng), additive), tmp_path)
    empty = ~keep.any(-1)
    assert torch.isnan(want[:, empty]).all() and not torch.isnan(want[:, ~empty]).any()


@pytest.mark.slow
@pytest.mark.parametrize("model", [_SDPA(), _Spelled()], ids=["sdpa", "spelled"])
def test_one_nan_key_makes_every_row_nan(model: torch.nn.Module, tmp_path: Path, rng: np.random.Generator) -> None:
    q, k, v = attention_inputs(rng, seq=150)   # (more than one key tile and one query block)
    k[1, int(rng.integers(150)), 3] = np.nan
    q[0, 7, 0] = np.inf     # and one query that makes its row NaN (inf - inf)
    want = check_attention(model, (q, k, v, torch.zeros(150, 150)), tmp_path)
    assert torch.isnan(want[1]).all() and torch.isnan(want[0, 7]).all()
