"""One backend per target kind (``cpu``, ``cuda``, ``accel``), registered by kind: see :mod:`.base`."""
from . import accel, cpu, cuda  # noqa: F401  (register the backends)
from .base import BACKENDS, Backend, TEBackend, backend_for, register_backend

__all__ = ["BACKENDS", "Backend", "TEBackend", "backend_for", "register_backend"]
