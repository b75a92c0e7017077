"""Mixture-of-experts blocks as capture sees them (issue 22).

transformers' experts modules (``@use_experts_implementation``: Mixtral, Qwen2-MoE, OlmoE,
DeepSeek-V3, ...) compute one of three implementations, chosen by their configuration's
``experts_implementation``:

* ``eager``: a Python loop over the experts hit, each picking its tokens with ``nonzero``: a
  data-dependent loop that ``torch.export`` cannot trace (transformers#38518);
* ``grouped_mm``: ``torch._grouped_mm`` over tokens sorted by expert, on a CPU a Python
  fallback custom op (``transformers.grouped_mm_fallback``) export cannot look into;
* ``batched_mm``: each (token, slot) row multiplied by its expert's weights, gathered by the
  router's index: ``H[r,n] = W[IDX[r//k, r%k], n, d] * X[r//k, d]``.

The three compute the same function, so capture traces every experts module as ``batched_mm``
(:func:`batched_experts`), whatever it was configured with, and restores the configuration
after. The routing pass (``passes/moe.py``) starts from that form.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

CAPTURED = "batched_mm"


def experts_configs(model: torch.nn.Module) -> list[Any]:
    """The transformers configurations of ``model``'s modules (each once): an experts module reads
    its implementation from its own, which may be a sub-configuration."""
    found: dict[int, Any] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if hasattr(config, "_experts_implementation"):
            found.setdefault(id(config), config)
    return list(found.values())


@contextlib.contextmanager
def batched_experts(model: torch.nn.Module) -> Iterator[None]:
    """Within: every transformers experts module of ``model`` computes ``batched_mm``."""
    configs = experts_configs(model)
    before = [c._experts_implementation for c in configs]
    try:
        for c in configs:
            c._experts_implementation = CAPTURED
        yield
    finally:
        for c, b in zip(configs, before):
            c._experts_implementation = b
