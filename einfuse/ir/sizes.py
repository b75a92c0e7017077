"""Rank sizes: reading them from text, checking them, and binding symbolic sizes to numbers from
the shapes of the arrays a caller passes.

A size is read by a small grammar of its own (never by ``sympify``, which evaluates what it reads):
integers, size symbols, earlier ranks, ``+ - * / //``, ``**`` with a small integer exponent,
parentheses and ``floor ceiling Max Min``. Every number in a size is at most ``MAX_SIZE``, and a
size is at most ``MAX_SIZE_TOKENS`` tokens long (sympy's simplification is superlinear).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import sympy

from ..errors import InterpretError
from .nodes import Cascade, IBin, IConst, IndexExpr, ISym, IVar, Size, TensorDecl

#: The largest integer literal the IR accepts (a size, an index, a topk K) and the largest size.
MAX_SIZE = 2 ** 62
#: The largest exponent in a size (``S**2``).
MAX_EXPONENT = 64
#: The most tokens one size may take (``ceiling(S/64)`` is 6).
MAX_SIZE_TOKENS = 32
_FUNCTIONS: dict[str, tuple[Callable[..., sympy.Expr], int | None]] = {
    "floor": (sympy.floor, 1), "ceiling": (sympy.ceiling, 1), "Max": (sympy.Max, None), "Min": (sympy.Min, None)}


class Cursor(Protocol):
    """What the size reader needs of the parser's token cursor over one line."""

    def peek(self, offset: int = 0) -> Any: ...
    def next(self, what: str) -> Any: ...
    def at(self, *texts: str) -> bool: ...
    def expect(self, text: str, what: str = "") -> Any: ...
    def error(self, message: str, tok: Any = None) -> Exception: ...
    def enter(self, tok: Any) -> None: ...
    def leave(self) -> None: ...


def literal(ln: Cursor, tok: Any, what: str) -> int:
    """The non-negative integer a number token spells, refused past ``MAX_SIZE`` (no int() of a
    thousand digits)."""
    if tok.kind != "number" or not tok.text.isdigit():
        raise ln.error(f"{what} must be a whole number, found '{short(tok.text)}'", tok)
    if len(tok.text.lstrip("0")) > len(str(MAX_SIZE)) or int(tok.text) > MAX_SIZE:
        raise ln.error(f"{what} {short(tok.text)} is larger than 2**62", tok)
    return int(tok.text)


def short(text: str) -> str:
    """``text``, cut to 20 characters and ``...`` when it is longer than 24 (a literal in a message)."""
    return text if len(text) <= 24 else text[:20] + "..."


