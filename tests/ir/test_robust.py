"""The parser, verifier and interpreter cannot be crashed: every failure on any text is an
EinfuseError (IRParseError with line and column, VerificationError naming the Einsum or rank,
InterpretError naming the Einsum), never a RecursionError, OverflowError, ValueError or a hang."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import sympy

from einfuse.cli import main
from einfuse.errors import InterpretError, IRParseError, VerificationError
from einfuse.ir import Access, Call, Cascade, Einsum, IConst, Index, IVar, Rank, interpret, parse, to_text, verify
from einfuse.ir.nodes import MAX_DEPTH
from einfuse.ir.sizes import MAX_SIZE

from ..conftest import load, rel_err

HEAD = ("cascade c\nrank M=4, N=4, K=4\ntensor A[M,K] input f32\ntensor B[K,N] input f32\n"
        "tensor Z[M,N] output f32\n")


def _parse_error(text: str) -> IRParseError:
    with pytest.raises(IRParseError) as info:
        parse(text)
    return info.value


# ---- nesting and length ---------------------------------------------------------------------

DEEP = {
    "parentheses": "Z[m,n] = " + "(" * 500 + "A[m,n]" + ")" * 500,
    "calls": "Z[m,n] = " + "exp(" * 500 + "A[m,n]" + ")" * 500,
    "unary minus": "Z[m,n] = " + "-" * 2000 + "A[m,n]",
    "index parentheses": "Z[m,n] = A[" + "(" * 500 + "m" + ")" * 500 + ",n]",
    "gathers": "Z[m,n] = A[" + "A[" * 300 + "m" + ",n]" * 300 + ",n]",
    "idx": "Z[m,n] = idx(" + "(" * 300 + "m" + ")" * 301,
    "filters": "Z[m,n] = A[m:m<" + "(" * 300 + "n" + ")" * 300 + ",n]",
}


@pytest.mark.parametrize("stmt", DEEP.values(), ids=DEEP.keys())
def test_deep_nesting_is_a_parse_error_at_the_token(stmt: str) -> None:
    err = _parse_error(HEAD + stmt + "\n")
    assert err.line == 6
    assert f"nested more than {MAX_DEPTH} deep" in str(err)
    assert 10 <= err.column <= len(stmt)


def test_nesting_up_to_the_limit_parses_and_round_trips() -> None:
    calls = MAX_DEPTH - 4   # the Einsum, the calls, then A[m,n]: its Index and IVar
    brackets = MAX_DEPTH - calls - 1
    c = verify(parse(HEAD + "Z[m,n] = " + "(" * brackets + "exp(" * calls + "A[m,n]" + ")" * (brackets + calls) + "\n"))
    assert parse(to_text(c)) == c


def test_a_long_flat_sum_is_a_parse_error_naming_the_line() -> None:
    err = _parse_error(HEAD + "Z[m,n] = " + " + ".join(["A[m,n]"] * 1000) + "\n")
    assert err.line == 6 and "nests" in str(err) and "split it" in str(err)


def test_a_sum_within_the_limit_is_evaluated(rng: np.random.Generator) -> None:
    terms = MAX_DEPTH - 4
    c = parse(HEAD + "Z[m,n] = " + " + ".join(f"A[m,n] * {i}" for i in range(terms)) + "\n")
    a = rng.standard_normal((4, 4))
    got = interpret(c, {"A": a, "B": rng.standard_normal((4, 4))})["Z"]
    assert rel_err(got, a * sum(range(terms))) < 1e-12


def test_verify_refuses_a_built_einsum_nested_too_deep() -> None:
    c = parse(HEAD + "Z[m,n] = A[m,n]\n")
    rhs = c.stmts[0].rhs
    for _ in range(1000):
        rhs = Call("add", (rhs, Access("A", (Index(IVar("m")), Index(IVar("n"))))))
    deep = dataclasses.replace(c, stmts=(dataclasses.replace(c.stmts[0], rhs=rhs),))
    with pytest.raises(VerificationError, match=re.escape(f"line 6: the einsum writing 'Z' nests 1004 deep; "
                                                          f"the limit is {MAX_DEPTH}")):
        verify(deep)
    with pytest.raises(VerificationError):
        interpret(deep, {"A": np.zeros((4, 4)), "B": np.zeros((4, 4))})


def test_deeply_nested_loops_are_a_parse_error() -> None:
    n = 300
    ranks = ", ".join(f"R{i}=2" for i in range(n))
    text = f"cascade c\nrank {ranks}\n" + "".join(f"for r{i} in R{i} {{\n" for i in range(n)) \
        + "T[] = 1\n" + "}\n" * n
    err = _parse_error(text)
    assert f"nested more than {MAX_DEPTH} deep" in str(err) and err.line == 2 + MAX_DEPTH + 1


# ---- literals -------------------------------------------------------------------------------

BIG = "9" * 5000


@pytest.mark.parametrize("stmt,message", [
    (f"Z[m,n] = A[{BIG},n]", "larger than 2**62"),
    (f"Z[m,n] = A[m,n] * {BIG}", "out of the float range"),
    ("Z[m,n] = A[m,n] * 1e999", "out of the float range"),
    (f"Z[m,n] = A[m,n] :: populate[n] topk({BIG})", "larger than 2**62"),
    (f"tensor X[M] f32 empty={BIG}", "out of the float range"),
    (f"rank Q={BIG}", "larger than 2**62"),
])
def test_huge_literals_are_parse_errors(stmt: str, message: str) -> None:
    err = _parse_error(HEAD + stmt + "\n")
    assert err.line == 6 and message in str(err)


def test_index_literals_up_to_the_bound_parse() -> None:
    c = parse(HEAD + f"Z[m,n] = A[m+{MAX_SIZE},n] * A[{'0' * 30}1,n]\n")
    assert parse(to_text(c)) == c


# ---- rank sizes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size,message", [
    ("4/0", "division by zero in the size of rank 'M'"),
    ("5/2", "rank 'M' has size 5/2; sizes must be whole numbers"),
    ("-S", "rank 'M' has size -S; sizes must be positive"),
    ("0", "rank 'M' has size 0; sizes must be positive"),
    ("S - S", "rank 'M' has size 0; sizes must be positive"),
    ("S + 1/2", "rank 'M' has size S + 1/2; sizes must be whole numbers"),
    ("10**10**10", "exponent"),
    ("2**63", "larger than 2**62"),
    ("2**65", "exponents in a size are at most 64"),
    ("S**100", "exponent"),
    ("2**62 * 2**62", "larger than 2**62"),
    ("S/(S-S)", "division by zero in the size of rank 'M'"),
    ("S * * 2", "'**' is written without a space"),
    ("floor(S, 2)", "floor takes 1 argument"),
    ("Max()", "expected a size"),
    ("S**(2)", "expected '-' in a negative exponent"),
    ("0**(-1)", "division by zero in the size of rank 'M'"),
    ("Max(" + ",".join(f"S{i}" for i in range(16)) + ")", "the size of rank 'M' is longer than 32 tokens"),
    ("exp(S)", "unknown function 'exp'"),
    ("S S", "unexpected 'S'"),
    ("S + ", "expected a size"),
    ("(S", "expected ')'"),
    ("S[0]", "unexpected '['"),
    ("1.5", "whole number"),
])
def test_bad_sizes_are_parse_errors_naming_the_rank(size: str, message: str) -> None:
    err = _parse_error(f"cascade c\nrank M={size}\n")
    assert err.line == 2 and message in str(err)


def test_sizes_are_read_without_sympify() -> None:
    c = parse("cascade c\nrank M0=64, M1=S/M0, P=2*S + 1, Q=ceiling(S/4)*Max(T, 2), R=S**2, U=None, "
              "V=floor((S + 1)//2), W=2**10, X=1/S/S\n")
    s, t = (sympy.Symbol(n, integer=True, positive=True) for n in "ST")
    sizes = {r.name: r.size for r in c.ranks}
    assert sizes == {"M0": 64, "M1": s / 64, "P": 2 * s + 1, "Q": sympy.ceiling(s / 4) * sympy.Max(t, 2),
                     "R": s ** 2, "U": sympy.Symbol("None", integer=True, positive=True),
                     "V": sympy.floor(sympy.floor((s + 1) / 2)), "W": 1024, "X": s ** -2}
    assert parse(to_text(c)) == c


@pytest.mark.parametrize("size,message", [
    (sympy.Rational(5, 2), "has size 5/2; sizes must be whole numbers"),
    (-sympy.Symbol("S", integer=True, positive=True), "has size -S; sizes must be positive"),
    (0, "has size 0; sizes must be positive"),
    (None, "has size None; a size is an integer or a sympy expression"),
    (2 ** 80, "larger than 2**62"),
    (sympy.zoo, "is not a finite number"),
    (True, "has size True; a size is an integer or a sympy expression"),
])
def test_verify_refuses_a_bad_size_naming_the_rank(size: object, message: str) -> None:
    c = parse("cascade c\nrank M=4\ntensor A[M] input f32\ntensor Z[M] output f32\nZ[m] = A[m]\n")
    bad = dataclasses.replace(c, ranks=(Rank("M", size),))  # type: ignore[arg-type]
    with pytest.raises(VerificationError, match=f"^rank 'M' .*{re.escape(message)}"):
        verify(bad)


def test_verify_refuses_a_built_index_constant_out_of_range() -> None:
    c = parse(HEAD + "Z[m,n] = A[m,n]\n")
    big = Access("A", (Index(IConst(10 ** 30)), Index(IVar("n"))))
    bad = dataclasses.replace(c, stmts=(dataclasses.replace(c.stmts[0], rhs=big),))
    with pytest.raises(VerificationError, match=re.escape("line 6: einsum `Z[m,n] = A[1000000000000000000000000000000,n]`"
                                                          ": the index constant 1000000000000000000000000000000 is "
                                                          "larger than 2**62")):
        verify(bad)


def test_an_undeclared_rank_in_a_tensor_is_a_parse_error_at_its_line() -> None:
    err = _parse_error("cascade c\nrank M=4\ntensor A[M,N] input f32\n")
    assert (err.line, err.column) == (3, 12)
    assert "tensor 'A' uses undeclared rank 'N'" in str(err)


def test_a_rank_declared_after_its_tensor_still_parses() -> None:
    c = parse("cascade c\ntensor A[M] input f32\ntensor Z[M] output f32\nrank M=4\nZ[m] = A[m]\n")
    assert verify(c).ranks == (Rank("M", 4),)


# ---- the interpreter ------------------------------------------------------------------------

def test_interpret_reports_a_tensor_too_large_naming_the_einsum() -> None:
    c = parse(f"cascade c\nrank M=4, N={MAX_SIZE}\ntensor A[M] input f32\ntensor Z[M] output f32\n"
              "T[m,n] = A[m] * 2\nZ[m] = T[m,n]\n")
    with pytest.raises(InterpretError, match=re.escape("line 5: einsum `T[m,n] = A[m] * 2`: cannot evaluate")):
        interpret(c, {"A": np.ones(4)})


def test_interpret_reports_an_undeterminable_symbolic_size() -> None:
    c = parse("cascade c\nrank M=floor(S/2)\ntensor A[M] input f32\ntensor Z[M] output f32\nZ[m] = A[m]\n")
    with pytest.raises(InterpretError, match="cannot determine S from 'A' dimension 0"):
        interpret(c, {"A": np.ones(3)})


def test_interpret_solves_a_size_for_its_symbol_by_bisection(rng: np.random.Generator) -> None:
    c = parse("cascade c\nrank M=S*(S+1), N=S-1\ntensor A[M] input f32\ntensor Z[N] output f32\nZ[n] = A[n]\n")
    a = rng.standard_normal(12)
    assert rel_err(interpret(c, {"A": a})["Z"], a[:2]) == 0
    hard = parse("cascade c\nrank M=S**63 - S**62 + 5\ntensor A[M] input f32\ntensor Z[M] output f32\nZ[m] = A[m]\n")
    with pytest.raises(InterpretError, match=re.escape("S**63 - S**62 + 5 = 9 has no single positive integer "
                                                       "solution; pass sizes={'S': ...}")):
        interpret(hard, {"A": np.ones(9)})   # (sympy.solve takes hours on this one)


def test_interpret_reports_a_size_that_divides_by_zero() -> None:
    c = parse("cascade c\nrank M=S/(S-4)\ntensor A[M] input f32\ntensor Z[M] output f32\nZ[m] = A[m]\n")
    with pytest.raises(InterpretError, match=re.escape("'A' dimension 0 (rank M) has extent 3 but the cascade "
                                                       "declares zoo")):
        interpret(c, {"A": np.ones(3)}, sizes={"S": 4})


def test_huge_constants_evaluate_to_inf_as_in_ieee() -> None:
    c = parse(HEAD + "Z[m,n] = A[m,n] * 1e308 * 1e308\n")
    got = interpret(c, {"A": np.ones((4, 4)), "B": np.ones((4, 4))})["Z"]
    assert np.all(np.isinf(got))


# ---- the command line -------------------------------------------------------------------------

CLI_CASES = {
    "deep": HEAD + "Z[m,n] = " + "(" * 500 + "A[m,n]" + ")" * 500 + "\n",
    "flat": HEAD + "Z[m,n] = " + " + ".join(["A[m,n]"] * 1000) + "\n",
    "huge": HEAD + f"Z[m,n] = A[{BIG},n]\n",
    "none": "cascade c\nrank M=None, N=4/0\n",
    "undeclared": "cascade c\nrank M=4\ntensor A[M,N] input f32\n",
}


@pytest.mark.parametrize("text", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_ir_prints_one_error_and_exits_non_zero(text: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.ein"
    path.write_text(text)
    assert main(["ir", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"einfuse: error: {path}: line ") and "Traceback" not in err


def test_cli_ir_reports_a_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.ein"
    path.write_bytes(b"cascade c\nrank M=4 # \xff\xfe\n")
    assert main(["ir", str(path)]) == 1
    assert "line 2, column 12: the file is not UTF-8" in capsys.readouterr().err


def test_shipped_cascades_still_verify_and_round_trip() -> None:
    for path in sorted((Path(__file__).parents[1] / "cascades").glob("*.ein")):
        c = verify(load(path.stem))
        assert parse(to_text(c)) == c, path.name
    assert isinstance(c, Cascade) and isinstance(c.stmts[-1], Einsum)
