"""Fuzzing the text front door: mutate the shipped cascades (characters, tokens, lines, deep
nesting, huge numbers, stray identifiers and operators) and run parse -> verify -> print ->
interpret. Only EinfuseErrors may come out; whatever parses and verifies prints back to itself."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import sympy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from einfuse.errors import EinfuseError
from einfuse.ir import Cascade, interpret, parse, to_text, verify
from einfuse.ir.scope import declarations, iteration_vars, loop_vars

ROOT = Path(__file__).parents[2]
SOURCES = [p.read_text() for p in sorted([*(ROOT / "tests" / "cascades").glob("*.ein"),
                                          *(ROOT / "examples").glob("*.ein")])]
PIECES = ["(", ")", "[", "]", "{", "}", ",", ":", "::", "=", "+", "-", "*", "/", "//", "%", "**", "<", "<=",
          "==", "->", "<-", "@cap", "@", "&", "#", '"', "\n", " ", "exp(", "max(", "where(", "idx(", "i32(",
          "reduce[m]", ":: reduce[m] max", ":: populate[p] topk(2)", "for m in M {", "for m1 in M1 {", "}",
          "rank Q=", "tensor X[M]", "input", "output", "f32", "i64", "bool", "empty=-inf", "inf", "-inf", "0",
          "1", "-1", "0.5", "1e999", "9" * 5000, str(2 ** 62), str(2 ** 62 + 1), "10**10**10", "4/0", "5/2",
          "-S", "None", "S", "M", "m", "m1", "M1+", "Q", "q", "_", "\u00e9", "\x00", "\u0663", "\u00a0", "\t"]
NESTS = [("(", ")"), ("exp(", ")"), ("-", ""), ("max(0, ", ")"), ("[", "]"), ("A[", ",m]"), ("idx(", ")")]
TOKEN = re.compile(r"\s+|\w+|[^\w\s]")
NUMBER = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?")
RHS = re.compile(r"^[ \t]*\w+\[[^\n]*?\] = ([^\n]*?)(?= ::|$)", re.MULTILINE)   # an Einsum's right side
SIZE = re.compile(r"(?<=[A-Z0-9]=)[^,\n#]+")                                      # a rank's size
SIZES = ["None", "10**10**10", "4/0", "5/2", "-S", "0", "S - S", "S + 1/2", "S**63 - S**62 + 5", "2**63", "S**2",
         "Max(S, 4)", "floor(S/2)", "S/64", "ceiling(S/4)", "(S", "S S", "1e999", "9" * 5000, "exp(S)", "S * * 2"]
WORK = 200_000          # interpret only cascades whose Einsums visit at most this many points in all
MAX_TEXT = 100_000      # (edits that nest or repeat a right side many times over are kept below this)


@st.composite
def mutation(draw: st.DrawFn, text: str) -> str:
    """``text`` with one random edit."""
    n = len(text)
    i, j = sorted((draw(st.integers(0, n)), draw(st.integers(0, n))))
    j = min(j, i + 40)
    kind = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "identifier", "tokens", "nest",
                                 "number", "lines", "rhs", "rhs", "rhs", "size", "size"]))
    if kind in ("rhs", "size") and (spots := list((RHS if kind == "rhs" else SIZE).finditer(text))):
        m = draw(st.sampled_from(spots))
        start, end = m.span(1 if kind == "rhs" else 0)
        return text[:start] + draw(deep_rhs(m.group(1)) if kind == "rhs" else st.sampled_from(SIZES)) + text[end:]
    if kind == "delete":
        return text[:i] + text[j:]
    if kind == "duplicate":
        return text[:j] + text[i:j] + text[j:]
    if kind == "swap" and j < n:
        return text[:i] + text[j] + text[i + 1:j] + text[i] + text[j + 1:]
    if kind == "insert":
        return text[:i] + draw(st.sampled_from(PIECES)) + text[i:]
    if kind == "identifier":
        return text[:i] + draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)) + text[i:]
    if kind == "nest":
        (opener, closer), k = draw(st.sampled_from(NESTS)), draw(st.integers(1, 300))
        return text[:i] + opener * k + text[i:j] + closer * k + text[j:]
    if kind == "number":
        spots = list(NUMBER.finditer(text))
        if spots:
            m = draw(st.sampled_from(spots))
            big = draw(st.sampled_from(["9" * 5000, "1e999", str(2 ** 62 + 1), str(2 ** 62), "0", "00", "1.5"]))
            return text[:m.start()] + big + text[m.end():]
        return text
    if kind == "lines":
        return "\n".join(draw(list_edit(text.split("\n"))))
    return "".join(draw(list_edit(TOKEN.findall(text))))   # ("tokens", or a swap at the end of the text)


@st.composite
def deep_rhs(draw: st.DrawFn, rhs: str) -> str:
    """An Einsum's right side nested, chained or negated many times over (up to ~2,000 deep)."""
    k = draw(st.sampled_from([1, 10, 63, 64, 65, 100, 300, 2000]))
    kind = draw(st.sampled_from(["nest", "sum", "minus"]))
    if kind == "nest":
        opener, closer = draw(st.sampled_from(NESTS[:2] + NESTS[3:4]))
        return opener * k + rhs + closer * k
    if kind == "sum":
        return " + ".join([f"({rhs})"] * k)
    return "-" * k + f"({rhs})"