class SizeReader:
    """Reads the size of one rank from a line's tokens up to a ``,`` or the end of the line."""

    def __init__(self, ln: Cursor, rank: str, known: Mapping[str, Size]) -> None:
        self.ln, self.rank, self.known = ln, rank, known

    def read(self) -> Size:
        """The size, checked (:func:`size_problem`); an int when it is a number."""
        start = self.ln.peek()
        self.check_length()
        value = self.sum()
        problem = size_problem(value)
        if problem:
            raise self.ln.error(f"rank '{self.rank}' {problem}", start)
        return int(value) if value.is_Integer else value

    def check_length(self) -> None:
        """Refuse a size longer than ``MAX_SIZE_TOKENS`` before sympy sees any of it."""
        depth, n = 0, 0
        while (t := self.ln.peek(n)) is not None and not (depth == 0 and t.text == ","):
            depth += {"(": 1, ")": -1}.get(t.text, 0)
            n += 1
            if n > MAX_SIZE_TOKENS:
                raise self.ln.error(f"the size of rank '{self.rank}' is longer than {MAX_SIZE_TOKENS} tokens", t)

    def sum(self) -> sympy.Expr:
        terms = [self.term()]
        while self.ln.at("+", "-"):
            sign = self.ln.next("+ or -").text
            terms.append(self.term() if sign == "+" else -self.term())
        return sympy.Add(*terms)

    def term(self) -> sympy.Expr:
        factors = [self.unary()]
        while self.ln.at("*", "/", "//"):
            op = self.ln.next("operator")
            operand = self.unary()
            if op.text != "*" and operand.is_zero:
                raise self.ln.error(f"division by zero in the size of rank '{self.rank}'", op)
            if op.text == "//":
                factors = [sympy.floor(sympy.Mul(*factors) / operand)]
            else:
                factors.append(operand if op.text == "*" else 1 / operand)
        return sympy.Mul(*factors)

    def unary(self) -> sympy.Expr:
        if not self.ln.at("-"):
            return self.power()
        self.ln.enter(self.ln.next("-"))
        value = -self.unary()
        self.ln.leave()
        return value

    def power(self) -> sympy.Expr:
        base = self.atom()
        star, second = self.ln.peek(), self.ln.peek(1)
        if star is None or star.text != "*" or second is None or second.text != "*":
            return base
        if second.col != star.col + 1:
            raise self.ln.error("'**' is written without a space", second)
        self.ln.next("*"), self.ln.next("*")
        n = self.exponent()
        if self.ln.at("*") and self.ln.peek(1) is not None and self.ln.peek(1).text == "*":
            raise self.ln.error("an exponent is one number: write (a**b)**c", self.ln.peek())
        biggest = max((abs(x.p).bit_length() + x.q.bit_length() for x in base.atoms(sympy.Rational)), default=0)
        if abs(n) > MAX_EXPONENT or biggest * abs(n) > 4 * 62 or _largest_exponent(base) * abs(n) > MAX_EXPONENT:
            raise self.ln.error(f"the exponent {n} makes the size of rank '{self.rank}' too large "
                                f"(exponents in a size are at most {MAX_EXPONENT})", star)
        if n < 0 and base.is_zero:
            raise self.ln.error(f"division by zero in the size of rank '{self.rank}'", star)
        return base ** n

    def exponent(self) -> int:
        """``N``, or ``(-N)`` as sympy prints a negative exponent."""
        if not self.ln.at("("):
            return literal(self.ln, self.ln.next("an exponent"), "an exponent")
        self.ln.next("(")
        self.ln.expect("-", " in a negative exponent (-N)")
        n = literal(self.ln, self.ln.next("an exponent"), "an exponent")
        self.ln.expect(")", " to close the exponent")
        return -n

    def atom(self) -> sympy.Expr:
        t = self.ln.next(f"a size for rank '{self.rank}'")
        if t.kind == "number":
            return sympy.Integer(literal(self.ln, t, f"a number in the size of rank '{self.rank}'"))
        if t.text == "(":
            self.ln.enter(t)
            inner = self.sum()
            self.ln.expect(")", f" to close '(' in the size of rank '{self.rank}'")
            self.ln.leave()
            return inner
        if t.kind != "name":
            raise self.ln.error(f"expected a size for rank '{self.rank}', found '{t.text}'", t)
        if t.text in _FUNCTIONS:
            return self.call(t)
        if self.ln.at("("):
            raise self.ln.error(f"unknown function '{t.text}' in the size of rank '{self.rank}' "
                                f"(sizes may call {', '.join(_FUNCTIONS)})", t)
        if t.text in self.known:
            return sympy.sympify(self.known[t.text])
        return sympy.Symbol(t.text, integer=True, positive=True)

    def call(self, name: Any) -> sympy.Expr:
        fn, arity = _FUNCTIONS[name.text]
        self.ln.enter(name)
        self.ln.expect("(", f" after '{name.text}'")
        args = [self.sum()]
        while self.ln.at(","):
            self.ln.next(",")
            args.append(self.sum())
        self.ln.expect(")", f" to close the arguments of '{name.text}'")
        self.ln.leave()
        if arity is not None and len(args) != arity:
            raise self.ln.error(f"{name.text} takes {arity} argument, given {len(args)}", name)
        return fn(*args)


def _largest_exponent(x: sympy.Expr) -> int:
    return max((abs(int(p.exp)) for p in x.atoms(sympy.Pow) if p.exp.is_Integer), default=1)


def size_problem(size: Any) -> str | None:
    """Why ``size`` is not a rank size, as the end of a sentence naming the rank (None if it is).

    A size is a positive integer up to ``MAX_SIZE``, or a sympy expression of size symbols that
    is not provably zero, negative, fractional or infinite, whose numbers are at most
    ``MAX_SIZE`` and whose exponents are integers up to ``MAX_EXPONENT``. (A symbolic size that
    may still be fractional, ``S/64``, is checked when it is bound to a number.)
    """
    if isinstance(size, bool) or not isinstance(size, (int, sympy.Basic)):
        return f"has size {size!r}; a size is an integer or a sympy expression"
    value = sympy.sympify(size)
    if not isinstance(value, sympy.Expr) or value.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        return f"has size {value}, which is not a finite number"
    if any(abs(x.p) > MAX_SIZE or x.q > MAX_SIZE for x in value.atoms(sympy.Rational)):
        return f"has size {short(str(value))}, with a number larger than 2**62"
    if any(not p.exp.is_Integer or abs(p.exp) > MAX_EXPONENT for p in value.atoms(sympy.Pow)):
        return f"has size {value}; exponents in a size are integers up to {MAX_EXPONENT}"
    if value.is_positive is False:
        return f"has size {value}; sizes must be positive"
    if value.is_integer is False:
        return f"has size {value}; sizes must be whole numbers"
    return None


def extent(size: Size, iterative: bool) -> Size:
    """The extent of a tensor dimension over a rank of ``size`` (+1 when iterative)."""
    return size + 1 if iterative else size


