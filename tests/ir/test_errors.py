"""Malformed cascades are refused with a precise message: line, column, offending text, rule."""
from __future__ import annotations

import re

import numpy as np
import pytest

from einfuse.errors import EinfuseError, InterpretError, IRParseError, VerificationError
from einfuse.ir import interpret, parse, verify

from ..conftest import load

HEAD = ("cascade c\nrank M=4, N=4, K=4\ntensor A[M,K] input f32\ntensor B[K,N] input f32\n"
        "tensor Z[M,N] output f32\n")

PARSE_ERRORS = [
    ("Z[m,n] = A[m,k] * B[k,n", 6, 24, "expected ',' or ']' in the indices of 'B', found end of line"),
    ("Z[m,n] = A[m,k] * * B[k,n]", 6, 19, "expected an expression, found '*'"),
    ("Z[m,n] = A[m,k] * B[k,n] :: reduce[k] avg", 6, 39, "unknown reduce op 'avg'; expected one of + * max min"),
    ("Z[m,n] = A[m,k] *@bogus B[k,n]", 6, 19,
     "unknown merge 'bogus'; expected one of cap, cup, all, lhs, rhs, lhs_only, rhs_only"),
    ("Z[m,n] = A[m,k] $ B[k,n]", 6, 17, "unexpected character '$'"),
    ("for k in K {\nZ[m,n] = A[m,k] * B[k,n]", 6, 1, "loop 'for k in K' is never closed with '}'"),
    ("}", 6, 1, "'}' closes no 'for' loop"),
    ("Z[m,n] = A[m,k] * B[k,n] :: populate[n] topk(0)", 6, 46, "topk needs a positive integer K, found '0'"),
    ("for q in K {", 6, 5, "loop variable 'q' must be the lower-case name of its rank 'K' (write 'for k in K')"),
    ("Z[m,n] = A[m,n] :: reduce[k] + :: reduce[k] +", 6, 35,
     "unexpected ':: reduce' (clauses are ':: reduce', then ':: populate', then ':: from', each at most once)"),
    ("Z[m,n] = A[m,k] B[k,n]", 6, 17, "unexpected 'B' after the expression"),
    ("Z[m,n] = A[m,n] < B[m,n] < A[m,n]", 6, 26, "comparisons do not chain; add parentheses"),
    ("Z[m,n] = exp", 6, 10, "'exp' is neither a tensor access ('exp[...]') nor an op call ('exp(...)')"),
    ("rank K=3", 6, 6, "rank 'K' is declared twice"),
    ("rank Q=0", 6, 8, "rank 'Q' has size 0; sizes must be positive"),
    ("rank q=4", 6, 6, "rank name 'q' must start with an upper-case letter"),
    ("tensor X[M] input f99", 6, 19,
     "unknown dtype 'f99' for tensor 'X'; expected one of f16, bf16, f32, f64, i4, u4, i8, u8, i32, i64, bool"),
    ("tensor X[M] f32 input", 6, 17, "the role of 'X' must come before its dtype ('tensor X[...] input f32')"),
    ("tensor X[M] f32 empty=oops", 6, 23, "expected a number for the empty value of 'X', found 'oops'"),
    ("Z[m,n] = A[m,n:m<<n]", 6, 18, "expected an index (variable, rank size, integer or gather), found '<'"),
]


@pytest.mark.parametrize("stmt,line,column,message", PARSE_ERRORS, ids=[p[3][:40] for p in PARSE_ERRORS])
def test_parse_errors_name_line_column_and_text(stmt: str, line: int, column: int, message: str) -> None:
    text = HEAD + stmt + "\n"
    with pytest.raises(IRParseError) as info:
        parse(text)
    err = info.value
    assert (err.line, err.column) == (line, column)
    offending = text.splitlines()[line - 1]
    assert str(err) == f"line {line}, column {column}: {message}\n    {offending}\n    {' ' * (column - 1)}^"


def test_parse_error_on_a_missing_header() -> None:
    with pytest.raises(IRParseError, match=re.escape("line 1, column 1: expected 'cascade NAME' as the first line")):
        parse("rank M=4\n")


VERIFY_ERRORS = [
    ("Z[m,n] = A[m,k] * B[k,n] :: reduce[n] +",
     "reduce[n] must name exactly the reduced variables (on the right, not on the left): k"),
    ("Z[m,n] = A[m,n] :: reduce[m] max", "reduce[m] must name exactly the reduced variables (on the right, "
     "not on the left): nothing"),
    ("Z[m,n] = expp(A[m,k])", "unknown op 'expp'"),
    ("Z[m,n] = max(A[m,n])", "op 'max' takes 2 argument(s), given 1"),
    ("Z[m,n] = A[m,k,n] * B[k,n]", "'A[m,k,n]' has 3 indices but 'A' has 2 ranks [M,K]"),
    ("A[m,k] = B[k,m]", "writes to input tensor 'A'"),
    ("Z[m,n] = T[m,n] + A[m,n]", "tensor 'T' is not declared and never written"),
    ("Z[m,n] = A[m,q] * B[q,n]", "unknown variable 'q' (no rank 'Q' is declared)"),
    ("Z[m,n] = A[m,k] * B[k,n] :: populate[k] topk(2)", "populate[k] must name a variable of the output"),
    ("Z[m,n] = A[m,n] * B[n,Q]", "unknown rank 'Q' used as a size"),
    ("Z[A[m,0],n] = B[m,n]", "the output access may not use a data-dependent index"),
]


