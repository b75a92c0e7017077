"""einfuse: a compiler for PyTorch models over an extended-Einsum cascade IR.

``einfuse.capture(model, args)`` captures a torch model (imported on first use, so that working
with ``.ein`` files does not load torch); ``einfuse.ir`` is the IR; ``einfuse.errors`` the errors.
"""
from typing import Any

from . import errors, ir

__all__ = ["capture", "errors", "ir"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "capture":
        from .frontends import capture
        return capture
    raise AttributeError(f"module 'einfuse' has no attribute '{name}'")
