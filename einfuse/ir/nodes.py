"""The IR's node types: frozen dataclasses, so structural equality drives round-trip tests.

A :class:`Cascade` is rank declarations, tensor declarations and an ordered list of statements.
A statement is an :class:`Einsum` or a :class:`Loop` over an iterative rank holding statements.
See ``docs/ir.md`` for the text syntax and semantics.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Union

import numpy as np
import sympy

if TYPE_CHECKING:
    from .kernels import Kernel

Size = Union[int, sympy.Expr]
ROLES = ("input", "param", "temp", "output")

#: How deeply a statement's nodes may nest (loops, ops, accesses, index arithmetic, gathers): the
#: parser and the verifier refuse deeper ones, so every recursive walk over the IR stays far from
#: Python's recursion limit. Real models nest under 10 deep.
MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Rank:
    """A rank (dimension) and its size, an int or a sympy expression of size symbols."""

    name: str
    size: Size

    @property
    def var(self) -> str:
        """The variable that ranges over this rank: its name in lower case."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class TensorRank:
    """One rank of a tensor; an iterative rank (``M1+``) has extent size+1."""

    rank: str
    iterative: bool = False


@dataclass(frozen=True, slots=True)
class TensorDecl:
    """A tensor: its ranks, role, dtype and EDGE ``empty`` value.

    With an ``empty`` value (fibertree convention) absent points read as it and a write of that
    value is not stored. Without one (None, the default) the tensor is dense: every written point
    is stored, and points never written, filtered out or out of range read as 0.
    """

    name: str
    ranks: tuple[TensorRank, ...]
    role: str = "temp"
    dtype: str = "f32"
    empty: float | None = None

    @property
    def fill(self) -> float:
        """What an absent point reads as: the empty value, or 0 for a dense tensor."""
        return 0.0 if self.empty is None else self.empty


# ---- index expressions ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class IVar:
    """A rank variable, e.g. ``m`` ranging over rank ``M``."""

    name: str


@dataclass(frozen=True, slots=True)
class IConst:
    """An integer constant index."""

    value: int


@dataclass(frozen=True, slots=True)
class ISym:
    """A rank's size used as a value: ``M0`` in ``m1*M0+m0``, or the terminal iterate ``M1``."""

    rank: str


@dataclass(frozen=True, slots=True)
class IBin:
    """Integer arithmetic on indices: ``+ - * // %``."""

    op: str
    a: "IndexExpr"
    b: "IndexExpr"


@dataclass(frozen=True, slots=True)
class IAccess:
    """A data-dependent index (gather), e.g. ``ids[b]`` in ``EMB[ids[b],d]``."""

    access: "Access"


IndexExpr = Union[IVar, IConst, ISym, IBin, IAccess]


@dataclass(frozen=True, slots=True)
class Cond:
    """One filter comparison, e.g. ``m<=p``."""

    lhs: IndexExpr
    cmp: str
    rhs: IndexExpr


@dataclass(frozen=True, slots=True)
class Index:
    """One index position of an access, with an optional filter (``m:m<=p``)."""

    expr: IndexExpr
    filter: tuple[Cond, ...] = ()


# ---- map expressions --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Access:
    """A read or write of a tensor at index expressions."""

    tensor: str
    indices: tuple[Index, ...]


@dataclass(frozen=True, slots=True)
class Const:
    """A floating-point constant (``inf`` allowed)."""

    value: float


@dataclass(frozen=True, slots=True)
class Call:
    """A registered compute op applied to arguments; ``merge`` None means the op's default.

    Ops with an infix spelling (``+ - * / <- -> < <= ...``) print infix.
    """

    op: str
    args: tuple["Expr", ...]
    merge: str | None = None


@dataclass(frozen=True, slots=True)
class Coord:
    """A coordinate used as a value: ``idx(m1*M0+m0)`` is the integer that index takes (arange)."""

    expr: IndexExpr


Expr = Union[Access, Const, Call, Coord]


# ---- actions and statements -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Reduce:
    """An explicit reduce action: ``:: reduce[m] max`` (absent means: sum the reduced vars)."""

    vars: tuple[str, ...]
    op: str = "+"
    merge: str | None = None


@dataclass(frozen=True, slots=True)
class Populate:
    """A coordinate action: keep only the chosen coordinates of ``var`` (``topk(2)``, ``argmax``)."""

    var: str
    op: str
    k: int = 1


