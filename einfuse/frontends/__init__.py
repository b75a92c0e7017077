"""Frontends: capture models into cascades."""
from .torch_export import capture

__all__ = ["capture"]
