"""Print a cascade in the IR's text syntax (the contract: ``parse(to_text(c)) == c``).

Parameter data is never printed; only declarations and statements are.
"""
from __future__ import annotations

import math

from . import ops
from .nodes import (Access, Cascade, Cond, Const, Coord, Einsum, Expr, IAccess, IConst,
                    Index, IndexExpr, ISym, IVar, Loop, Rank, Stmt, TensorDecl)

# precedence of infix map operators, loosest first
_CMP, _TAKE, _ADD, _MUL, _UNARY, _ATOM = 1, 2, 3, 4, 5, 6
_INFIX_PREC = {"<": _CMP, "<=": _CMP, ">": _CMP, ">=": _CMP, "==": _CMP, "!=": _CMP,
               "<-": _TAKE, "->": _TAKE, "+": _ADD, "-": _ADD, "*": _MUL, "/": _MUL}
_INDEX_PREC = {"+": 1, "-": 1, "*": 2, "//": 2, "%": 2}


def to_text(c: Cascade) -> str:
    """The text of a cascade, one declaration or statement per line."""
    lines = [f"cascade {c.name}"]
    if c.ranks:
        lines.append("rank " + ", ".join(rank_text(r) for r in c.ranks))
    lines += [decl_text(t) for t in c.tensors]
    for s in c.stmts:
        lines += stmt_lines(s, "")
    lines += [g.comment(c) for g in c.groups]   # the kernel groups' side table, as comments
    return "\n".join(lines) + "\n"


def rank_text(r: Rank) -> str:
    """``M=S``."""
    return f"{r.name}={r.size}"


def number_text(v: float) -> str:
    """A float as the parser reads it back exactly: ``2``, ``0.125``, ``-inf``, ``1e-05``."""
    if math.isfinite(v) and float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def decl_text(t: TensorDecl) -> str:
    """``tensor RM[M1+,P] f32 empty=-inf`` (role omitted for temps, empty for dense tensors)."""
    ranks = ",".join(r.rank + ("+" if r.iterative else "") for r in t.ranks)
    parts = [f"tensor {t.name}[{ranks}]"]
    if t.role != "temp":
        parts.append(t.role)
    parts.append(t.dtype)
    if t.empty is not None:
        parts.append(f"empty={number_text(t.empty)}")
    return " ".join(parts)


def stmt_lines(s: Stmt, indent: str) -> list[str]:
    """Lines of one statement (a loop spans several)."""
    if isinstance(s, Loop):
        body = [line for b in s.body for line in stmt_lines(b, indent + "  ")]
        return [f"{indent}for {s.var} in {s.rank} {{", *body, f"{indent}}}"]
    return [indent + einsum_text(s)]


def einsum_text(e: Einsum) -> str:
    """``LHS = RHS [:: reduce[..] op] [:: populate[v] op(k)] [:: from "loc"]``."""
    text = f"{access_text(e.lhs)} = {expr_text(e.rhs)}"
    if e.reduce is not None:
        merge = f"@{e.reduce.merge}" if e.reduce.merge else ""
        text += f" :: reduce[{','.join(e.reduce.vars)}] {e.reduce.op}{merge}"
    if e.populate is not None:
        p = e.populate
        k = f"({p.k})" if ops.POPULATE_OPS[p.op][1] else ""
        text += f" :: populate[{p.var}] {p.op}{k}"
    if e.provenance is not None:
        text += ' :: from "' + e.provenance.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def access_text(a: Access) -> str:
    """``K[e,m:m<=p]``."""
    return f"{a.tensor}[{','.join(index_text(ix) for ix in a.indices)}]"


def index_text(ix: Index) -> str:
    """One index position with its filter."""
    text = iexpr_text(ix.expr)
    if ix.filter:
        text += ":" + "&".join(cond_text(c) for c in ix.filter)
    return text


def cond_text(c: Cond) -> str:
    """``m<=p``."""
    return f"{iexpr_text(c.lhs)}{c.cmp}{iexpr_text(c.rhs)}"


def iexpr_text(e: IndexExpr, parent: int = 0, right: bool = False) -> str:
    """An index expression with the fewest parentheses that parse back to the same tree."""
    if isinstance(e, IVar):
        return e.name
    if isinstance(e, ISym):
        return e.rank
    if isinstance(e, IConst):
        return str(e.value) if e.value >= 0 or parent == 0 else f"({e.value})"
    if isinstance(e, IAccess):
        return access_text(e.access)
    prec = _INDEX_PREC[e.op]
    text = f"{iexpr_text(e.a, prec)}{e.op}{iexpr_text(e.b, prec, True)}"
    return f"({text})" if prec < parent or (right and prec == parent) else text


def expr_text(x: Expr, parent: int = 0, right: bool = False) -> str:
    """A map expression; infix for ops that have an infix spelling."""
    if isinstance(x, Access):
        return access_text(x)
    if isinstance(x, Coord):
        return f"idx({iexpr_text(x.expr)})"
    if isinstance(x, Const):
        text = number_text(x.value)
        return f"({text})" if x.value < 0 and parent >= _UNARY else text
    op = ops.OPS.get(x.op)
    merge = f"@{x.merge}" if x.merge else ""
    if op is not None and op.infix and len(x.args) == 2:
        prec = _INFIX_PREC[op.infix]
        a, b = x.args
        text = f"{expr_text(a, prec, prec == _CMP)} {op.infix}{merge} {expr_text(b, prec, True)}"
        return f"({text})" if prec < parent or (right and prec == parent) else text
    if x.op == "neg" and not merge and not (isinstance(x.args[0], Const) and x.args[0].value >= 0):
        text = "-" + expr_text(x.args[0], _UNARY)
        return f"({text})" if parent > _UNARY else text
    return f"{x.op}{merge}(" + ", ".join(expr_text(a) for a in x.args) + ")"
