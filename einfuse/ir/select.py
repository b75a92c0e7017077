"""Selections: the coordinates of the ``k`` largest (or smallest) values of a fiber, in order.

``torch.topk(x, k).indices`` and ``argsort`` are captured densely, by rank
(``frontends/aten/indexing._ranked``): two Einsums,

    RANK[r.., p] = or(X[r.., p2] > X[r.., p], and(X[r.., p2] == X[r.., p], idx(p2) < idx(p)))
    OUT[r.., j]  = idx(p) * (RANK[r.., p] == idx(j))

(``RANK`` counts the elements before ``p``: larger, or equal at a lower coordinate; ``OUT[j]`` is
the coordinate ranked ``j``, 0 past the fiber's length). Computed as written that is ``P^2``
comparisons per fiber: 16 million for the 4 key heads of one decode step over 1024 pages
(``kv-pages``). The kind ``select`` (``ir/kernels.py``) computes the pair as one kernel that keeps
the ``k`` best of each fiber in one pass over it (``codegen/select.py``): the same result, in
``P`` comparisons plus ``k`` per element that enters.
"""
from __future__ import annotations

from dataclasses import dataclass

from .nodes import Access, Call, Coord, Einsum, Index, IVar
from .scope import lhs_vars, reduced_vars


@dataclass(frozen=True)
class Selection:
    """``out[.., j, ..]``: the coordinate along axis ``axis`` of ``x`` ranked ``j`` (largest first
    where ``largest``), through ``rank`` (the counts, the kernel's internal tensor)."""

    x: str
    rank: str
    out: str
    axis: int
    largest: bool


def selection(rank: Einsum, pick: Einsum) -> Selection | None:
    """The selection ``rank`` and ``pick`` compute together, or None if they are not the pair above
    over plain variables (the fiber's axis at the same place in ``X``, ``RANK`` and ``OUT``)."""
    found = _ranked(rank)
    if found is None or pick.reduce is not None or pick.populate or len(reduced_vars(pick)) != 1:
        return None
    x, axis, largest = found
    out = lhs_vars(pick)
    (p,) = reduced_vars(pick)
    want_rank = Access(rank.lhs.tensor, tuple(_at(pick.lhs.indices, axis, p)))
    if not _plain(pick.lhs) or len(out) != len(lhs_vars(rank)) or \
            pick.rhs != Call("mul", (Coord(IVar(p)), Call("eq", (want_rank, Coord(IVar(out[axis])))))):
        return None
    return Selection(x, rank.lhs.tensor, pick.lhs.tensor, axis, largest)


def _ranked(e: Einsum) -> tuple[str, int, bool] | None:
    """``(X, axis, largest)`` if ``e`` is a rank count as above."""
    red = reduced_vars(e)
    if e.reduce is not None or e.populate or len(red) != 1 or not _plain(e.lhs):
        return None
    out, (p2,) = lhs_vars(e), red
    rhs = e.rhs
    if not (isinstance(rhs, Call) and rhs.op == "or" and len(rhs.args) == 2):
        return None
    before, tie = rhs.args
    if not (isinstance(before, Call) and before.op in ("gt", "lt") and len(before.args) == 2):
        return None
    other, mine = before.args
    if not (isinstance(mine, Access) and isinstance(other, Access) and _plain(mine) and mine.tensor == other.tensor):
        return None
    names = [ix.expr.name for ix in mine.indices]   # type: ignore[union-attr]
    if names != out:
        return None
    axis = next((d for d, (a, b) in enumerate(zip(mine.indices, other.indices)) if a != b), -1)
    p = out[axis] if axis >= 0 else ""
    if axis < 0 or other.indices != tuple(_at(mine.indices, axis, p2)):
        return None
    want_tie = Call("and", (Call("eq", (other, mine)), Call("lt", (Coord(IVar(p2)), Coord(IVar(p))))))
    return (mine.tensor, axis, before.op == "gt") if tie == want_tie else None


def _plain(a: Access) -> bool:
    return all(isinstance(ix.expr, IVar) and not ix.filter for ix in a.indices)


def _at(indices: tuple, axis: int, var: str) -> list:
    """``indices`` with the one at ``axis`` reading ``var``."""
    out = list(indices)
    out[axis] = Index(IVar(var))
    return out
