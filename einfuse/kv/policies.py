"""KV-cache policies: which keys a decode step attends to, where each token's keys and values are
kept, and how the policies are spelled (``kv-window{sink=4,window=256}``).

A policy answers the host's questions (:class:`~einfuse.lm.CompiledLM` asks them): how many
rows the cache has, which row the ``n``-th token of a sequence goes to, which of a prompt's
tokens stay, whether the cache can be full. :class:`Dense` keeps every token (no policy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from ..errors import EinfuseError
from ..passes.manager import parse_one, spelled


@dataclass(frozen=True)
class KVPolicy:
    """Every token kept, each in its own row: dense attention (what ``kv=None`` means)."""

    name: ClassVar[str] = "dense"
    page_bounds: ClassVar[bool] = False   # the decode step takes each layer's page bounds after the cache

    def check(self, max_len: int) -> None:
        """Raise :class:`EinfuseError` if the options do not fit a cache of ``max_len`` tokens."""

    def rows(self, max_len: int) -> int:
        """The cache's rows (per layer, K and V each)."""
        return max_len

    def slot(self, n: int) -> int:
        """The row of the ``n``-th token of a sequence (counted from 0, the prompt's padding too)."""
        return n

    def kept(self, tokens: int) -> list[int]:
        """The tokens of a prompt of ``tokens`` that stay in the cache after its prefill."""
        return list(range(tokens))

    @property
    def bounded(self) -> bool:
        """The cache never fills: a generation may go on past ``max_len`` tokens."""
        return False

    def sparse(self, tokens: int) -> bool:
        """A step after ``tokens`` cached ones attends to keys it chooses (the sparse decode
        program, :meth:`attend`), not to all of them (the dense one, exact)."""
        return False

    def example_tokens(self) -> int:
        """Cached tokens of the sparse decode program's example (one where :meth:`sparse` holds)."""
        raise EinfuseError(f"{self.name} has no sparse decode program (its steps attend to every cached key)")

    def attend(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
               past: Sequence[torch.Tensor], scale: float, softcap: float | None) -> torch.Tensor:
        """One decode step's attention over the keys this policy chooses and the step's own:
        ``q`` ``[B, Hkv, R, D]`` (a key head's group of query rows), ``key``/``value`` ``[B, Hkv, 1, D]``,
        the additive ``mask`` ``[B, 1, 1, L + 1]``, ``past`` = (the cached K, V ``[L, B, Hkv, D]``,
        then the page bounds where :attr:`page_bounds`); the output ``[B, Hkv, R, D]``."""
        raise EinfuseError(f"{self.name} has no sparse decode program (its steps attend to every cached key)")

    def seen(self, q: torch.Tensor, k_past: torch.Tensor, position: int) -> torch.Tensor:
        """Which cached keys (``k_past`` ``[L, B, Hkv, D]``, tokens ``0..L-1``) the query rows ``q``
        ``[B, Hkv, R, D]`` of the token at ``position`` attend to: ``[B, Hkv, L]`` (measured by
        :mod:`.quality`, computed in eager torch)."""
        return torch.ones(q.shape[0], q.shape[1], k_past.shape[0], dtype=torch.bool)

    def spelled(self) -> str:
        """The policy as text (:func:`parse_kv` reads it back)."""
        return spelled(self)


Dense = KVPolicy


