"""What a KV policy costs against dense attention (DESIGN.md: an approximate pass reports its error
beside its speed): ``einfuse generate ... --kv SPEC --compare-dense`` and ``benchmarks/sparsity.py``.

- Over a generation (:func:`compare`): the sparse programs generate greedily; the dense
  programs are then fed the same tokens; per step, whether the two next-token choices agree
  (top-1 agreement) and the KL divergence of the sparse next-token distribution from the dense one.
- Over a text (:func:`perplexity`): each program fed the text token by token (a prompt, then one
  decode step per token); the perplexity of the tokens that follow.
- Inside attention (:func:`attention_recall`): the model run eagerly over a sequence, every
  layer's attention at the last ``queries`` positions computed densely and under the policy's
  choice of keys for that query: the attention mass the chosen keys hold (recall) and the
  attention output's relative error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .policies import KVPolicy


@dataclass
class Quality:
    """A policy's error against dense attention (means over steps, or over layers, heads, queries)."""

    steps: int = 0
    top1: float = float("nan")            # next-token choices that agree with dense
    kl: float = float("nan")              # KL(dense || sparse) of the next-token distributions, nats
    recall: float = float("nan")          # attention mass of the keys the policy reads
    attention_error: float = float("nan")  # relative error of attention's output

    def text(self) -> str:
        return (f"vs dense over {self.steps} steps: top-1 agreement {self.top1:.3f}, KL {self.kl:.4f} nats; "
                f"attention: recall {self.recall:.3f}, output relative error {self.attention_error:.2e}")


def teacher_forced(lm: Any, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The logits ``[n + 1, batch, vocab]`` a compiled LM gives after the prompt ``ids`` and after
    each of the ``n`` next ``tokens`` (``[batch, n]``) fed one decode step each."""
    out = [lm.prefill(ids)]
    for i in range(tokens.shape[1]):
        out.append(lm.decode(tokens[:, i]))
    return torch.stack(out).float()


def compare(model: torch.nn.Module, sparse: Any, dense: Any, ids: torch.Tensor, new_tokens: int,
            queries: int = 8) -> tuple[torch.Tensor, Quality]:
    """``sparse``'s greedy generation after ``ids`` and its :class:`Quality` against ``dense`` (both
    compiled from ``model``: :func:`einfuse.compile_lm`)."""
    out = sparse.generate(ids, new_tokens, eos_token_id=None)
    tokens = out[:, ids.shape[1]:]
    got, want = (teacher_forced(lm, ids, tokens[:, :-1]) for lm in (sparse, dense))
    q = Quality(tokens.shape[1], *agreement(got, want))
    q.recall, q.attention_error = attention_recall(model, out, sparse.policy, queries)
    return out, q


def agreement(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(want || got) in nats) of two runs' logits ``[..., vocab]``."""
    lp, lq = want.log_softmax(-1), got.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return float((got.argmax(-1) == want.argmax(-1)).float().mean()), float(kl.mean())


def text_logits(lm: Any, text: torch.Tensor, prompt: int) -> torch.Tensor:
    """The logits ``[len(text) - prompt, vocab]`` predicting ``text[prompt:]`` (a 1-D token
    sequence), ``lm`` fed the text token by token after a prompt of its first ``prompt``."""
    return teacher_forced(lm, text[None, :prompt], text[None, prompt:-1])[:, 0]


def perplexity(logits: torch.Tensor, text: torch.Tensor, prompt: int) -> float:
    """The perplexity of ``text[prompt:]`` under the logits :func:`text_logits` gives."""
    return math.exp(float(torch.nn.functional.cross_entropy(logits, text[prompt:])))


def attention_recall(model: torch.nn.Module, seq: torch.Tensor, policy: KVPolicy, queries: int = 8) -> tuple[float, float]:
    """(recall, relative error of the output) of ``policy`` in every attention layer of ``model``
    run eagerly over ``seq`` ``[1, T]``, at its last ``queries`` positions (dense attention
    carries the model; the policy's choice is only measured)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    found: list[tuple[float, float]] = []

    def measured(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> Any:
        found.append(_measure(policy, query, key, value, attention_mask, scaling, queries))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    before = [c._attn_implementation for c in configs]
    AttentionInterface.register("einfuse_measured", measured)
    try:
        for c in configs:
            c._attn_implementation_internal = "einfuse_measured"
        with torch.no_grad():
            model(seq)
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation_internal = b
    recall, error = zip(*found)
    return sum(recall) / len(recall), sum(error) / len(error)


def _measure(policy: KVPolicy, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
             scaling: float | None, queries: int) -> tuple[float, float]:
    """Mean recall and relative output error over the last ``queries`` query positions of one layer
    (batch 1; ``query`` ``[1, H, T, D]``, ``key``/``value`` ``[1, Hkv, T, D]``)."""
    _, h, t, d = query.shape
    g = key.shape[1]
    scale = d ** -0.5 if scaling is None else scaling
    recall, error = [], []
    for i in range(max(1, t - queries), t):
        q = query[:, :, i].reshape(1, g, h // g, d)
        scores = torch.einsum("bgrd,bgld->bgrl", q, key[:, :, :i + 1]) * scale
        if mask is not None:
            scores = scores + mask[:, :, i, :i + 1].reshape(1, 1, 1, i + 1)
        p = scores.softmax(-1)
        seen = torch.cat([policy.seen(q, key[:, :, :i].permute(2, 0, 1, 3), i),
                          torch.ones(1, g, 1, dtype=torch.bool)], -1)[:, :, None]   # [1, g, 1, i + 1]
        sparse = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        dense_out, sparse_out = p @ value[:, :, :i + 1], sparse @ value[:, :, :i + 1]
        recall.append(float((p * seen).sum(-1).mean()))
        error.append(float((sparse_out - dense_out).norm() / dense_out.norm()))
    return sum(recall) / len(recall), sum(error) / len(error)