def index_bounds(e: IndexExpr, rank_size: Mapping[str, Any], ranks: Mapping[str, str]) -> tuple[Any, Any] | None:
    """The least and greatest value an index expression takes over its variables' ranks (sympy,
    symbolic in the sizes), or None where that is not known (a gather, a product of signed terms)."""
    if isinstance(e, IVar):
        return sympy.Integer(0), sympy.sympify(rank_size[ranks[e.name]]) - 1
    if isinstance(e, IConst):
        return sympy.Integer(e.value), sympy.Integer(e.value)
    if isinstance(e, ISym):
        size = sympy.sympify(rank_size[e.rank])
        return size, size
    if not isinstance(e, IBin):
        return None
    if e.op == "%" and isinstance(e.b, (IConst, ISym)):
        return sympy.Integer(0), index_bounds(e.b, rank_size, ranks)[1] - 1
    a = index_bounds(e.a, rank_size, ranks)
    if e.op == "//" and isinstance(e.b, IConst) and e.b.value > 0:
        return None if a is None else (sympy.floor(a[0] / e.b.value), sympy.floor(a[1] / e.b.value))
    b = index_bounds(e.b, rank_size, ranks)
    if a is None or b is None or e.op not in ("+", "-", "*"):
        return None
    if e.op == "+":
        return a[0] + b[0], a[1] + b[1]
    if e.op == "-":
        return a[0] - b[1], a[1] - b[0]
    if all(sympy.sympify(v).is_nonnegative for v in (*a, *b)):
        return a[0] * b[0], a[1] * b[1]
    return None


def in_range(e: IndexExpr, extent: Any, rank_size: Mapping[str, Any], ranks: Mapping[str, str]) -> bool:
    """True when ``e`` provably stays within ``[0, extent)`` for every value of its variables."""
    bounds = index_bounds(e, rank_size, ranks)
    if bounds is None:
        return False
    lo, hi = bounds
    return bool(sympy.sympify(lo).is_nonnegative) and bool(sympy.sympify(extent - 1 - hi).is_nonnegative)


def bind_sizes(c: Cascade, decls: Mapping[str, TensorDecl], shapes: Mapping[str, tuple[int, ...]],
               given: Mapping[str, int] | None = None) -> dict[str, int]:
    """Concrete sizes of every rank, solving symbolic sizes from the given array shapes.

    ``given`` binds size symbols directly (``{"S": 128}``). Raises InterpretError on a shape that
    contradicts a declaration or a symbol that no shape determines.
    """
    env = {sympy.Symbol(k, integer=True, positive=True): v for k, v in (given or {}).items()}
    pending = []
    for name, shape in shapes.items():
        decl = decls[name]
        if len(shape) != len(decl.ranks):
            raise InterpretError(f"'{name}' has {len(shape)} dimensions {tuple(shape)} but is declared "
                                 f"with {len(decl.ranks)} ranks [{','.join(r.rank for r in decl.ranks)}]")
        for dim, (tr, n) in enumerate(zip(decl.ranks, shape)):
            rank = c.rank(tr.rank)
            pending.append((name, dim, tr.rank, sympy.sympify(extent(rank.size, tr.iterative)), int(n)))
    progress = True
    while progress:
        progress = False
        for item in list(pending):
            name, dim, rank, expr, n = item
            expr = expr.subs(env)
            unknown = sorted(expr.free_symbols, key=str)
            if not unknown:
                if not expr.is_Integer or int(expr) != n:
                    raise InterpretError(f"'{name}' dimension {dim} (rank {rank}) has extent {n} but "
                                         f"the cascade declares {expr}")
                pending.remove(item)
            elif len(unknown) == 1:
                env[unknown[0]] = _solve(unknown[0], expr, n, name, dim)
                pending.remove(item)
                progress = True
    sizes = {}
    for r in c.ranks:
        value = sympy.sympify(r.size).subs(env)
        if value.free_symbols:
            missing = ", ".join(sorted(str(s) for s in value.free_symbols))
            raise InterpretError(f"the size of rank {r.name} ({r.size}) depends on {missing}, which no "
                                 f"input shape determines; pass sizes={{'{missing.split(',')[0]}': ...}}")
        if not value.is_Integer or int(value) <= 0:
            raise InterpretError(f"rank {r.name} has size {value}; it must be a positive integer")
        sizes[r.name] = int(value)
    return sizes


def _solve(sym: sympy.Symbol, expr: sympy.Expr, n: int, name: str, dim: int) -> int:
    """The one positive integer ``sym`` with ``expr == n``, found by bisection over 1..MAX_SIZE
    (a size grows or shrinks with its symbol; ``sympy.solve`` can take hours on ``S**63 - S**62``)."""
    def value(v: int) -> sympy.Expr:
        x = expr.subs(sym, v)
        if not (x.is_number and x.is_finite and x.is_real):
            raise InterpretError(f"cannot determine {sym} from '{name}' dimension {dim}: {expr} is {x} "
                                 f"at {sym} = {v}; pass sizes={{'{sym}': ...}}")
        return x
    rising = value(1) <= value(MAX_SIZE)
    lo, hi = 1, MAX_SIZE
    while lo < hi:   # the least v with expr(v) >= n (rising) or <= n (falling)
        mid = (lo + hi) // 2
        if (value(mid) >= n) if rising else (value(mid) <= n):
            hi = mid
        else:
            lo = mid + 1
    if value(lo) != n or (lo < MAX_SIZE and value(lo + 1) == n):
        raise InterpretError(f"cannot determine {sym} from '{name}' dimension {dim}: {expr} = {n} "
                             f"has no single positive integer solution; pass sizes={{'{sym}': ...}}")
    return lo