@st.composite
def list_edit(draw: st.DrawFn, items: list[str]) -> list[str]:
    """``items`` with one deleted, duplicated, or two swapped."""
    items = list(items)
    if not items:
        return items
    a, b = draw(st.integers(0, len(items) - 1)), draw(st.integers(0, len(items) - 1))
    op = draw(st.sampled_from(["delete", "duplicate", "swap"]))
    if op == "delete":
        del items[a]
    elif op == "duplicate":
        items.insert(b, items[a])
    else:
        items[a], items[b] = items[b], items[a]
    return items


@st.composite
def mutated_cascade(draw: st.DrawFn) -> str:
    """A shipped cascade's text after one to four random edits."""
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        edited = draw(mutation(text))
        text = edited if len(edited) <= MAX_TEXT else text
    return text


def _small_sizes(c: Cascade, symbol: int) -> dict[str, int] | None:
    """Every rank's size with each size symbol set to ``symbol``, if all are small positive integers."""
    sizes = {}
    for r in c.ranks:
        value = sympy.sympify(r.size)
        value = value.subs({s: symbol for s in value.free_symbols})
        if not value.is_Integer or not 0 < int(value) <= 64:
            return None
        sizes[r.name] = int(value)
    return sizes


def _work(c: Cascade, sizes: dict[str, int]) -> int:
    ranks = {r.var: r.name for r in c.ranks}
    total = 0
    for e, loops in c.einsums():
        points = 1
        for v in [*iteration_vars(e, loop_vars(loops)), *(lp.var for lp in loops)]:
            points *= sizes[ranks[v]]
        total += points
    return total


def _inputs(c: Cascade, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for t in declarations(c).values():
        if t.role in ("input", "param"):
            shape = tuple(sizes[r.rank] + int(r.iterative) for r in t.ranks)
            floats = t.dtype in ("f16", "bf16", "f32", "f64")
            out[t.name] = rng.standard_normal(shape) if floats else rng.integers(0, 4, shape).astype(np.float64)
    return out


def check(text: str, symbol: int, seed: int) -> None:
    """parse -> verify -> print -> interpret ``text``; only EinfuseErrors may be raised."""
    try:
        c = verify(parse(text))
    except EinfuseError:
        return
    assert parse(to_text(c)) == c
    sizes = _small_sizes(c, symbol)
    if sizes is None or _work(c, sizes) > WORK:
        return
    symbols = {str(s): symbol for r in c.ranks for s in sympy.sympify(r.size).free_symbols}
    try:
        interpret(c, _inputs(c, sizes, np.random.default_rng(seed)), sizes=symbols)
    except EinfuseError:
        pass


FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])


@settings(FUZZ, max_examples=200)
@given(mutated_cascade(), st.sampled_from([1, 2, 3, 64]), st.integers(0, 2 ** 32 - 1))
def test_mutated_cascades_raise_only_einfuse_errors(text: str, symbol: int, seed: int) -> None:
    check(text, symbol, seed)


@pytest.mark.slow
@settings(FUZZ, max_examples=3000)
@given(mutated_cascade(), st.sampled_from([1, 2, 3, 64]), st.integers(0, 2 ** 32 - 1))
def test_mutated_cascades_raise_only_einfuse_errors_at_length(text: str, symbol: int, seed: int) -> None:
    check(text, symbol, seed)


@pytest.mark.parametrize("text", SOURCES, ids=range(len(SOURCES)))
def test_every_shipped_cascade_passes_the_check_unmutated(text: str) -> None:
    c = verify(parse(text))
    assert c.stmts and parse(to_text(c)) == c
    check(text, 3, 0)
