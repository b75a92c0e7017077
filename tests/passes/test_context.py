"""The pass context: one parsed target for every pass, and the codegen pipeline as passes."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import einfuse
from einfuse import targets
from einfuse.api import laid_out, optimized
from einfuse.cli import main
from einfuse.ir import interpret, parse, to_text
from einfuse.passes import FuseAttention, PassContext, PassManager

from ..conftest import load, rel_err


def with_weights(text: str, rng: np.random.Generator) -> einfuse.ir.Cascade:
    c = parse(text)
    shapes = {t.name: [c.rank(r.rank).size for r in t.ranks] for t in c.tensors if t.role == "param"}
    return replace(c, params={n: rng.standard_normal(s) for n, s in shapes.items()})


def test_fuse_attention_takes_its_tile_from_the_context_target() -> None:
    c = load("attn_3pass")
    accel = targets.Target.parse("accel:fusemax")
    on_accel = PassManager([FuseAttention()]).run(c, PassContext(accel))
    on_cuda = PassManager([FuseAttention()]).run(c, PassContext(targets.Target.parse("cuda:sm_80")))
    assert on_accel.rank("MI").size == min(accel.device.pe_cols, 48)
    assert on_cuda.rank("MI").size == 48   # (64 keys per tile, capped at the 48 there are)


@pytest.mark.parametrize("target", ["cpu", "cuda:sm_80", "accel:fusemax"])
def test_the_codegen_pipeline_keeps_the_cascade_exact(target: str, rng: np.random.Generator) -> None:
    """Layouts and grouping as passes: the float64 interpreter gives the same result after them."""
    c = with_weights(to_text(load("mlp_block")), rng)
    out = laid_out(optimized(c, target=target), target)
    assert out.groups and all(k.output for k in out.groups)
    x = rng.standard_normal((8, 32))
    assert rel_err(interpret(out, {"X": x})["G"], interpret(c, {"X": x})["G"]) <= 1e-12


def test_einfuse_ir_codegen_prints_what_compile_compiled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``einfuse ir -p default,codegen`` shows the IR exactly as code generation receives it,
    the layout passes in its pass timing."""
    path = tmp_path / "mlp.ein"
    path.write_text(to_text(load("mlp_block")))
    assert main(["ir", str(path), "-p", "default,codegen", "--target", "cpu", "--time-passes"]) == 0
    out, err = capsys.readouterr()
    for name in ("transpose-weights", "pack-weights", "materialize-operands", "group-kernels"):
        assert name in err
    c = load("mlp_block")
    c = replace(c, params={t.name: np.zeros([c.rank(r.rank).size for r in t.ranks]) for t in c.tensors
                           if t.role == "param"})
    compiled = einfuse.compile(c, cache_dir=tmp_path / "cache")
    assert out == to_text(compiled.ir)
    assert "# kernel" in out


def test_a_compile_parses_its_target_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parse_target = targets.Target.parse
    named: list[str] = []

    def counted(spec: object) -> targets.Target:
        if isinstance(spec, str):
            named.append(spec)
        return parse_target(spec)
    monkeypatch.setattr(targets.Target, "parse", staticmethod(counted))
    einfuse.compile(load("attn_3pass"), cache_dir=tmp_path)   # (compiled, stored in the cache, checked)
    assert named[0] == "cpu" and set(named[1:]) <= {"cpu"} and len(named) <= 2   # (and its model.json read back)
