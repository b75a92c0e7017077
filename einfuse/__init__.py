"""einfuse: a compiler for PyTorch models over an extended-Einsum cascade IR."""
from . import errors, ir

__all__ = ["errors", "ir"]
__version__ = "0.1.0"
