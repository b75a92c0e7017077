"""Parse the IR's text syntax into a :class:`Cascade`.

The grammar (see ``docs/ir.md``) is line oriented: a ``cascade`` header, ``rank`` and ``tensor``
declarations, one Einsum per line, and ``for v in R {`` ... ``}`` loops, each line read as tokens
(:mod:`.lexer`). Errors carry the line, column and offending text.

Nothing in any text makes it fail otherwise: brackets, calls, unary minus and loops nest at most
``MAX_DEPTH`` deep (and a statement's tree no deeper), integer literals are at most ``MAX_SIZE``,
float literals stay in range, sizes are read by a grammar of their own (``sizes.SizeReader``), and
the time taken is linear in the text.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import EinfuseError, IRParseError
from . import ops
from .dtypes import DTYPES
from .lexer import COMPARISONS, Line, Token, float_literal
from .nodes import (MAX_DEPTH, ROLES, Access, Call, Cascade, Cond, Const, Coord, Einsum, Expr, IAccess,
                    IBin, IConst, Index, IndexExpr, ISym, IVar, Loop, Populate, Rank, Reduce, Size,
                    Stmt, TensorDecl, TensorRank, nesting_problem)
from .sizes import SizeReader, literal


def parse(text: str) -> Cascade:
    """Parse cascade text. Raises :class:`einfuse.errors.IRParseError` with line and column."""
    return _Parser(text).cascade()


def parse_file(path: str | Path) -> Cascade:
    """Parse a ``.ein`` file: IRParseError where it is not UTF-8 or not a cascade, EinfuseError
    where it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EinfuseError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start, end = data.rfind(b"\n", 0, exc.start) + 1, data.find(b"\n", exc.start)
        line = data[start:end if end >= 0 else len(data)].decode("utf-8", "replace")
        raise IRParseError("the file is not UTF-8", data.count(b"\n", 0, exc.start) + 1,
                           len(data[start:exc.start].decode("utf-8", "replace")) + 1, line) from None
    return parse(text)