@pytest.mark.parametrize("stmt,message", VERIFY_ERRORS, ids=[v[1][:40] for v in VERIFY_ERRORS])
def test_verification_errors_name_the_einsum_and_rule(stmt: str, message: str) -> None:
    with pytest.raises(VerificationError) as info:
        verify(parse(HEAD + stmt + "\n"))
    assert str(info.value) == f"line 6: einsum `{stmt}`: {message}"


def test_read_before_write_names_the_temp() -> None:
    text = HEAD + "T[m,n] = A[m,n]\nZ[m,n] = T[m,n] + U[m,n]\nU[m,n] = A[m,n]\n"
    with pytest.raises(VerificationError, match=re.escape(
            "line 7: einsum `Z[m,n] = T[m,n] + U[m,n]`: temp 'U' is read before it is written")):
        verify(parse(text))


ITER = ("cascade c\nrank I=4\ntensor A[I] input f32\ntensor R[I+] f32\ntensor Z[] output f32\n"
        "R[0] = 0\n")


@pytest.mark.parametrize("body,message", [
    ("for i in I {\n  R[i+1] = R[i] + A[i]\n  Z[] = R[I]\n}\n",
     "line 9: einsum `Z[] = R[I]`: reads the terminal iterate 'R[I]' inside 'for i in I'; move this Einsum "
     "after the loop"),
    ("R[i+1] = A[i]\nZ[] = R[I]\n",
     "line 7: einsum `R[i+1] = A[i]`: writes iterate 'R[i+1]' outside 'for i in I'; recurrences need a loop"),
    ("for i in I {\n  for i in I {\n    R[i+1] = R[i] + A[i]\n  }\n}\nZ[] = R[I]\n",
     "line 8: loop 'for i in I' is nested inside a loop over the same rank"),
    ("for i in I {\n  R[i+1] = R[i+1] + A[i]\n}\nZ[] = R[I]\n",
     "line 8: einsum `R[i+1] = R[i+1] + A[i]`: reads its own output 'R'; only a loop-carried read"),
    ("for i in I {\n  R[i+1] = R[i] + A[i]\n}\n", "output tensor 'Z' is never written"),
    ("Z[] = A[i]\nZ[] = Z[] + A[i]\n", "line 8: einsum `Z[] = Z[] + A[i]`: reads its own output 'Z'; only a "
     "loop-carried read (X[..m1..] while writing X[..m1+1..] inside 'for m1') is allowed"),
])
def test_loop_misuse(body: str, message: str) -> None:
    with pytest.raises(VerificationError) as info:
        verify(parse(ITER + body))
    assert str(info.value).startswith(message)


def test_undeclarable_temp_asks_for_a_declaration() -> None:
    text = "cascade c\nrank I=4\ntensor A[I] input f32\ntensor Z[I] output f32\nT[0] = 1\nZ[i] = A[i] + T[0]\n"
    with pytest.raises(VerificationError, match=re.escape(
            "line 5: einsum `T[0] = 1`: cannot infer the ranks of 'T' from its writes; declare it with a "
            "'tensor T[...]' line")):
        verify(parse(text))


def test_interpret_reports_missing_and_misshapen_inputs() -> None:
    c = load("attn_causal")
    x = {"Q": np.zeros((32, 5)), "K": np.zeros((32, 5))}
    with pytest.raises(InterpretError, match="missing input 'V' of cascade 'attn_causal'"):
        interpret(c, x)
    with pytest.raises(InterpretError, match=re.escape("'V' dimension 1 (rank M) has extent 6 but the cascade "
                                                       "declares 5")):
        interpret(c, {**x, "V": np.zeros((32, 6))})
    with pytest.raises(InterpretError, match=re.escape("'V' has 1 dimensions (32,) but is declared with 2 ranks [F,M]")):
        interpret(c, {**x, "V": np.zeros(32)})
    with pytest.raises(InterpretError, match="'W' is not an input or param of cascade 'attn_causal'"):
        interpret(c, {**x, "V": np.zeros((32, 5)), "W": np.zeros(3)})


def test_every_error_is_an_einfuse_error() -> None:
    assert all(issubclass(t, EinfuseError) for t in (IRParseError, VerificationError, InterpretError))
