"""Every registered op is whole: its numpy semantics and costs (einfuse/ir/ops.py) and its TIR
lowering (einfuse/codegen/op_lowering.py), so that an op cannot be half-added."""
from __future__ import annotations

import pytest
from tvm import tirx

from einfuse.codegen.op_lowering import LOWERINGS, lower_op
from einfuse.errors import CompileError
from einfuse.ir.ops import OPS


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_a_numpy_fn_costs_and_a_tir_lowering(name: str) -> None:
    op = OPS[name]
    assert callable(op.fn)
    assert isinstance(op.vector_ops, int) and op.vector_ops >= op.flops
    assert isinstance(op.transcendental, bool)
    assert name in LOWERINGS, f"op '{name}' has no @lowers function in einfuse/codegen/op_lowering.py"
    args = [tirx.Var(f"x{i}", "float32") for i in range(op.arity)]
    assert str(lower_op(name, args, "float32").ty) == "float32"   # (the work dtype, whatever the op)


def test_only_registered_ops_are_lowered() -> None:
    assert set(LOWERINGS) <= set(OPS)


def test_an_op_without_a_lowering_is_a_compile_error() -> None:
    with pytest.raises(CompileError, match="no code generation for op 'nope'"):
        lower_op("nope", [], "float32")