class _Parser:
    """One parse: the declarations read so far and the statements, nested by the loops open."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.name: str | None = None
        self.ranks: dict[str, Rank] = {}
        self.sizes: dict[str, Size] = {}
        self.tensors: dict[str, TensorDecl] = {}
        self.tensor_ranks: list[tuple[str, Token, Line]] = []   # to check once every rank is declared

    def cascade(self) -> Cascade:
        stack: list[tuple[list[Stmt], str, int]] = [([], "", 0)]
        for lineno, raw in enumerate(self.lines, 1):
            ln = Line(raw, lineno)
            if not ln.toks:
                continue
            if self.name is None:
                self.header(ln)
            elif ln.keyword() == "}":
                ln.next("}")
                ln.done()
                if len(stack) == 1:
                    raise ln.error("'}' closes no 'for' loop", ln.toks[0])
                body, rank, start = stack.pop()
                if not body:
                    raise IRParseError(f"loop 'for {rank.lower()} in {rank}' has an empty body", start, 1,
                                       self.lines[start - 1])
                stack[-1][0].append(Loop(rank, tuple(body), line=start))
            elif ln.keyword() == "rank":
                self.rank_line(ln)
            elif ln.keyword() == "tensor":
                self.tensor_line(ln)
            elif ln.keyword() == "for":
                if len(stack) > MAX_DEPTH:
                    raise ln.error(f"'for' loops nested more than {MAX_DEPTH} deep", ln.toks[0])
                stack.append(([], self.loop_head(ln), lineno))
            else:
                stack[-1][0].append(self.einsum(ln, len(stack) - 1))
        if self.name is None:
            raise IRParseError("expected 'cascade NAME' as the first line", 1, 1,
                               self.lines[0] if self.lines else "")
        if len(stack) > 1:
            _, rank, start = stack[-1]
            raise IRParseError(f"loop 'for {rank.lower()} in {rank}' is never closed with '}}'", start, 1,
                               self.lines[start - 1])
        for tensor, tok, ln in self.tensor_ranks:
            if tok.text not in self.ranks:
                raise ln.error(f"tensor '{tensor}' uses undeclared rank '{tok.text}'", tok)
        return Cascade(self.name, tuple(self.ranks.values()), tuple(self.tensors.values()), tuple(stack[0][0]))

    # ---- declarations -------------------------------------------------------------------

    def header(self, ln: Line) -> None:
        if not ln.at("cascade"):
            raise ln.error("expected 'cascade NAME' as the first line")
        ln.next("cascade")
        self.name = ln.name("a cascade name").text
        ln.done()

    def rank_line(self, ln: Line) -> None:
        ln.next("rank")
        while True:
            tok = ln.name("a rank name")
            if not tok.text[0].isupper():
                raise ln.error(f"rank name '{tok.text}' must start with an upper-case letter", tok)
            if tok.text in self.ranks:
                raise ln.error(f"rank '{tok.text}' is declared twice", tok)
            ln.expect("=", f" after rank '{tok.text}'")
            self.sizes[tok.text] = SizeReader(ln, tok.text, self.sizes).read()
            self.ranks[tok.text] = Rank(tok.text, self.sizes[tok.text])
            if ln.peek() is None:
                return
            if not ln.at(","):
                raise ln.error(f"unexpected '{ln.peek().text}' in the size of rank '{tok.text}'")
            ln.next(",")

    def tensor_line(self, ln: Line) -> None:
        ln.next("tensor")
        tok = ln.name("a tensor name")
        if tok.text in self.tensors:
            raise ln.error(f"tensor '{tok.text}' is declared twice", tok)
        ln.expect("[", f" after tensor name '{tok.text}'")
        ranks: list[TensorRank] = []
        while not ln.at("]"):
            r = ln.name(f"a rank name in the declaration of '{tok.text}'")
            iterative = ln.at("+")
            if iterative:
                ln.next("+")
            ranks.append(TensorRank(r.text, iterative))
            self.tensor_ranks.append((tok.text, r, ln))
            if not ln.at("]"):
                ln.expect(",", f" or ']' in the ranks of '{tok.text}'")
        ln.expect("]")
        role = "temp"
        if ln.at(*ROLES):
            role = ln.next("role").text
        dt = ln.next(f"a dtype for tensor '{tok.text}' ({' '.join(DTYPES)})")
        if dt.text not in DTYPES:
            raise ln.error(f"unknown dtype '{dt.text}' for tensor '{tok.text}'; expected one of "
                           f"{', '.join(DTYPES)}" + (" (a role must come before the dtype)" if dt.text in ROLES else ""), dt)
        empty = None
        if ln.at("empty"):
            ln.next("empty")
            ln.expect("=", " after 'empty'")
            empty = self.number(ln, f"the empty value of '{tok.text}'")
        if ln.at(*ROLES):
            raise ln.error(f"the role of '{tok.text}' must come before its dtype "
                           f"('tensor {tok.text}[...] {ln.peek().text} {dt.text}')")
        ln.done()
        self.tensors[tok.text] = TensorDecl(tok.text, tuple(ranks), role, dt.text, empty)

    def number(self, ln: Line, what: str) -> float:
        sign = -1.0 if ln.at("-") else 1.0
        if sign < 0:
            ln.next("-")
        t = ln.next(what)
        if t.kind == "number" or t.text == "inf":
            return sign * float_literal(ln, t)
        raise ln.error(f"expected a number for {what}, found '{t.text}'", t)

    def loop_head(self, ln: Line) -> str:
        ln.next("for")
        var = ln.name("a loop variable")
        ln.expect("in")
        rank = ln.name("a rank name")
        if var.text != rank.text.lower():
            raise ln.error(f"loop variable '{var.text}' must be the lower-case name of its rank "
                           f"'{rank.text}' (write 'for {rank.text.lower()} in {rank.text}')", var)
        ln.expect("{", " to open the loop body")
        ln.done()
        return rank.text

    # ---- statements -----------------------------------------------------------------------

    def einsum(self, ln: Line, loops: int) -> Einsum:
        """One Einsum statement inside ``loops`` enclosing loops."""
        first = ln.peek()
        if first is None or first.kind != "name" or ln.peek(1) is None or ln.peek(1).text != "[":
            raise ln.error("expected a statement 'TENSOR[indices] = expression', a declaration "
                           "('rank', 'tensor') or a 'for' loop")
        lhs = self.access(ln)
        ln.expect("=", f" after the output access '{lhs.tensor}[...]'")
        rhs = self.expr(ln)
        reduce = populate = provenance = None
        while ln.at("::"):
            ln.next("::")
            kw = ln.name("'reduce', 'populate' or 'from' after '::'")
            if kw.text == "reduce" and reduce is None and populate is None and provenance is None:
                reduce = self.reduce(ln)
            elif kw.text == "populate" and populate is None and provenance is None:
                populate = self.populate(ln)
            elif kw.text == "from" and provenance is None:
                s = ln.next("a quoted source location")
                if s.kind != "string":
                    raise ln.error("expected a quoted source location after 'from'", s)
                provenance = re.sub(r"\\(.)", r"\1", s.text[1:-1])
            else:
                raise ln.error(f"unexpected ':: {kw.text}' (clauses are ':: reduce', then ':: populate', "
                               "then ':: from', each at most once)", kw)
        if not ln.at("::") and ln.peek() is not None:
            raise ln.error(f"unexpected '{ln.peek().text}' after the expression")
        e = Einsum(lhs, rhs, reduce, populate, provenance, line=ln.lineno)
        problem = nesting_problem(e, loops)
        if problem:
            raise ln.error(problem, ln.toks[0])
        return e

    def reduce(self, ln: Line) -> Reduce:
        ln.expect("[", " after 'reduce'")
        names = self.var_list(ln, "reduce")
        t = ln.next("a reduce op (+ * max min)")
        if t.text not in ops.REDUCE_OPS:
            raise ln.error(f"unknown reduce op '{t.text}'; expected one of + * max min", t)
        return Reduce(names, t.text, self.merge(ln))

    def populate(self, ln: Line) -> Populate:
        ln.expect("[", " after 'populate'")
        names = self.var_list(ln, "populate")
        if len(names) != 1:
            raise ln.error("populate takes exactly one variable")
        t = ln.name("a populate op (topk bottomk argmax argmin)")
        if t.text not in ops.POPULATE_OPS:
            raise ln.error(f"unknown populate op '{t.text}'; expected one of "
                           f"{', '.join(ops.POPULATE_OPS)}", t)
        k = 1
        if ops.POPULATE_OPS[t.text][1]:
            ln.expect("(", f" after '{t.text}' (write {t.text}(K))")
            kt = ln.next("an integer K")
            if kt.kind != "number" or not kt.text.isdigit() or kt.text.strip("0") == "":
                raise ln.error(f"{t.text} needs a positive integer K, found '{kt.text}'", kt)
            k = literal(ln, kt, f"K of {t.text}")
            ln.expect(")")
        return Populate(names[0], t.text, k)

    def var_list(self, ln: Line, what: str) -> tuple[str, ...]:
        names = []
        while not ln.at("]"):
            v = ln.name(f"a variable in {what}[...]")
            if not v.text[0].islower():
                raise ln.error(f"'{v.text}' is not a variable (variables are lower case)", v)
            names.append(v.text)
            if not ln.at("]"):
                ln.expect(",", f" or ']' in {what}[...]")
        ln.expect("]")
        return tuple(names)

    def merge(self, ln: Line) -> str | None:
        if not ln.at("@"):
            return None
        ln.next("@")
        t = ln.name("a merge name")
        if t.text not in ops.MERGES:
            raise ln.error(f"unknown merge '{t.text}'; expected one of {', '.join(ops.MERGES)}", t)
        return t.text

    # ---- map expressions --------------------------------------------------------------------

    def expr(self, ln: Line) -> Expr:
        left = self.binary(ln, 1)
        if ln.at(*COMPARISONS):
            op = ops.INFIX[ln.next("comparison").text]
            merge = self.merge(ln)
            left = Call(op.name, (left, self.binary(ln, 1)), merge)
            if ln.at(*COMPARISONS):
                raise ln.error("comparisons do not chain; add parentheses")
        return left

    _PRECEDENCE = {"<-": 1, "->": 1, "+": 2, "-": 2, "*": 3, "/": 3}

    def binary(self, ln: Line, level: int) -> Expr:
        """Operators binding at least as tightly as ``level``, left-associative (precedence
        climbing: one frame per level of brackets, not per precedence level)."""
        left = self.unary(ln)
        while ln.peek() is not None and self._PRECEDENCE.get(ln.peek().text, 0) >= level:
            tok = ln.next("operator")
            merge = self.merge(ln)
            left = Call(ops.INFIX[tok.text].name, (left, self.binary(ln, self._PRECEDENCE[tok.text] + 1)), merge)
        return left

    def unary(self, ln: Line) -> Expr:
        if ln.at("-"):
            minus = ln.next("-")
            t = ln.peek()
            if t is not None and (t.kind == "number" or t.text == "inf"):
                ln.next("number")
                return Const(-float_literal(ln, t))
            ln.enter(minus)
            inner = self.unary(ln)
            ln.leave()
            return Call("neg", (inner,))
        return self.primary(ln)

    def primary(self, ln: Line) -> Expr:
        t = ln.next("an expression")
        if t.kind == "number" or t.text == "inf":
            return Const(float_literal(ln, t))
        if t.text == "(":
            ln.enter(t)
            inner = self.expr(ln)
            ln.expect(")", " to close '('")
            ln.leave()
            return inner
        if t.kind != "name":
            ln.i -= 1
            raise ln.error(f"expected an expression, found '{t.text}'")
        if ln.at("["):
            ln.i -= 1
            return self.access(ln)
        if t.text == "idx" and ln.at("("):
            ln.enter(ln.next("("))
            coord = Coord(self.iexpr(ln))
            ln.expect(")", " to close 'idx('")
            ln.leave()
            return coord
        merge = self.merge(ln)
        if not ln.at("("):
            raise ln.error(f"'{t.text}' is neither a tensor access ('{t.text}[...]') nor an op call "
                           f"('{t.text}(...)')", t)
        ln.enter(ln.next("("))
        args = [self.expr(ln)]
        while ln.at(","):
            ln.next(",")
            args.append(self.expr(ln))
        ln.expect(")", f" to close the arguments of '{t.text}'")
        ln.leave()
        return Call(t.text, tuple(args), merge)

    # ---- accesses and indices -----------------------------------------------------------------

    def access(self, ln: Line) -> Access:
        name = ln.name("a tensor name")
        ln.enter(ln.expect("["))
        indices: list[Index] = []
        while not ln.at("]"):
            indices.append(self.index(ln))
            if not ln.at("]"):
                ln.expect(",", f" or ']' in the indices of '{name.text}'")
        ln.expect("]")
        ln.leave()
        return Access(name.text, tuple(indices))

    def index(self, ln: Line) -> Index:
        e = self.iexpr(ln)
        conds: list[Cond] = []
        if ln.at(":"):
            ln.next(":")
            conds.append(self.cond(ln))
            while ln.at("&"):
                ln.next("&")
                conds.append(self.cond(ln))
        return Index(e, tuple(conds))

    def cond(self, ln: Line) -> Cond:
        lhs = self.iexpr(ln)
        t = ln.next("a comparison (< <= > >= == !=) in the filter")
        if t.text not in COMPARISONS:
            raise ln.error(f"expected a comparison (< <= > >= == !=) in the filter, found '{t.text}'", t)
        return Cond(lhs, t.text, self.iexpr(ln))

    def iexpr(self, ln: Line, level: int = 1) -> IndexExpr:
        if level > 2:
            return self.iatom(ln)
        left = self.iexpr(ln, level + 1)
        ops_here = ("+", "-") if level == 1 else ("*", "//", "%")
        while ln.at(*ops_here):
            op = ln.next("operator").text
            left = IBin(op, left, self.iexpr(ln, level + 1))
        return left

    def iatom(self, ln: Line) -> IndexExpr:
        t = ln.next("an index")
        if t.text == "-" and ln.peek() is not None and ln.peek().kind == "number":
            return IConst(-self.int_token(ln, ln.next("an integer")))
        if t.kind == "number":
            return IConst(self.int_token(ln, t))
        if t.text == "(":
            ln.enter(t)
            inner = self.iexpr(ln)
            ln.expect(")", " to close '(' in an index")
            ln.leave()
            return inner
        if t.kind != "name":
            ln.i -= 1
            raise ln.error(f"expected an index (variable, rank size, integer or gather), found '{t.text}'")
        if ln.at("["):
            ln.i -= 1
            return IAccess(self.access(ln))
        return IVar(t.text) if t.text[0].islower() else ISym(t.text)

    def int_token(self, ln: Line, t: Token) -> int:
        if not t.text.isdigit():
            raise ln.error(f"indices are integers, found '{t.text}'", t)
        return literal(ln, t, "the index")
