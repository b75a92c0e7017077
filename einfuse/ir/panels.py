"""The weight panel layout, in one place: a GEMM's streamed weight ``W[k,n]`` stored as the
register tile's column panels, ``W_p[n//nr, k, n%nr]``, each panel contiguous.

``pack-weights`` (``passes/layout.py``) writes it, the cost model (``targets/cost.py``) and the
CPU schedules (``codegen/schedules/cpu.py``) recognise it: a panel read needs no per-call copy.
"""
from __future__ import annotations

import numpy as np

from .nodes import Access, Einsum, IBin, IConst, Index
from .scope import reads

#: A panel read's shape: three indices, the lane (``n % nr``) last; the TIR of a panel read keeps
#: it (``FloorMod`` last), which is how the CPU schedules recognise one.
INDICES, LANE_OP = 3, "%"


def panel_access(weight: Access, packed: str, nr: int) -> Access:
    """The read of ``weight`` (``W[k,n]``) from its panels ``packed``: ``packed[n//nr, k, n%nr]``."""
    k, n = (ix.expr for ix in weight.indices)
    return Access(packed, (Index(IBin("//", n, IConst(nr))), Index(k), Index(IBin(LANE_OP, n, IConst(nr)))))


def panel_data(w: np.ndarray, nr: int) -> np.ndarray:
    """``w`` (``[k, n]``, ``nr`` dividing ``n``) as its panels ``[n//nr, k, nr]``, contiguous."""
    depth, cols = w.shape
    return np.ascontiguousarray(w.reshape(depth, cols // nr, nr).transpose(1, 0, 2))


def is_panel_read(a: Access) -> bool:
    """Whether ``a`` reads panels (:func:`panel_access`'s form: three indices, the last ``n % nr``)."""
    last = a.indices[-1].expr if len(a.indices) == INDICES else None
    return isinstance(last, IBin) and last.op == LANE_OP


def reads_panels(e: Einsum) -> bool:
    """Whether Einsum ``e`` reads a weight stored as panels."""
    return any(is_panel_read(a) for a in reads(e))
