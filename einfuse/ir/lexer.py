"""The IR text's tokens, and the cursor the parser reads a line's tokens with.

One regular expression splits a line into numbers, names, quoted strings and operators
(comments and white space dropped); :class:`Line` walks them, counts how deep brackets, calls
and unary minus nest (at most ``MAX_DEPTH``) and makes its errors
(:class:`~einfuse.errors.IRParseError`: the line, the column and the text).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import IRParseError
from .nodes import MAX_DEPTH
from .sizes import short

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>\#.*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>::|<-|->|<=|>=|==|!=|//|[-+*/%<>=()\[\]{},:@&])
""", re.VERBOSE | re.ASCII)

COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str
    col: int


def tokenize(line: str, lineno: int) -> list[Token]:
    """Split one line into tokens (comments dropped)."""
    out, pos = [], 0
    while pos < len(line):
        m = _TOKEN.match(line, pos)
        if m is None:
            raise IRParseError(f"unexpected character {line[pos]!r}", lineno, pos + 1, line)
        if m.lastgroup not in ("ws", "comment"):
            out.append(Token(m.lastgroup or "", m.group(), pos + 1))
        pos = m.end()
    return out


class Line:
    """A cursor over the tokens of one line."""

    def __init__(self, text: str, lineno: int) -> None:
        self.text, self.lineno = text, lineno
        self.toks = tokenize(text, lineno)
        self.i = 0
        self.depth = 0   # brackets, calls and unary minus open at the cursor

    def enter(self, tok: Token) -> None:
        """Open one level of nesting at ``tok``; refused past ``MAX_DEPTH``."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nested more than {MAX_DEPTH} deep", tok)

    def leave(self) -> None:
        """Close the level the last :meth:`enter` opened."""
        self.depth -= 1

    def peek(self, offset: int = 0) -> Token | None:
        j = self.i + offset
        return self.toks[j] if j < len(self.toks) else None

    def keyword(self) -> str | None:
        """The line's leading keyword, unless the line is a statement writing a tensor of that name."""
        second = self.peek(1)
        return None if second is not None and second.text == "[" else self.toks[0].text

    def at(self, *texts: str) -> bool:
        t = self.peek()
        return t is not None and t.text in texts

    def error(self, message: str, tok: Token | None = None) -> IRParseError:
        tok = tok or self.peek()
        col = tok.col if tok else len(self.text.rstrip()) + 1
        return IRParseError(message, self.lineno, col, self.text)

    def next(self, what: str) -> Token:
        t = self.peek()
        if t is None:
            raise self.error(f"expected {what}, found end of line")
        self.i += 1
        return t

    def expect(self, text: str, what: str = "") -> Token:
        t = self.peek()
        if t is None or t.text != text:
            found = f"'{t.text}'" if t else "end of line"
            raise self.error(f"expected '{text}'{what}, found {found}")
        self.i += 1
        return t

    def name(self, what: str) -> Token:
        t = self.next(what)
        if t.kind != "name":
            self.i -= 1
            raise self.error(f"expected {what}, found '{t.text}'")
        return t

    def done(self) -> None:
        if self.peek() is not None:
            raise self.error(f"unexpected '{self.peek().text}' after the end of the statement")


def float_literal(ln: Line, t: Token) -> float:
    """The float a number token (or ``inf``) spells; refused where it overflows to infinity."""
    value = float(t.text)
    if math.isinf(value) and t.text != "inf":
        raise ln.error(f"the number {short(t.text)} is out of the float range (write inf)", t)
    return value
