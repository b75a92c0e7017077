"""group-kernels: the kernel groups as a side table, FuseMax's legality rule, and its text."""
from __future__ import annotations

from collections import Counter

import pytest

from einfuse.errors import CompileError
from einfuse.ir import parse, to_text
from einfuse.passes import GroupKernels, PassError, PassManager, pipeline
from einfuse.passes import group_kernels as grouping
from tests.conftest import load

SOFTMAX_MLP = """cascade t
rank M=8, K=16, N=4
tensor X[M,K] input f32
tensor W[K,N] param f32
tensor Y[M,N] output f32
H[m,n] = X[m,k] * W[k,n]
R[m,n] = relu(H[m,n])
MX[m] = R[m,n] :: reduce[n] max
EX[m,n] = exp(R[m,n] - MX[m])
SM[m] = EX[m,n]
Y[m,n] = EX[m,n] / SM[m]
"""

# S sums X over M; Y divides by it: along M, S is at level 1 and Y at level 2 (a second pass).
TWO_PASSES = """cascade t
rank M=8
tensor X[M] input f32
tensor Y[M] output f32
S[] = X[m]
Y[m] = X[m] / S[]
"""


def test_the_groups_become_the_side_table_and_the_text_shows_them() -> None:
    manager = PassManager([GroupKernels()])
    out = manager.run(parse(SOFTMAX_MLP))
    assert out == parse(SOFTMAX_MLP) and manager.records[0].changed   # the IR is the same; the table is new
    assert [(k.output, k.kind) for k in out.groups] == [("R", "epilogue"), ("Y", "rows")]
    assert manager.records[0].stats == Counter({"kernel:epilogue": 1, "kernel:rows": 1})
    comments = [line for line in to_text(out).splitlines() if line.startswith("#")]
    assert comments == ["# kernel k0_R epilogue along M (1 pass): H -> R",
                        "# kernel k1_Y rows along M (1 pass): MX, EX, SM -> Y"]
    assert parse(to_text(out)) == out   # (comments: the table is not part of the IR)


def test_a_pass_after_grouping_drops_the_stale_table() -> None:
    out = PassManager(pipeline("group-kernels,canonicalize")).run(parse(SOFTMAX_MLP))
    assert out.groups == () and "# kernel" not in to_text(out)


def test_the_attention_loop_streams_the_key_tiles_in_one_pass() -> None:
    out = PassManager(pipeline("default,group-kernels")).run(load("attn_3pass"))
    (loop,) = [k for k in out.groups if k.kind == "loop"]
    stream, levels = grouping.stream_levels(out, loop)
    assert stream == ("MT", "MI") and levels == {1}


def test_einsums_at_two_pass_levels_are_not_grouped() -> None:
    c = parse(TWO_PASSES)
    kernels = grouping.group_kernels(c)
    assert [k.output for k in kernels] == ["S", "Y"]
    illegal = grouping.Kernel("k0_Y", "Y", kernels[1].writes, ("S",), ("X",))
    assert grouping.stream_levels(c, illegal) == (("M",), {1, 2})


def test_a_group_that_breaks_the_rule_fails_naming_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    c = parse(TWO_PASSES)
    kernels = grouping.group_kernels(c)
    illegal = grouping.Kernel("k0_Y", "Y", kernels[1].writes, ("S",), ("X",), kind="rows")
    monkeypatch.setattr(grouping, "group_kernels", lambda c, *options: [illegal])
    with pytest.raises(PassError, match=r"kernel k0_Y fuses Einsums at pass levels \[1, 2\] along M") as info:
        PassManager([GroupKernels()]).run(c)
    assert isinstance(info.value.__cause__, CompileError)


def test_named_pipelines_stand_for_their_passes_in_pipeline_text() -> None:
    assert [p.spelled() for p in pipeline("default,group-kernels")] == \
        ["canonicalize", "fuse-attention", "defer", "canonicalize", "moe", "group-kernels"]
    assert [p.spelled() for p in pipeline("fuse-attention{tile=4},unfused")] == ["fuse-attention{tile=4}", "canonicalize"]
    assert pipeline("none") == []
