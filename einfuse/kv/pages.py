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
partly filled, may be chosen: its empty rows are masked out. Keys keep their positions (RoPE was
applied before caching), as in Quest. While the cache holds no more pages than a step reads,
the host runs the dense decode program instead, whose result is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from .policies import _Paged, register_policy


@register_policy
@dataclass(frozen=True)
class KVPages(_Paged):
    """``kv-pages{page=16,budget=1024}``: the ``budget / page`` pages of highest bound per step."""

    name: ClassVar[str] = "kv-pages"

    def chosen(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
        """The pages each key head reads, ``[B, Hkv, budget / page]``, best first, for the query
        rows ``q`` ``[B, Hkv, R, D]`` (a group's heads) and the page bounds ``[P, B, Hkv, D]``."""
        # (max(q kmin, q kmax) is q kmax where q >= 0, else q kmin: two products, as the scores' are)
        high, low = (torch.einsum("pbgd,bgrd->bgpr", bound, part) for bound, part in
                     ((kmax, q.clamp(min=0)), (kmin, q.clamp(max=0))))
        return (high + low).amax(-1).topk(self.pages, -1).indices

    def seen(self, q: torch.Tensor, k_past: torch.Tensor, position: int) -> torch.Tensor:
        n = k_past.shape[0]
        pages = self.page_count(n)
        if pages <= self.pages:   # (as the host runs the dense program)
            return super().seen(q, k_past, position)
        padded = torch.cat([k_past, k_past[-1:].expand(pages * self.page - n, *k_past.shape[1:])])
        paged = padded.reshape(pages, self.page, *k_past.shape[1:])
        chosen = self.chosen(q, paged.amin(1), paged.amax(1))                       # [B, Hkv, S]
        hit = torch.zeros(*chosen.shape[:2], pages, dtype=torch.bool).scatter_(-1, chosen, True)
        return hit.repeat_interleave(self.page, -1)[..., :n]

    def attend(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
               past: Sequence[torch.Tensor], scale: float, softcap: float | None) -> torch.Tensor:
        """One decode step's attention over the chosen pages and its own key: ``q`` ``[B, Hkv, R, D]``,
        ``key``/``value`` ``[B, Hkv, 1, D]``, the additive ``mask`` ``[B, 1, 1, L + 1]``, ``past`` =
        (the cached K, V ``[L, B, Hkv, D]``, kmin, kmax); the output ``[B, Hkv, R, D]``."""
        k_past, v_past, kmin, kmax = past
        b, g, r, d = q.shape
        n = k_past.shape[0]
        tokens = (self.chosen(q, kmin, kmax)[..., None] * self.page + torch.arange(self.page)).reshape(b, g, -1)
        inside = tokens < n
        tokens = tokens.clamp(max=n - 1)
        j = tokens.shape[-1]
        at = tokens[..., None].expand(b, g, j, d)
        keys, values = (torch.gather(x.permute(1, 2, 0, 3), 2, at) for x in (k_past, v_past))
        scores = torch.cat([q @ keys.transpose(-1, -2), q @ key.transpose(-1, -2)], -1) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        seen = torch.gather(mask[:, 0, 0, :n], 1, tokens.reshape(b, g * j)).reshape(b, g, 1, j)
        seen = torch.where(inside[:, :, None], seen, torch.finfo(scores.dtype).min)
        p = (scores + torch.cat([seen, mask[:, None, 0, :, n:].expand(b, g, 1, 1)], -1)).softmax(-1).to(value.dtype)
        return p[..., :j] @ values + p[..., j:] @ value


def update_bounds(kmin: torch.Tensor, kmax: torch.Tensor, keys: torch.Tensor, start: int, end: int,
                  page: int) -> None:
    """Recompute, in place, the bounds of the pages holding cached tokens ``start`` to ``end - 1``
    from ``keys`` (the cache ``[max_len, B, Hkv, D]``, its first ``end`` rows filled)."""
    for p in range(start // page, (end - 1) // page + 1):
        rows = keys[p * page:min((p + 1) * page, end)]
        kmin[p] = rows.amin(0)
        kmax[p] = rows.amax(0)
