"""The verifier: every rule a well-formed cascade obeys, each broken rule a precise error.

Errors name the Einsum (its text, and its line when it was parsed from text) and the rule.
Nothing in a cascade makes it fail otherwise: nesting past ``MAX_DEPTH``, sizes that are not
sizes and integers past ``MAX_SIZE`` are broken rules, checked before any recursive walk.
"""
from __future__ import annotations

import math

from ..errors import VerificationError
from . import ops
from .dtypes import DTYPES
from .nodes import (MAX_DEPTH, ROLES, Access, Call, Cascade, Coord, Einsum, Expr, IBin, IConst, IndexExpr,
                    ISym, IVar, Loop, Stmt, nesting_problem)
from .scope import (declarations, gathers, index_atoms, iteration_vars, loop_vars, reads,
                    reduced_vars, undeclarable, var_ranks)
from .sizes import MAX_SIZE, size_problem
from .text import access_text, einsum_text


def verify(c: Cascade) -> Cascade:
    """Check ``c`` against the IR's rules; raise :class:`VerificationError` on the first broken one.

    Returns ``c`` so calls can be chained.
    """
    _check_nesting(c)
    _check_declarations(c)
    _Checker(c).stmts(c.stmts, ())
    return c


def describe(e: Einsum) -> str:
    """An Einsum as error messages name it: ``line 7: einsum `Z[m] = A[m]```."""
    line = f"line {e.line}: " if e.line is not None else ""
    return f"{line}einsum `{einsum_text(e)}`"


def _check_nesting(c: Cascade) -> None:
    """No statement nests deeper than ``MAX_DEPTH`` (walked with a stack: any depth is measured)."""
    stack: list[tuple[Stmt, int]] = [(s, 0) for s in reversed(c.stmts)]
    while stack:
        s, loops = stack.pop()
        line = f"line {s.line}: " if s.line is not None else ""
        if isinstance(s, Loop):
            if loops >= MAX_DEPTH:
                raise VerificationError(f"{line}'for' loops nested more than {MAX_DEPTH} deep")
            stack.extend((b, loops + 1) for b in reversed(s.body))
        elif nesting_problem(s, loops):
            raise VerificationError(f"{line}{nesting_problem(s, loops)}")


def _check_declarations(c: Cascade) -> None:
    for r in c.ranks:
        problem = size_problem(r.size)
        if problem:
            raise VerificationError(f"rank '{r.name}' {problem}")
    seen: dict[str, str] = {}
    for r in c.ranks:
        if r.var in seen:
            raise VerificationError(f"ranks '{seen[r.var]}' and '{r.name}' share the variable '{r.var}'")
        seen[r.var] = r.name
    ranks = {r.name for r in c.ranks}
    names: set[str] = set()
    for t in c.tensors:
        if t.name in names:
            raise VerificationError(f"tensor '{t.name}' is declared twice")
        names.add(t.name)
        missing = [r.rank for r in t.ranks if r.rank not in ranks]
        if missing:
            raise VerificationError(f"tensor '{t.name}' uses undeclared rank '{missing[0]}'")
        if t.role not in ROLES:
            raise VerificationError(f"tensor '{t.name}' has unknown role '{t.role}'")
        if t.dtype not in DTYPES:
            raise VerificationError(f"tensor '{t.name}' has unknown dtype '{t.dtype}'")
        if t.empty is not None and math.isnan(t.empty):
            raise VerificationError(f"tensor '{t.name}' has empty=nan; empty must be a number or ±inf")


