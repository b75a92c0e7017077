"""The pass manager: pipeline text, instruments, failures; and canonicalize, IR in / IR out."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from einfuse.errors import EinfuseError
from einfuse.ir import Cascade, interpret, parse, to_text
from einfuse.passes import Canonicalize, Instruments, Pass, PassContext, PassError, PassManager, parse_pipeline
from einfuse.passes.manager import REGISTRY
from tests.conftest import rel_err

BEFORE = """cascade ex
rank E=8, M=8, M1=2, M0=4, P=5
tensor Q[E,P] input f32
tensor K[E,M] input f32
tensor SN[M1,M0,P] output f32
BK[e,m1,m0] = K[e,m1*4+m0]
QK[m1,m0,p] = Q[e,p] * BK[e,m1,m0]
Q2[m1,m0,p] = Q[e,p] * BK[e,m1,m0]
GM[p] = QK[m1,m0,p] :: reduce[m1,m0] max
SN[m1,m0,p] = exp(Q2[m1,m0,p] - GM[p])
UNUSED[p] = GM[p] * 2
"""

AFTER = """cascade ex
rank E=8, M=8, M1=2, M0=4, P=5
tensor Q[E,P] input f32
tensor K[E,M] input f32
tensor SN[M1,M0,P] output f32
QK[m1,m0,p] = Q[e,p] * K[e,m1*4+m0]
GM[p] = QK[m1,m0,p] :: reduce[m1,m0] max
SN[m1,m0,p] = exp(QK[m1,m0,p] - GM[p])
"""


@dataclass(frozen=True)
class Scale(Pass):
    """A test pass with typed options; it changes nothing and counts the statements it saw."""

    name = "test-scale"
    factor: int = 1
    on: bool = True

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        ctx.stats["visited"] += len(c.stmts)
        return c


@dataclass(frozen=True)
class Break(Pass):
    """A test pass that writes an undeclared tensor's ranks wrongly (the verifier must catch it)."""

    name = "test-break"

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        (first, *rest) = c.stmts
        return replace(c, stmts=(replace(first, lhs=replace(first.lhs, tensor="SN")), *rest))


@pytest.fixture(autouse=True)
def test_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "test-scale", Scale)
    monkeypatch.setitem(REGISTRY, "test-break", Break)


def test_canonicalize_inlines_views_merges_common_and_drops_dead(rng: np.random.Generator) -> None:
    c = parse(BEFORE)
    manager = PassManager([Canonicalize()], Instruments(verify_each=True))
    out = manager.run(c)
    assert to_text(out) == AFTER
    assert manager.records[0].stats == Counter({"inline-view": 1, "cse": 1, "dead-einsum": 1})
    inputs = {"Q": rng.standard_normal((8, 5)), "K": rng.standard_normal((8, 8))}
    assert rel_err(interpret(out, inputs)["SN"], interpret(c, inputs)["SN"]) <= 1e-12


MASKED = """cascade masked
rank S=6, T=6, E=4
tensor X[S,E] input f32
tensor Y[S,T] output f32
POS[s] = idx(s) + 0
MASK[s,t] = where(POS[t] <= POS[s], 0, -inf)
Y[s,t] = X[s,e] * X[t,e] + MASK[s,t]
"""


def test_canonicalize_folds_a_mask_built_from_positions(rng: np.random.Generator) -> None:
    c = parse(MASKED)
    manager = PassManager([Canonicalize()], Instruments(verify_each=True))
    out = manager.run(c)
    assert manager.records[0].stats["fold-constant"] == 2
    assert [s.lhs.tensor for s in out.stmts] == ["Y"] and out.tensor("MASK").role == "param"
    assert np.array_equal(out.params["MASK"], np.where(np.tri(6) > 0, 0.0, -np.inf))
    x = rng.standard_normal((6, 4))
    assert rel_err(interpret(out, {"X": x})["Y"][np.tri(6) > 0], interpret(c, {"X": x})["Y"][np.tri(6) > 0]) <= 1e-12


@pytest.mark.parametrize("change", [("rank S=6, T=6", "rank S=n, T=n"),          # a symbolic size
                                    ("POS[s] = idx(s) + 0", "POS[s] = X[s,0]")])  # reads an input
def test_canonicalize_does_not_fold_what_depends_on_inputs_or_sizes(change: tuple[str, str]) -> None:
    manager = PassManager([Canonicalize()])
    out = manager.run(parse(MASKED.replace(*change)))
    assert manager.records[0].stats["fold-constant"] == 0 and out.tensor("MASK") is None


def test_canonicalize_leaves_a_canonical_cascade_alone() -> None:
    c = parse(AFTER)
    manager = PassManager([Canonicalize()])
    assert manager.run(c) == c and not manager.records[0].changed


def test_pipeline_text_with_typed_options() -> None:
    passes = parse_pipeline("canonicalize, test-scale{factor=3,on=false}")
    assert passes == [Canonicalize(), Scale(factor=3, on=False)]
    assert passes[1].spelled() == "test-scale{factor=3,on=False}"


@pytest.mark.parametrize("text, message", [
    ("canonicalise", "unknown pass 'canonicalise'; available: canonicalize,"),
    ("test-scale{tile=4}", "pass 'test-scale' has no option 'tile'; options: factor, on"),
    ("test-scale{factor=big}", "pass 'test-scale' option 'factor' wants int, not 'big'"),
    ("test-scale{on=maybe}", "pass 'test-scale' option 'on' wants true or false, not 'maybe'"),
    ("canonicalize,,", "cannot read the pipeline at column 14"),
])
def test_bad_pipeline_text_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(EinfuseError, match=message.replace("{", r"\{").replace("(", r"\(")):
        parse_pipeline(text)


def test_instruments_print_dump_time_and_disable(tmp_path: Path) -> None:
    logs: list[str] = []
    ins = Instruments(print_after_change=True, dump_dir=tmp_path / "dump", time_passes=True,
                      disabled=frozenset({"test-break"}))
    PassManager(parse_pipeline("test-scale,canonicalize,test-break,test-scale"), ins, logs.append).run(parse(BEFORE))
    assert [log.splitlines()[0] for log in logs if log.startswith("// -----")] == ["// ----- IR after canonicalize -----"]
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == \
        ["000_input.ein", "001_test-scale.ein", "002_canonicalize.ein", "004_test-scale.ein"]
    assert (tmp_path / "dump" / "002_canonicalize.ein").read_text() == AFTER
    assert "canonicalize" in logs[-1] and "cse=1" in logs[-1] and "visited=" in logs[-1]


def test_print_after_a_named_pass_only() -> None:
    logs: list[str] = []
    ins = Instruments(print_after=frozenset({"test-scale"}))
    PassManager(parse_pipeline("canonicalize,test-scale"), ins, logs.append).run(parse(BEFORE))
    assert len(logs) == 1 and logs[0].startswith("// ----- IR after test-scale -----\ncascade ex")


def test_a_pass_that_breaks_the_ir_fails_with_a_reproducer() -> None:
    manager = PassManager(parse_pipeline("canonicalize,test-break"), Instruments(verify_each=True))
    with pytest.raises(PassError, match=r"pass 'test-break' failed: .*\(reproducer: (.*\.ein)\)") as err:
        manager.run(parse(BEFORE))
    path = str(err.value).rsplit("reproducer: ", 1)[1].rstrip(")")
    text = Path(path).read_text()
    assert "# pipeline: canonicalize,test-break" in text and text.endswith(AFTER)
    assert parse(text.split("\n", 3)[3]) == parse(AFTER)
