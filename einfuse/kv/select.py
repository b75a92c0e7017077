"""TokenSelect's token selection (Wu et al., arXiv 2411.02886, ``pzs19/TokenSelect``) as a decode
step's attention.

Each step scores every cached token by soft voting across the query heads: per head ``h`` the
softmax over the cached tokens of ``q_h . k`` (no scaling, as TokenSelect's kernel computes it),
summed over every head of every key-head group (its ``torch.softmax(scores, -1).sum(0)``; the
padding's tokens masked first). The ``k`` best candidates, the first ``sink`` tokens and the last
``recent`` are attended to by every head (TokenSelect's ``n_init``, ``top_k``, ``n_local``), read
where they are in the cache. Keys keep their positions (RoPE applied before caching); TokenSelect
re-rotates the selected keys by their place in the list, which a cache of rotated keys cannot
do: stated in docs/sparsity.md. The scores read every cached key, so a step reads K once and only
the chosen tokens' V: at most about 2x less than dense attention. TokenSelect's selection cache
(the previous step's choice reused while the queries stay similar) is not built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from ..errors import EinfuseError
from .pages import attend_tokens
from .policies import KVPolicy, register_policy


@register_policy
@dataclass(frozen=True)
class KVSelect(KVPolicy):
    """``kv-select{k=1024,sink=4,recent=64}``: per step the ``k`` tokens the heads vote for."""

    name: ClassVar[str] = "kv-select"
    k: int = 1024
    sink: int = 4
    recent: int = 64

    def check(self, max_len: int) -> None:
        if self.k < 1 or self.sink < 0 or self.recent < 0:
            raise EinfuseError(f"{self.spelled()}: k must be at least 1, sink and recent at least 0")

    def sparse(self, tokens: int) -> bool:
        return tokens > self.sink + self.k + self.recent

    def example_tokens(self) -> int:
        return self.sink + self.k + self.recent + 1

    def chosen(self, q: torch.Tensor, k_past: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The ``k`` voted tokens ``[B, k]`` among the candidates (neither sinks nor recent) for the
        query rows ``q`` ``[B, Hkv, R, D]``, the cache's keys ``[L, B, Hkv, D]`` and the additive
        ``mask`` ``[B, L]`` of its tokens."""
        n = k_past.shape[0]
        scores = torch.einsum("lbgd,bgrd->bglr", k_past, q) + mask[:, None, :, None]
        votes = scores.softmax(2).sum((1, 3))                                # [B, L]
        place = torch.arange(n)
        candidate = (place >= self.sink) & (place < n - self.recent)
        return votes.masked_fill(~candidate, float("-inf")).topk(self.k, -1).indices

    def attend(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
               past: Sequence[torch.Tensor], scale: float, softcap: float | None) -> torch.Tensor:
        k_past, v_past = past[:2]
        b, g = q.shape[:2]
        n = k_past.shape[0]
        tokens = torch.cat([torch.arange(self.sink).expand(b, -1), self.chosen(q, k_past, mask[:, 0, 0, :n]),
                            (n - self.recent + torch.arange(self.recent)).expand(b, -1)], -1)
        return attend_tokens(q, key, value, mask, k_past, v_past, tokens[:, None].expand(b, g, -1), scale, softcap)

    def seen(self, q: torch.Tensor, k_past: torch.Tensor, position: int) -> torch.Tensor:
        n = k_past.shape[0]
        if not self.sparse(n):
            return super().seen(q, k_past, position)
        chosen = self.chosen(q, k_past, torch.zeros(q.shape[0], n))
        hit = torch.zeros(q.shape[0], n, dtype=torch.bool).scatter_(-1, chosen, True)
        place = torch.arange(n)
        return (hit | (place < self.sink) | (place >= n - self.recent))[:, None].expand(-1, q.shape[1], -1)