class _Checker:
    def __init__(self, c: Cascade) -> None:
        self.c = c
        self.decls = declarations(c)
        self.ranks = var_ranks(c)
        self.rank_names = {r.name for r in c.ranks}
        self.written: set[str] = set()
        bad = undeclarable(c)
        if bad:
            first = next(e for e, _ in c.einsums() if e.lhs.tensor == bad[0])
            raise VerificationError(f"{describe(first)}: cannot infer the ranks of '{bad[0]}' from its "
                                    f"writes; declare it with a 'tensor {bad[0]}[...]' line")

    def stmts(self, stmts: tuple[Stmt, ...], loops: tuple[Loop, ...]) -> None:
        for s in stmts:
            if isinstance(s, Loop):
                self.loop(s, loops)
            else:
                self.einsum(s, loops)
        if not loops:
            unwritten = [t.name for t in self.c.tensors if t.role == "output" and t.name not in self.written]
            if unwritten:
                raise VerificationError(f"output tensor '{unwritten[0]}' is never written")

    def loop(self, lp: Loop, loops: tuple[Loop, ...]) -> None:
        line = f"line {lp.line}: " if lp.line is not None else ""
        head = f"{line}loop 'for {lp.var} in {lp.rank}'"
        if lp.rank not in self.rank_names:
            raise VerificationError(f"{head} iterates undeclared rank '{lp.rank}'")
        if any(outer.rank == lp.rank for outer in loops):
            raise VerificationError(f"{head} is nested inside a loop over the same rank")
        if not lp.body:
            raise VerificationError(f"{head} has an empty body")
        self.stmts(lp.body, loops + (lp,))

    def einsum(self, e: Einsum, loops: tuple[Loop, ...]) -> None:
        where = describe(e)
        bound = loop_vars(loops)
        out = self.decls[e.lhs.tensor]
        if out.role in ("input", "param"):
            raise VerificationError(f"{where}: writes to {out.role} tensor '{out.name}'")
        if any(True for _ in gathers(e.lhs)):
            raise VerificationError(f"{where}: the output access may not use a data-dependent index")
        for a in [e.lhs] + reads(e):
            self.access(a, e, where, bound, is_write=a is e.lhs)
        self.expr(e.rhs, where)
        self.actions(e, where, bound)
        self.self_reads(e, where, bound)
        self.written.add(e.lhs.tensor)

    def access(self, a: Access, e: Einsum, where: str, bound: frozenset[str], is_write: bool) -> None:
        decl = self.decls.get(a.tensor)
        if decl is None:
            raise VerificationError(f"{where}: tensor '{a.tensor}' is not declared and never written")
        if not is_write and decl.role in ("temp", "output") and a.tensor not in self.written:
            raise VerificationError(f"{where}: {decl.role} '{a.tensor}' is read before it is written")
        if len(a.indices) != len(decl.ranks):
            raise VerificationError(f"{where}: '{access_text(a)}' has {len(a.indices)} indices but "
                                    f"'{a.tensor}' has {len(decl.ranks)} ranks "
                                    f"[{','.join(r.rank for r in decl.ranks)}]")
        for ix, tr in zip(a.indices, decl.ranks):
            for e_ in [ix.expr] + [x for cnd in ix.filter for x in (cnd.lhs, cnd.rhs)]:
                self.index_names(e_, where)
            if tr.iterative:
                self.iterate_index(ix.expr, tr.rank, a, where, bound, is_write)

    def index_names(self, e: IndexExpr, where: str) -> None:
        for atom in index_atoms(e):
            if isinstance(atom, IConst) and abs(atom.value) > MAX_SIZE:
                raise VerificationError(f"{where}: the index constant {atom.value} is larger than 2**62")
            if isinstance(atom, IVar) and atom.name not in self.ranks:
                raise VerificationError(f"{where}: unknown variable '{atom.name}' (no rank "
                                        f"'{atom.name.upper()}' is declared)")
            if isinstance(atom, ISym) and atom.rank not in self.rank_names:
                raise VerificationError(f"{where}: unknown rank '{atom.rank}' used as a size")

    def iterate_index(self, e: IndexExpr, rank: str, a: Access, where: str, bound: frozenset[str],
                      is_write: bool) -> None:
        var = rank.lower()
        if var in bound and e == ISym(rank):
            raise VerificationError(f"{where}: reads the terminal iterate '{access_text(a)}' inside "
                                    f"'for {var} in {rank}'; move this Einsum after the loop")
        if is_write and var not in bound and _mentions(e, var):
            raise VerificationError(f"{where}: writes iterate '{access_text(a)}' outside "
                                    f"'for {var} in {rank}'; recurrences need a loop")

    def expr(self, x: Expr, where: str) -> None:
        if isinstance(x, Coord):
            self.index_names(x.expr, where)
        if not isinstance(x, Call):
            return
        op = ops.lookup(x.op)
        if op is None:
            raise VerificationError(f"{where}: unknown op '{x.op}'")
        if len(x.args) != op.arity:
            raise VerificationError(f"{where}: op '{x.op}' takes {op.arity} argument(s), given {len(x.args)}")
        if x.merge is not None and x.merge not in ops.MERGES:
            raise VerificationError(f"{where}: unknown merge '{x.merge}' on '{x.op}'")
        for arg in x.args:
            self.expr(arg, where)

    def actions(self, e: Einsum, where: str, bound: frozenset[str]) -> None:
        reduced = reduced_vars(e, bound)
        if e.reduce is not None:
            r = e.reduce
            if r.op not in ops.REDUCE_OPS:
                raise VerificationError(f"{where}: unknown reduce op '{r.op}'")
            if r.merge is not None and r.merge not in ("cup", "cap"):
                raise VerificationError(f"{where}: a reduce merges with cup or cap, not '{r.merge}'")
            if set(r.vars) != set(reduced) or len(r.vars) != len(set(r.vars)):
                shown = ",".join(reduced) if reduced else "nothing"
                raise VerificationError(f"{where}: reduce[{','.join(r.vars)}] must name exactly the "
                                        f"reduced variables (on the right, not on the left): {shown}")
        if e.populate is not None:
            p = e.populate
            if p.op not in ops.POPULATE_OPS:
                raise VerificationError(f"{where}: unknown populate op '{p.op}'")
            if p.var not in iteration_vars(e, bound) or p.var in reduced:
                raise VerificationError(f"{where}: populate[{p.var}] must name a variable of the output")
            if not 1 <= p.k <= MAX_SIZE:
                raise VerificationError(f"{where}: populate {p.op}({p.k}) needs 1 <= k <= 2**62")

    def self_reads(self, e: Einsum, where: str, bound: frozenset[str]) -> None:
        own = [a for a in reads(e) if a.tensor == e.lhs.tensor]
        if not own:
            return
        decl = self.decls[e.lhs.tensor]
        for d, tr in enumerate(decl.ranks):
            v = tr.rank.lower()
            if tr.iterative and v in bound and e.lhs.indices[d].expr == _plus_one(v) \
                    and all(a.indices[d].expr != _plus_one(v) for a in own):
                return
        raise VerificationError(f"{where}: reads its own output '{e.lhs.tensor}'; only a loop-carried "
                                f"read (X[..m1..] while writing X[..m1+1..] inside 'for m1') is allowed")


def _plus_one(var: str) -> IndexExpr:
    return IBin("+", IVar(var), IConst(1))


def _mentions(e: IndexExpr, var: str) -> bool:
    return any(isinstance(a, IVar) and a.name == var for a in index_atoms(e))
