"""The named pipelines, as one readable function."""
from __future__ import annotations

from .canonicalize import Canonicalize
from .manager import Pass, parse_pipeline

NAMED = ("default", "none")


def pipeline(name_or_text: str) -> list[Pass]:
    """The passes of a named pipeline (``default``, ``none``) or of pipeline text."""
    if name_or_text == "none":
        return []
    if name_or_text == "default":
        return [Canonicalize()]
    return parse_pipeline(name_or_text)
