"""BiFormer's bi-level routing attention (Zhu et al., CVPR'23, ``rayleizhu/BiFormer``) for encoders
and vision models: ``with einfuse.kv.routed("region-route{regions=7,topk=4}"): einfuse.compile(...)``.

The tokens of a square grid (``side x side``, row-major, no class token) are cut in ``regions x
regions`` regions. Per region, the mean query and the mean key; the region-to-region affinity is
their dot product over every head's channels (BiFormer routes on the merged heads), and each query
region keeps the ``topk`` key regions of highest affinity (a ``select`` kernel). Its queries then
attend to those regions' tokens only, gathered by region (``topk * tokens per region`` keys, not
``side^2``). BiFormer's local context enhancement (a depthwise convolution of V added to the
output) belongs to its block, not to the attention, and is left to the model. With ``topk =
regions^2`` every region is kept: dense attention (tested).

While :func:`routed` is active, ``torch.nn.functional.scaled_dot_product_attention`` over ``side^2``
tokens (no mask, not causal, a side the regions divide) is this attention; any other call is
SDPA's own. It is applied while the model is captured, so the compiled cascade computes the routing.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch

from ..errors import EinfuseError
from ..passes.manager import parse_one


@dataclass(frozen=True)
class RegionRoute:
    """``region-route{regions=7,topk=4}``: each query region attends to its ``topk`` key regions."""

    name: ClassVar[str] = "region-route"
    regions: int = 7
    topk: int = 4

    def fits(self, tokens: int) -> bool:
        """``tokens`` make a square grid the regions divide."""
        side = math.isqrt(tokens)
        return side * side == tokens and side % self.regions == 0

    def check(self) -> None:
        if self.regions < 1 or not 1 <= self.topk <= self.regions ** 2:
            raise EinfuseError(f"region-route{{regions={self.regions},topk={self.topk}}}: regions must be at least 1 "
                               f"and topk between 1 and regions^2 = {self.regions ** 2}")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Routed attention of ``q``, ``k``, ``v`` ``[B, H, side^2, D]`` (grid tokens, row-major)."""
        b, h, n, d = q.shape
        s = self.regions
        side = math.isqrt(n)
        qr, kr, vr = (_by_region(x, s, side) for x in (q, k, v))                     # [B, H, S^2, t, D]
        affinity = torch.einsum("bhid,bhjd->bij", qr.mean(3), kr.mean(3))              # [B, S^2, S^2]
        chosen = affinity.topk(self.topk, -1).indices                                # [B, S^2, K]
        t = qr.shape[3]
        at = chosen[:, None, :, :, None, None].expand(b, h, s * s, self.topk, t, d)
        keys, values = (torch.gather(x[:, :, None].expand(b, h, s * s, s * s, t, d), 3, at).reshape(
            b, h, s * s, self.topk * t, d) for x in (kr, vr))
        p = (qr @ keys.transpose(-1, -2) * (d ** -0.5 if scale is None else scale)).softmax(-1)
        return _from_regions(p @ values, s, side)


def _by_region(x: torch.Tensor, s: int, side: int) -> torch.Tensor:
    """``[B, H, side^2, D]`` as ``[B, H, s^2, (side/s)^2, D]``: region by region, each row-major."""
    b, h, _, d = x.shape
    w = side // s
    return x.reshape(b, h, s, w, s, w, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, s * s, w * w, d)


def _from_regions(x: torch.Tensor, s: int, side: int) -> torch.Tensor:
    """The inverse of :func:`_by_region`."""
    b, h, _, _, d = x.shape
    w = side // s
    return x.reshape(b, h, s, s, w, w, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, side * side, d)


def parse_route(spec: str) -> RegionRoute:
    """The routing ``spec`` spells (``region-route{regions=7,topk=4}``), checked."""
    route = parse_one(spec, {RegionRoute.name: RegionRoute}, "routing")
    route.check()
    return route


@contextlib.contextmanager
def routed(spec: str | RegionRoute) -> Iterator[RegionRoute]:
    """Within: SDPA over a grid of tokens the regions divide is region-routed attention."""
    route = spec if isinstance(spec, RegionRoute) else parse_route(spec)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, **kwargs: Any) -> torch.Tensor:
        if attn_mask is None and not is_causal and not kwargs and q.shape == k.shape and route.fits(q.shape[-2]):
            return route.attend(q, k, v, scale)
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield route
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
