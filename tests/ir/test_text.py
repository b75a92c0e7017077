"""Text round trip: parse(to_text(c)) == c and printing is a fixed point, on every fixture and on
random well-formed cascades (hypothesis)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einfuse.ir import (Access, Call, Cascade, Cond, Const, Coord, Einsum, IBin, IConst, Index, ISym, IVar,
                        Populate, Rank, Reduce, TensorDecl, TensorRank, interpret, parse, to_text, verify)
from einfuse.ir.scope import index_vars
from einfuse.ir.ops import MERGES, REDUCE_OPS

from ..conftest import CASCADES
from .naive import naive_interpret

FIXTURES = sorted(p.stem for p in Path(CASCADES).glob("*.ein"))


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_round_trips(name: str) -> None:
    c = parse((CASCADES / f"{name}.ein").read_text())
    text = to_text(c)
    assert parse(text) == c
    assert to_text(parse(text)) == text
    assert str(c) == text


@pytest.mark.parametrize("line", [
    "Z[m] = -A[m]",
    "Z[m] = -(A[m] + B[m])",
    "Z[m] = A[m] - (B[m] - A[m])",
    "Z[m] = A[m] - B[m] - A[m]",
    "Z[m] = A[m] / (B[m] * A[m])",
    "Z[m] = A[m] * -2",
    "Z[m] = -2 * A[m]",
    "Z[m] = neg(2) + A[m]",
    "Z[m] = -(-2) + A[m]",
    "Z[m] = A[m] *@cup B[m] +@cap 1",
    "Z[m] = max@cap(A[m], B[m])",
    "Z[m] = where(A[m] < B[m], A[m], -inf)",
    "Z[m] = (A[m] < B[m]) == (B[m] < A[m])",
    "Z[m] = B[m] -> A[m] <- B[m]",
    "Z[m] = i32(A[m]) + f16(B[m])",
    "Z[m] = A[m] * 1e-05 + 0.125",
    "Z[m] = A[m:m<=3&m>=1]",
    "Z[m] = A[(m+1)%M]",
    "Z[m] = A[M-1-m]",
    "Z[m] = idx(m) * 2 + idx(M-1-m)",
    "Z[m] = A[m-(1-m)]",
    "Z[m] = A[m] :: from \"model.py:12 in \\\"forward\\\"\"",
    "Z[m] = A[m] :: populate[m] topk(2) :: from \"x.py:1\"",
])
def test_statement_round_trips(line: str) -> None:
    text = "cascade t\nrank M=4\ntensor A[M] input f32\ntensor B[M] input f32\ntensor Z[M] output f32\n" + line + "\n"
    c = verify(parse(text))
    assert to_text(c) == text
    assert parse(to_text(c)) == c


def test_provenance_and_line_are_kept() -> None:
    c = parse('cascade t\nrank M=4\ntensor A[M] input f32\ntensor Z[M] output f32\nZ[m] = A[m] :: from "m.py:3"\n')
    (e, _), = c.einsums()
    assert e.provenance == "m.py:3" and e.line == 5


def test_symbolic_sizes_print_and_parse() -> None:
    c = parse("cascade t\nrank M0=64, M=S, M1=S/M0, P=2*S + 1\n")
    assert [str(r.size) for r in c.ranks] == ["64", "S", "S/64", "2*S + 1"]
    assert parse(to_text(c)) == c


# ---- random well-formed cascades ---------------------------------------------------------------

RANKS = ["A", "B", "C", "D"]
UNARY = ["neg", "abs", "exp", "tanh", "sigmoid", "relu", "silu", "sin", "cos", "gelu_tanh", "f16", "i32"]
BINARY = ["add", "sub", "mul", "div", "max", "min", "take_left", "take_right", "lt", "eq"]


@st.composite
def cascades(draw: st.DrawFn) -> Cascade:
    n_ranks = draw(st.integers(1, 4))
    ranks = tuple(Rank(RANKS[i], draw(st.integers(1, 4))) for i in range(n_ranks))
    names = [r.name for r in ranks]
    decls = [TensorDecl(f"X{i}", tuple(TensorRank(r) for r in draw(st.lists(st.sampled_from(names), max_size=3))),
                        "input", draw(st.sampled_from(["f32", "f16", "bf16", "f64"])))
             for i in range(draw(st.integers(1, 3)))]
    shapes = {d.name: [r.rank for r in d.ranks] for d in decls}
    stmts = []
    for i in range(draw(st.integers(1, 4))):
        rhs = draw(exprs(shapes, 3))
        out_ranks = draw(st.lists(st.sampled_from(names), unique=True, max_size=3))
        lhs_vars = [r.lower() for r in out_ranks]
        used = _vars(rhs)
        reduced = [v for v in used if v not in lhs_vars]
        reduce = None
        if reduced and draw(st.booleans()):
            reduce = Reduce(tuple(draw(st.permutations(reduced))), draw(st.sampled_from(sorted(REDUCE_OPS))),
                            draw(st.sampled_from([None, "cup", "cap"])))
        populate = None
        if lhs_vars and draw(st.integers(0, 4)) == 0:
            populate = Populate(draw(st.sampled_from(lhs_vars)), *draw(st.sampled_from([("topk", 2), ("argmax", 1)])))
        name = f"T{i}"
        lhs = Access(name, tuple(Index(IVar(v)) for v in lhs_vars))
        prov = draw(st.one_of(st.none(), st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=12)))
        stmts.append(Einsum(lhs, rhs, reduce, populate, prov))
        shapes[name] = out_ranks
    last = stmts[-1].lhs.tensor
    decls.append(TensorDecl(last, tuple(TensorRank(r) for r in shapes[last]), "output", "f32",
                            draw(st.sampled_from([None, 0.0, float("-inf"), 1.5]))))
    return Cascade("random", ranks, tuple(decls), tuple(stmts))


def exprs(shapes: dict[str, list[str]], depth: int) -> st.SearchStrategy:
    leaves = st.one_of(
        st.sampled_from(sorted(shapes)).flatmap(lambda t: accesses(t, shapes[t])),
        st.sampled_from([0.0, 1.0, -2.5, 0.125, float("inf"), float("-inf"), 3e-7]).map(Const),
        st.sampled_from(sorted({r for rs in shapes.values() for r in rs} or {"A"})).map(
            lambda r: Coord(IBin("+", IVar(r.lower()), IConst(1)))),
    )
    if depth == 0:
        return leaves
    sub = exprs(shapes, depth - 1)
    merges = st.sampled_from([None, *MERGES])
    return st.one_of(
        leaves,
        st.builds(lambda op, a: Call(op, (a,)), st.sampled_from(UNARY), sub),
        st.builds(lambda op, a, b, m: Call(op, (a, b), m), st.sampled_from(BINARY), sub, sub, merges),
    )


@st.composite
def accesses(draw: st.DrawFn, tensor: str, ranks: list[str]) -> Access:
    """Plain, shifted (``a+1``, ``B-1-b``) and filtered (``a:a<=b``) indices."""
    indices = []
    for r in ranks:
        v = IVar(r.lower())
        expr = draw(st.sampled_from([v, v, IBin("+", v, IConst(1)), IBin("-", IBin("-", ISym(r), IConst(1)), v)]))
        conds = draw(st.lists(st.builds(Cond, st.just(v), st.sampled_from(["<", "<=", ">=", "!="]),
                                        st.sampled_from([IConst(1), ISym(ranks[0])])), max_size=2))
        indices.append(Index(expr, tuple(conds)))
    return Access(tensor, tuple(indices))


def _vars(x) -> list[str]:
    if isinstance(x, Access):
        return list(dict.fromkeys(v for ix in x.indices for v in index_vars(ix)))
    if isinstance(x, Call):
        return list(dict.fromkeys(v for a in x.args for v in _vars(a)))
    if isinstance(x, Coord):
        return index_vars(Index(x.expr))
    return []


@settings(max_examples=150, deadline=None)
@given(cascades())
def test_random_cascades_verify_and_round_trip(c: Cascade) -> None:
    verify(c)
    text = to_text(c)
    assert parse(text) == c
    assert to_text(parse(text)) == text


@settings(max_examples=120, deadline=None)
@given(cascades(), st.integers(0, 2**32 - 1))
def test_random_cascades_interpret(c: Cascade, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = {r.name: r.size for r in c.ranks}
    inputs = {t.name: rng.standard_normal(tuple(sizes[r.rank] for r in t.ranks)) for t in c.tensors if t.role == "input"}
    out = interpret(c, inputs)
    (name, value), = out.items()
    assert value.shape == tuple(sizes[r.rank] for r in c.tensor(name).ranks)
    assert np.array_equal(interpret(parse(to_text(c)), inputs)[name], value, equal_nan=True)
    want = naive_interpret(c, inputs)[name]
    assert np.allclose(value, want, rtol=1e-9, atol=1e-12, equal_nan=True), (value, want)
