"""LSTM and GRU layers as a loop over time (frontends/aten/recurrent.py, codegen/loop.py)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse.errors import UnsupportedOperatorError
from einfuse.frontends import capture
from einfuse.ir import Loop, interpret

from ..conftest import rel_err

warnings.filterwarnings("ignore", category=FutureWarning)

LAYERS = {   # name: (class, constructor arguments, input shape)
    "lstm": (torch.nn.LSTM, dict(input_size=12, hidden_size=20, batch_first=True), (3, 9, 12)),
    "lstm-2-bidirectional": (torch.nn.LSTM, dict(input_size=12, hidden_size=16, num_layers=2, bidirectional=True),
                             (7, 2, 12)),
    "lstm-unbatched-no-bias": (torch.nn.LSTM, dict(input_size=8, hidden_size=8, bias=False), (6, 8)),
    "gru-2": (torch.nn.GRU, dict(input_size=12, hidden_size=20, num_layers=2, batch_first=True), (2, 9, 12)),
    "gru-bidirectional-unbatched": (torch.nn.GRU, dict(input_size=12, hidden_size=16, bidirectional=True), (5, 12)),
}


class WithState(torch.nn.Module):
    """A recurrent layer given its initial state, under a head reading every step."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer, self.head = layer, torch.nn.Linear(layer.hidden_size * (2 if layer.bidirectional else 1), 5)

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple:
        y, last = self.layer(x, state if len(state) > 1 else state[0])
        return (self.head(y).softmax(-1), *(last if isinstance(last, tuple) else (last,)))


class Last(torch.nn.Module):
    """Every step's output of a recurrent layer."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


def _flat(out: tuple) -> list[torch.Tensor]:
    return [out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))]


def _random(rng: np.random.Generator, shape: tuple) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_eager_compiled_and_interpreted(name: str, rng: np.random.Generator, tmp_path: Path) -> None:
    cls, kwargs, shape = LAYERS[name]
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = cls(**kwargs).eval()
    compiled = einfuse.compile(model, (_random(rng, shape),), cache_dir=tmp_path)
    x = _random(rng, shape)
    with torch.no_grad():
        wants = _flat(model(x))
    cascade = capture(model, (x,))
    values = interpret(cascade, {"input": x.numpy()})
    for k, (got, want) in enumerate(zip(compiled(x), wants)):
        assert rel_err(got.numpy(), want.numpy()) <= 1e-5
        assert rel_err(values[f"out{k}"], want.double().numpy()) <= 1e-5


@pytest.mark.parametrize("cls", [torch.nn.LSTM, torch.nn.GRU])
def test_initial_state_and_a_head(cls: type, rng: np.random.Generator, tmp_path: Path) -> None:
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = WithState(cls(10, 12, num_layers=2, batch_first=True)).eval()
    args = (_random(rng, (2, 6, 10)), *(_random(rng, (2, 2, 12)) for _ in range(2 if cls is torch.nn.LSTM else 1)))
    compiled = einfuse.compile(model, args, cache_dir=tmp_path)
    args = tuple(_random(rng, tuple(a.shape)) for a in args)
    with torch.no_grad():
        wants = model(*args)
    for got, want in zip(compiled(*args), wants):
        assert rel_err(got.numpy(), want.numpy()) <= 1e-5


def test_the_cascade_does_not_grow_with_the_sequence() -> None:
    model = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True).eval()
    short, long = (capture(model, (torch.randn(n, 2, 8),)) for n in (4, 300))
    assert len(list(short.einsums())) == len(list(long.einsums()))
    assert sum(isinstance(s, Loop) for s in long.stmts) == 4   # (2 layers x 2 directions)
    kernels = [k.kind for k in einfuse.compile(model, (torch.randn(300, 2, 8),)).ir.groups]
    assert kernels.count("loop") == 4


def test_dropout_in_training_mode_is_refused() -> None:
    model = torch.nn.LSTM(8, 8, num_layers=2, dropout=0.5).train()
    with pytest.raises(UnsupportedOperatorError, match="dropout between layers in training mode"):
        capture(model, (torch.randn(5, 2, 8),))


def test_backend_compiles_an_lstm_once_for_every_length(rng: np.random.Generator) -> None:
    """dynamo traces an RNN module with ``allow_rnn``; on a second length it marks the length
    dynamic, and the one graph compiled then serves the third."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    model = torch.nn.Sequential(Last(torch.nn.LSTM(6, 8, batch_first=True)), torch.nn.Linear(8, 3)).eval()
    compiled = torch.compile(model, backend="einfuse")
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for n in (5, 11, 11, 7):
            x = _random(rng, (2, n, 6))
            assert rel_err(compiled(x).numpy(), model(x).numpy()) <= 1e-5
    torch._dynamo.reset()
    assert not [str(w.message) for w in seen if "einfuse" in str(w.message)]