@dataclass(frozen=True, slots=True)
class Einsum:
    """One extended Einsum: ``lhs = rhs :: reduce :: populate``.

    ``provenance`` is where it came from (a torch source location); ``line`` is the line of the
    .ein text it was parsed from, used in error messages only.
    """

    lhs: Access
    rhs: Expr
    reduce: Reduce | None = None
    populate: Populate | None = None
    provenance: str | None = None
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Loop:
    """``for m1 in M1 { ... }``: run the body once per coordinate of an iterative rank."""

    rank: str
    body: tuple["Stmt", ...]
    line: int | None = field(default=None, compare=False)

    @property
    def var(self) -> str:
        """The loop variable."""
        return self.rank.lower()


Stmt = Union[Einsum, Loop]


@dataclass(frozen=True)
class Cascade:
    """A whole program: ranks, tensor declarations and ordered statements.

    ``params`` holds the data of ``param`` tensors (weights). It is not part of equality and is
    never printed.
    """

    name: str
    ranks: tuple[Rank, ...]
    tensors: tuple[TensorDecl, ...]
    stmts: tuple[Stmt, ...]
    params: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    #: The kernel groups (:class:`~einfuse.ir.kernels.Kernel`, in execution order) once the
    #: ``group-kernels`` pass ran: the mapping side table, not part of the IR or its equality.
    groups: tuple["Kernel", ...] = field(default=(), compare=False, repr=False)
    #: The range ``(least, greatest or None)`` a size symbol may take (a ``torch.export.Dim``'s
    #: ``min``/``max``), by symbol name: what a compiled model checks its inputs against.
    size_ranges: Mapping[str, tuple[int, int | None]] = field(default_factory=dict, compare=False, repr=False)

    def __str__(self) -> str:
        from .text import to_text
        return to_text(self)

    def rank(self, name: str) -> Rank | None:
        """The declared rank called ``name``, or None."""
        return next((r for r in self.ranks if r.name == name), None)

    def tensor(self, name: str) -> TensorDecl | None:
        """The explicitly declared tensor called ``name``, or None."""
        return next((t for t in self.tensors if t.name == name), None)

    def einsums(self) -> Iterator[tuple[Einsum, tuple[Loop, ...]]]:
        """Every Einsum in program order with the loops that enclose it (outermost first)."""
        return walk(self.stmts)


def walk(stmts: tuple[Stmt, ...], loops: tuple[Loop, ...] = ()) -> Iterator[tuple[Einsum, tuple[Loop, ...]]]:
    """Every Einsum under ``stmts`` with its enclosing loops, in program order."""
    for s in stmts:
        if isinstance(s, Loop):
            yield from walk(s.body, loops + (s,))
        else:
            yield s, loops


def depth(node: Any) -> int:
    """How many IR nodes nest under and including ``node`` (a leaf is 1; tuples do not count).

    Iterative, so it measures trees of any depth (the verifier's guard against deep ones)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        x, d = stack.pop()
        deepest = max(deepest, d)
        for name in _field_names(type(x)):
            value = getattr(x, name)
            for child in value if type(value) is tuple else (value,):
                if _field_names(type(child)):
                    stack.append((child, d + 1))
    return deepest


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    """The fields of a node class; none for anything else."""
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()


def nesting_problem(e: Einsum, loops: int = 0) -> str | None:
    """Why ``e`` inside ``loops`` enclosing loops nests too deep (None when it does not)."""
    n = depth(e) + loops
    if n <= MAX_DEPTH:
        return None
    return (f"the einsum writing '{e.lhs.tensor}' nests {n} deep; the limit is {MAX_DEPTH} "
            "(split it into several Einsums)")


def rewrite(node: Any, fn: Callable[[Any], Any]) -> Any:
    """``node`` rebuilt bottom-up with ``fn`` applied to every node (tuples walked; a statement's
    line and provenance kept as they are). ``fn`` returns its argument for nodes it leaves alone."""
    if isinstance(node, tuple):
        return tuple(rewrite(x, fn) for x in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type) and not isinstance(node, Cascade):
        changes = {f.name: rewrite(getattr(node, f.name), fn) for f in dataclasses.fields(node)
                   if f.name not in ("line", "provenance")}
        node = dataclasses.replace(node, **changes)
    return fn(node)
