"""LSTM and GRU layers as ops of their own (``einfuse::lstm``, ``einfuse::gru``) while a model is
exported, so that capture translates each layer whole, as a loop (:mod:`.aten.recurrent`).

Why: ``aten.lstm`` has no shape function of its own; ``torch.export`` computes its output shape by
running its decomposition, one cell per step, on fake tensors (a 2-layer LSTM of 1024 steps
took 58 s to export), and that fixes the sequence length. These ops compute the same values
(they call torch's) and give their shapes directly: export takes milliseconds and the length can
be symbolic. ``nn.LSTM`` and ``nn.GRU`` call them inside :func:`recurrent_ops`; a dynamo graph's
``torch.lstm`` calls are pointed at them by :func:`rnn_calls_as_ops`. A packed sequence keeps
torch's own op.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.modules.rnn as rnn
from torch import Tensor

TORCH = {"lstm": torch.lstm, "gru": torch.gru}


@torch.library.custom_op("einfuse::lstm", mutates_args=())
def lstm(input: Tensor, hx: list[Tensor], params: list[Tensor], has_biases: bool, num_layers: int,
         dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.lstm`` on a padded sequence, as an op export keeps whole."""
    out, h, c = TORCH["lstm"](input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    return out, h, c


@torch.library.custom_op("einfuse::gru", mutates_args=())
def gru(input: Tensor, hx: Tensor, params: list[Tensor], has_biases: bool, num_layers: int,
        dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor]:
    """``torch.gru`` on a padded sequence, as an op export keeps whole."""
    out, h = TORCH["gru"](input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    return out, h


def _sequence(input: Tensor, h: Tensor, bidirectional: bool) -> Tensor:
    """Every step's output: the input's shape with the state's width (both directions')."""
    return input.new_empty((*input.shape[:-1], h.shape[-1] * (2 if bidirectional else 1)))


@lstm.register_fake
def _(input: Tensor, hx: list[Tensor], params: list[Tensor], has_biases: bool, num_layers: int, dropout: float,
      train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _sequence(input, hx[0], bidirectional), torch.empty_like(hx[0]), torch.empty_like(hx[1])


@gru.register_fake
def _(input: Tensor, hx: Tensor, params: list[Tensor], has_biases: bool, num_layers: int, dropout: float,
      train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor]:
    return _sequence(input, hx, bidirectional), torch.empty_like(hx)


def _call_lstm(*args: Any) -> Any:
    if not isinstance(args[1], (list, tuple)):   # (a packed sequence: data, batch sizes, ...)
        return TORCH["lstm"](*args)
    return torch.ops.einfuse.lstm(*args)


def _call_gru(*args: Any) -> Any:
    if isinstance(args[2], Tensor):   # (a packed sequence: data, batch sizes, hx, ...)
        return TORCH["gru"](*args)
    return torch.ops.einfuse.gru(*args)


CALLS = {"lstm": _call_lstm, "gru": _call_gru}


class _Functions:
    """``torch._VF`` as ``nn.LSTM`` and ``nn.GRU`` see it inside :func:`recurrent_ops`."""

    def __init__(self, vf: Any) -> None:
        self.vf = vf

    def __getattr__(self, name: str) -> Any:
        return CALLS.get(name) or getattr(self.vf, name)


@contextlib.contextmanager
def recurrent_ops() -> Iterator[None]:
    """``nn.LSTM`` and ``nn.GRU`` calling ``einfuse::lstm`` and ``einfuse::gru`` within."""
    saved = rnn._VF
    rnn._VF = _Functions(saved)
    try:
        yield
    finally:
        rnn._VF = saved


def rnn_calls_as_ops(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` (a dynamo graph) with its ``torch.lstm`` and ``torch.gru`` calls made through the ops."""
    for node in gm.graph.nodes:
        for name, fn in TORCH.items():
            if node.op == "call_function" and node.target is fn:
                node.target = CALLS[name]
    gm.recompile()
    return gm
