"""The named pipelines, as one readable function."""
from __future__ import annotations

from .canonicalize import Canonicalize
from .fuse_attention import FuseAttention
from .manager import Pass, parse_pipeline

NAMED = ("default", "unfused", "none")


def pipeline(name_or_text: str) -> list[Pass]:
    """The passes of a named pipeline or of pipeline text.

    * ``default``: canonicalize, fuse every attention into FuseMax's 1-pass cascade, canonicalize
      again (the 3-pass Einsums it replaced are dead);
    * ``unfused``: canonicalize only (attention stays the 3-pass cascade);
    * ``none``: the captured cascade as it is.
    """
    if name_or_text == "none":
        return []
    if name_or_text == "unfused":
        return [Canonicalize()]
    if name_or_text == "default":
        return [Canonicalize(), FuseAttention(), Canonicalize()]
    return parse_pipeline(name_or_text)