@dataclass(frozen=True)
class KVWindow(KVPolicy):
    """StreamingLLM's attention sinks and recent window (``mit-han-lab/streaming-llm``'s
    ``StartRecentKVCache``): a step attends to the first ``sink`` tokens, the ``window`` tokens
    before it and itself. The cache holds ``sink + window`` rows: the sinks, then a ring that the
    ``n``-th token enters at ``sink + (n - sink) % window``, where the token ``window`` before it
    was (which the step at ``n`` no longer sees). Keys keep the positions they were computed at
    (RoPE applied once, before caching, as transformers caches them): the step at position ``t``
    sees a sink at its true distance ``t - s``, not re-numbered inside the cache as StreamingLLM's
    ``pos_shift`` does, so a generation past the model's trained positions gets what the model
    gives there. A prompt attends densely to itself; its sinks and its last ``window`` tokens stay."""

    name: ClassVar[str] = "kv-window"
    sink: int = 4
    window: int = 256

    def check(self, max_len: int) -> None:
        if self.sink < 0 or self.window < 1:
            raise EinfuseError(f"{self.spelled()}: sink must be at least 0 and window at least 1")
        if self.sink + self.window > max_len:
            raise EinfuseError(f"{self.spelled()}: sink + window = {self.sink + self.window} tokens, more than "
                               f"max_len={max_len}; compile with a larger max_len or a smaller window")

    def rows(self, max_len: int) -> int:
        return self.sink + self.window

    def slot(self, n: int) -> int:
        return n if n < self.sink + self.window else self.sink + (n - self.sink) % self.window

    def kept(self, tokens: int) -> list[int]:
        return [n for n in range(tokens) if n < self.sink or n >= tokens - self.window]

    @property
    def bounded(self) -> bool:
        return True

    def seen(self, q: torch.Tensor, k_past: torch.Tensor, position: int) -> torch.Tensor:
        key = torch.arange(k_past.shape[0])
        kept = (key < self.sink) | (key >= position - self.window)
        return kept.expand(q.shape[0], q.shape[1], -1)

    def sees(self, query: torch.Tensor, key: torch.Tensor, prompt: int) -> torch.Tensor:
        """Whether the token at ``query`` sees the one at ``key`` (broadcast; causal), a prompt
        of ``prompt`` tokens seeing itself densely: the reference this policy is tested against."""
        kept = (key < self.sink) | (key >= query - self.window) | (query < prompt)
        return (key <= query) & kept


REGISTRY: dict[str, type[KVPolicy]] = {}


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    """Class decorator: the policy ``cls.name`` for :func:`parse_kv`."""
    REGISTRY[cls.name] = cls
    return cls


register_policy(KVWindow)


def parse_kv(spec: str | KVPolicy | None) -> KVPolicy:
    """The policy ``spec`` spells (``kv-pages{page=16,budget=1024}``); None: dense."""
    if spec is None:
        return Dense()
    if isinstance(spec, KVPolicy):
        return spec
    return parse_one(spec, REGISTRY, "KV policy")


def merged_attention(q: torch.Tensor, past: torch.Tensor, v_past: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     masks: tuple[torch.Tensor, torch.Tensor] | None, scale: float,
                     softcap: float | None) -> torch.Tensor:
    """transformers' eager attention of ``q`` ``[B, Hkv, R, D]`` over cached keys whose scores
    ``q k^T`` are ``past`` ``[B, Hkv, R, L]`` (values ``v_past`` ``[B, Hkv, L, D]``, any view of the
    cache or a gather of it) and the step's own keys and values (``[B, Hkv, T, D]``), each part's
    additive mask in ``masks``; written as the merge of the two parts' softmaxes (one max over
    both, then each part's exponentials and products), so that the cached part is one attention
    over the cache (the ``decode`` kernel, ir/decode.py). The output is ``[B, Hkv, R, D]``."""
    parts = [past * scale, q @ key.transpose(-1, -2) * scale]
    if softcap is not None:
        parts = [torch.tanh(s / softcap) * softcap for s in parts]
    if masks is not None:
        parts = [s + m for s, m in zip(parts, masks)]
    top = torch.maximum(parts[0].amax(-1, keepdim=True), parts[1].amax(-1, keepdim=True))
    e_past, e_now = torch.exp(parts[0] - top), torch.exp(parts[1] - top)
    total = e_past.sum(-1, keepdim=True) + e_now.sum(-1, keepdim=True)
    return (e_past.to(value.dtype) @ v_past + e_now.to(value.dtype) @ value) / total
