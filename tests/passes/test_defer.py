"""defer (R1): divisions past contractions, centring past sums of squares; fewer passes, same values."""
from __future__ import annotations

import numpy as np
import pytest

from einfuse.ir import count_passes, interpret, parse, to_text
from einfuse.passes import Instruments, PassManager, pipeline
from tests.conftest import load, rel_err

LAYERNORM = """cascade ln
rank B=3, S=5, D=8
tensor X[B,S,D] input f32
tensor Y[B,S,D] output f32
SUM[b,s] = X[b,s,d]
MEAN[b,s] = SUM[b,s] / 8
C[b,s,d] = X[b,s,d] - MEAN[b,s]
SQ[b,s,d] = C[b,s,d] * C[b,s,d]
SQSUM[b,s] = SQ[b,s,d]
RSTD[b,s] = rsqrt(SQSUM[b,s] / 8 + 0.00001)
Y[b,s,d] = C[b,s,d] * RSTD[b,s]
"""


def run(c):
    manager = PassManager(pipeline("defer,canonicalize"), Instruments(verify_each=True))
    return manager.run(c), manager.records[0].stats


def test_layernorm_variance_no_longer_waits_for_the_mean(rng: np.random.Generator) -> None:
    c = parse(LAYERNORM)
    out, stats = run(c)
    assert stats["defer-centring"] == 1 and count_passes(c, ["D"]) == 3 and count_passes(out, ["D"]) == 2
    assert "SQSUM_dev[b,s] = (X[b,s,d] - X[b,s,0]) * (X[b,s,d] - X[b,s,0])" in to_text(out)
    x = 1000.0 + rng.standard_normal((3, 5, 8))   # a large mean: the shift keeps the variance exact
    assert rel_err(interpret(out, {"X": x})["Y"], interpret(c, {"X": x})["Y"]) <= 1e-9


def test_softmax_division_is_deferred_past_the_values(rng: np.random.Generator) -> None:
    c = load("attn_3pass")
    out, stats = run(c)
    assert stats["defer-division"] == 1 and count_passes(c, ["M"]) == 3 and count_passes(out, ["M"]) == 2
    assert "AV[f,p] = AV_num[f,p] / SD[p]" in to_text(out)
    x = {"Q": rng.standard_normal((32, 40)), "K": rng.standard_normal((32, 48)), "V": rng.standard_normal((32, 48))}
    assert rel_err(interpret(out, x)["AV"], interpret(c, x)["AV"]) <= 1e-12


@pytest.mark.parametrize("change", [
    ("MEAN[b,s] = SUM[b,s] / 8", "MEAN[b,s] = SUM[b,s] / 7"),            # not the mean
    ("SUM[b,s] = X[b,s,d]", "SUM[b,s] = X[b,s,d] * X[b,s,d]"),            # the mean of something else
    ("SQ[b,s,d] = C[b,s,d] * C[b,s,d]", "SQ[b,s,d] = C[b,s,d] * X[b,s,d]"),  # not a square
])
def test_centring_is_not_deferred_when_the_pattern_differs(change: tuple[str, str]) -> None:
    out, stats = run(parse(LAYERNORM.replace(*change)))
    assert stats["defer-centring"] == 0 and "_dev" not in to_text(out)


@pytest.mark.parametrize("change", [
    ("A[m,p] = SN[m,p] / SD[p]", "A[m,p] = SN[m,p] / QK[m,p]"),   # the divisor varies along m
    ("AV[f,p] = A[m,p] * V[f,m]", "AV[f,p] = A[m,p] * V[f,m] + A[m,p]"),  # not a product of two reads
])
def test_division_is_not_deferred_when_the_divisor_varies_or_the_form_differs(change: tuple[str, str]) -> None:
    text = to_text(load("attn_3pass")).replace(*change)
    out, stats = run(parse(text))
    assert stats["defer-division"] == 0 and "_num" not in to_text(out)
