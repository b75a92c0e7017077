"""Quest's page selection (Tang et al., ICML'24, ``mit-han-lab/Quest``) as a decode step's attention.

The cache's keys are cut in pages of ``page`` tokens; beside the cache the host keeps each page's
elementwise minimum and maximum key (``kmin``, ``kmax`` ``[P, B, Hkv, D]`` per layer,
:func:`update_bounds` after every store). A decode step bounds each page's best score from above,

    U[b,g,p] = max over the group's query rows r of  sum_d max(q[r,d] * kmin[p,d], q[r,d] * kmax[p,d])
             = max over r of  (relu(q) kmax^T + min(q, 0) kmin^T)[r, p]   (two products, as the scores')

(Quest's criterion per query head; a GQA group's heads share a key head, so a page is as good as
the best bound among them), keeps the ``budget / page`` pages of highest ``U`` (``torch.topk``:
the decode program's ``select`` kernel) and attends to their tokens and to its own, reading only
their keys and values (gathers of the cache by token: no copy of it is made). The last page,
partly filled, may be chosen: its empty rows are masked out. With ``recent``, the last ``recent``
tokens are read too and the pages are chosen among those before them (TokenSelect's ``n_local``;
Quest alone misses the recent tokens a local model needs: docs/sparsity.md). Keys keep their
positions (RoPE was applied before caching), as in Quest. While the cache holds no more tokens
than the budget, the host runs the dense decode program instead, whose result is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import EinfuseError
from .policies import KVPolicy, merged_attention, register_policy


@register_policy
@dataclass(frozen=True)
class KVPages(KVPolicy):
    """``kv-pages{page=16,budget=1024,recent=0}``: per step, the last ``recent`` tokens and the
    ``(budget - recent) / page`` pages of highest bound among the pages before them."""

    name: ClassVar[str] = "kv-pages"
    page_bounds: ClassVar[bool] = True
    page: int = 16
    budget: int = 1024
    recent: int = 0

    def check(self, max_len: int) -> None:
        if self.page < 1 or self.budget < 1 or not 0 <= self.recent < self.budget:
            raise EinfuseError(f"{self.spelled()}: page and budget must be at least 1, recent at least 0 and "
                               "less than the budget")
        if (self.budget - self.recent) % self.page:
            raise EinfuseError(f"{self.spelled()}: the budget's pages ({self.budget - self.recent} tokens) are "
                               f"not a whole number of pages of {self.page}")

    @property
    def pages(self) -> int:
        """The pages a step chooses."""
        return (self.budget - self.recent) // self.page

    def page_count(self, tokens: int) -> int:
        """The pages ``tokens`` cached tokens fill (the last one in part)."""
        return math.ceil(tokens / self.page)

    def sparse(self, tokens: int) -> bool:
        """A step after ``tokens`` cached ones reads fewer than all of them (else: dense attention)."""
        return tokens > self.budget

    def chosen(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, tokens: Any) -> torch.Tensor:
        """The pages each key head reads, ``[B, Hkv, pages]``, best first, for the query rows ``q``
        ``[B, Hkv, R, D]`` (a group's heads), the page bounds ``[P, B, Hkv, D]`` and ``tokens``
        cached (with ``recent``, a page reaching into the last ``recent`` tokens is not chosen)."""
        # (max(q kmin, q kmax) is q kmax where q >= 0, else q kmin: two products, as the scores' are)
        high, low = (torch.einsum("pbgd,bgrd->bgpr", bound, part) for bound, part in
                     ((kmax, q.clamp(min=0)), (kmin, q.clamp(max=0))))
        bound = (high + low).amax(-1)
        if self.recent:
            late = (torch.arange(kmin.shape[0]) + 1) * self.page > tokens - self.recent
            bound = bound.masked_fill(late, float("-inf"))
        return bound.topk(self.pages, -1).indices

    def seen(self, q: torch.Tensor, k_past: torch.Tensor, position: int) -> torch.Tensor:
        n = k_past.shape[0]
        pages = self.page_count(n)
        if not self.sparse(n):   # (as the host runs the dense program)
            return super().seen(q, k_past, position)
        padded = torch.cat([k_past, k_past[-1:].expand(pages * self.page - n, *k_past.shape[1:])])
        paged = padded.reshape(pages, self.page, *k_past.shape[1:])
        chosen = self.chosen(q, paged.amin(1), paged.amax(1), n)                    # [B, Hkv, S]
        hit = torch.zeros(*chosen.shape[:2], pages, dtype=torch.bool).scatter_(-1, chosen, True)
        return hit.repeat_interleave(self.page, -1)[..., :n] | (torch.arange(n) >= n - self.recent)

    def example_tokens(self) -> int:
        return self.budget + self.page

    def attend(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
               past: Sequence[torch.Tensor], scale: float, softcap: float | None) -> torch.Tensor:
        k_past, v_past, kmin, kmax = past
        b, g, _, _ = q.shape
        n = k_past.shape[0]
        tokens = (self.chosen(q, kmin, kmax, n)[..., None] * self.page + torch.arange(self.page)).reshape(b, g, -1)
        if self.recent:
            tokens = torch.cat([tokens, (n - self.recent + torch.arange(self.recent)).expand(b, g, -1)], -1)
        return attend_tokens(q, key, value, mask, k_past, v_past, tokens, scale, softcap)


def attend_tokens(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, k_past: torch.Tensor,
                  v_past: torch.Tensor, tokens: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """Attention of ``q`` ``[B, Hkv, R, D]`` over the cached tokens ``tokens`` ``[B, Hkv, J]`` (read
    where they are: gathers of the cache, no copy; one at or past the cache's end masked out) and
    the step's own key: transformers' eager attention restricted to them (see ``KVPolicy.attend``)."""
    b, g, _, d = q.shape
    n = k_past.shape[0]
    inside = tokens < n
    tokens = tokens.clamp(max=n - 1)
    j = tokens.shape[-1]
    at = tokens[..., None].expand(b, g, j, d)
    keys, values = (torch.gather(x.permute(1, 2, 0, 3), 2, at) for x in (k_past, v_past))
    seen = torch.gather(mask[:, 0, 0, :n], 1, tokens.reshape(b, g * j)).reshape(b, g, 1, j)
    seen = torch.where(inside[:, :, None], seen, torch.finfo(q.dtype).min)
    masks = (seen, mask[:, None, 0, :, n:].expand(b, g, 1, 1))
    return merged_attention(q, q @ keys.transpose(-1, -2), values, key, value, masks, scale, softcap)


def update_bounds(kmin: torch.Tensor, kmax: torch.Tensor, keys: torch.Tensor, start: int, end: int,
                  page: int) -> None:
    """Recompute, in place, the bounds of the pages holding cached tokens ``start`` to ``end - 1``
    from ``keys`` (the cache ``[max_len, B, Hkv, D]``, its first ``end`` rows filled)."""
    for p in range(start // page, (end - 1) // page + 1):
        rows = keys[p * page:min((p + 1) * page, end)]
        kmin[p] = rows.amin(0)
        kmax[p] = rows.amax(0)
