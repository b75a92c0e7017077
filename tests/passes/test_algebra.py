"""canonicalize's algebra: registry-driven simplification, constant propagation, scale folding."""
from __future__ import annotations

import numpy as np
import pytest

from einfuse.ir import interpret, parse, to_text
from einfuse.passes import Canonicalize, Instruments, PassManager
from tests.conftest import rel_err

# ViT's mask: a validity flag built from positions that are all valid, turned into an additive bias.
VALID_MASK = """cascade vit_mask
rank H=2, S=6, K=6, E=4
tensor Q[H,S,E] input f32
tensor KT[H,K,E] input f32
tensor Y[H,S] output f32
POS[s] = idx(s) + 0
VALID[s] = POS[s] >= 0
BIAS[s,k] = where(VALID[s], 0, -inf)
QK[h,s,k] = Q[h,s,e] * KT[h,k,e]
MK[h,s,k] = QK[h,s,k] + BIAS[s,k]
Y[h,s] = MK[h,s,k] :: reduce[k] max
"""

SCALED = """cascade scaled
rank H=2, S=16, K=16, E=4
tensor Q[S,H,E] input f32
tensor KT[H,K,E] input f32
tensor Y[H,S] output f32
QK[h,s,k] = Q[s,h,e] * KT[h,k,e]
SC[h,s,k] = QK[h,s,k] * 0.5
Y[h,s] = SC[h,s,k] :: reduce[k] max
"""


def run(text: str) -> tuple:
    manager = PassManager([Canonicalize()], Instruments(verify_each=True))
    out = manager.run(parse(text))
    return out, manager.records[0].stats


def test_an_always_true_mask_disappears(rng: np.random.Generator) -> None:
    out, stats = run(VALID_MASK)
    assert stats["simplify"] >= 2 and stats["propagate-constant"] == 1
    assert [s.lhs.tensor for s in out.stmts] == ["QK", "Y"]
    assert "BIAS" not in to_text(out) and "where" not in to_text(out)
    x = {"Q": rng.standard_normal((2, 6, 4)), "KT": rng.standard_normal((2, 6, 4))}
    assert rel_err(interpret(out, x)["Y"], interpret(parse(VALID_MASK), x)["Y"]) <= 1e-12


def test_a_mask_that_is_sometimes_false_stays(rng: np.random.Generator) -> None:
    text = VALID_MASK.replace("POS[s] >= 0", "POS[s] >= 2")
    out, stats = run(text)
    assert "where" in to_text(out) and stats["propagate-constant"] == 0
    x = {"Q": rng.standard_normal((2, 6, 4)), "KT": rng.standard_normal((2, 6, 4))}
    assert np.array_equal(interpret(out, x)["Y"], interpret(parse(text), x)["Y"])


@pytest.mark.parametrize("rhs, simple", [("X[s] * 1", "X[s]"), ("1 * X[s]", "X[s]"), ("X[s] - 0", "X[s]"),
                                         ("X[s] / 1", "X[s]"), ("max(X[s], -inf)", "X[s]"),
                                         ("X[s] * (2 * 3)", "X[s] * 6"), ("where(1, X[s], 0)", "X[s]")])
def test_identities_and_constants_from_the_registry(rhs: str, simple: str) -> None:
    text = f"cascade t\nrank S=4\ntensor X[S] input f32\ntensor Y[S] output f32\nY[s] = {rhs}\n"
    out, stats = run(text)
    assert stats["simplify"] >= 1 and to_text(out).splitlines()[-1] == f"Y[s] = {simple}"


@pytest.mark.parametrize("rhs", ["0 - X[s]", "1 / X[s]", "X[s] * 0", "X[s] + 1"])
def test_what_is_not_an_identity_stays(rhs: str) -> None:
    text = f"cascade t\nrank S=4\ntensor X[S] input f32\ntensor Y[S] output f32\nY[s] = {rhs}\n"
    out, stats = run(text)
    assert stats["simplify"] == 0 and to_text(out) == to_text(parse(text))


def test_a_scale_after_a_contraction_moves_onto_the_smaller_operand(rng: np.random.Generator) -> None:
    out, stats = run(SCALED)
    assert stats["fold-scale"] == 1
    lines = to_text(out).splitlines()
    assert "Q_scaled[s,h,e] = Q[s,h,e] * 0.5" in lines
    assert "QK[h,s,k] = Q_scaled[s,h,e] * KT[h,k,e]" in lines and "Y[h,s] = QK[h,s,k] :: reduce[k] max" in lines
    x = {"Q": rng.standard_normal((16, 2, 4)), "KT": rng.standard_normal((2, 16, 4))}
    assert rel_err(interpret(out, x)["Y"], interpret(parse(SCALED), x)["Y"]) <= 1e-12


@pytest.mark.parametrize("change", [
    ("Y[h,s] = SC[h,s,k] :: reduce[k] max", "Y[h,s] = SC[h,s,k] + QK[h,s,k] :: reduce[k] max"),  # QK read twice
    ("rank H=2, S=16, K=16, E=4", "rank H=2, S=2, K=2, E=4"),   # operands larger than the scores
    ("SC[h,s,k] = QK[h,s,k] * 0.5", "SC[h,s,k] = QK[h,s,k] * Q[s,h,0]"),   # not a constant
])
def test_scale_folding_does_not_fire(change: tuple[str, str]) -> None:
    out, stats = run(SCALED.replace(*change))
    assert stats["fold-scale"] == 0 and "_scaled" not in to_text(out)


def test_a_divided_contraction_scales_by_the_reciprocal(rng: np.random.Generator) -> None:
    text = SCALED.replace("QK[h,s,k] * 0.5", "QK[h,s,k] / 4")
    out, stats = run(text)
    assert stats["fold-scale"] == 1 and "Q_scaled[s,h,e] = Q[s,h,e] * 0.25" in to_text(out)
    x = {"Q": rng.standard_normal((16, 2, 4)), "KT": rng.standard_normal((2, 16, 4))}
    assert rel_err(interpret(out, x)["Y"], interpret(parse(text), x)["Y"]) <= 1e-12


def test_a_weight_operand_is_scaled_at_compile_time(rng: np.random.Generator) -> None:
    text = SCALED.replace("tensor Q[S,H,E] input", "tensor Q[S,H,E] param")
    c = parse(text)
    c = type(c)(c.name, c.ranks, c.tensors, c.stmts, {"Q": rng.standard_normal((16, 2, 4))})
    manager = PassManager([Canonicalize()], Instruments(verify_each=True))
    out = manager.run(c)
    assert manager.records[0].stats["fold-scale"] == 1 and manager.records[0].stats["fold-constant"] == 1
    assert out.tensor("Q_scaled").role == "param" and np.allclose(out.params["Q_scaled"], c.params["Q"] * 0.5)
    x = {"KT": rng.standard_normal((2, 16, 4))}
    assert rel_err(interpret(out, x)["Y"], interpret(c, x)["Y"]) <= 1e-12
