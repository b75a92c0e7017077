"""The kernel-kind registry (``ir.kernels.KINDS``) and the tables keyed by it: a kind declared
without its CPU schedule rules (unless a loop builder builds it) or its cost estimate, or a
table naming a kind never declared, fails here."""
from __future__ import annotations

import pytest

from einfuse.codegen.schedules.cpu import RULES
from einfuse.errors import CompileError
from einfuse.ir.kernels import KINDS, Kernel, register_kind
from einfuse.passes.group_kernels import MERGES
from einfuse.targets.cost import ESTIMATES


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_has_schedule_rules_or_is_built_by_a_loop_builder(name: str) -> None:
    kind = KINDS[name]
    assert kind.name == name and kind.doc
    if kind.loop:
        assert name not in RULES, f"kind {kind.label} is built by a loop builder: its CPU rules would never run"
    else:
        assert RULES.get(name), f"kind {kind.label} has no CPU schedule rules (codegen/schedules/cpu.RULES)"


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_has_a_cost_estimate(name: str) -> None:
    assert name in ESTIMATES, f"kind {KINDS[name].label} has no cost estimate (targets/cost.ESTIMATES)"


def test_the_tables_name_only_registered_kinds() -> None:
    assert set(RULES) <= set(KINDS)
    assert set(ESTIMATES) <= set(KINDS)
    merged = [kind for kind, _ in MERGES]
    assert set(merged) <= set(KINDS) and len(merged) == len(set(merged))


def test_a_kernel_of_an_unknown_kind_is_an_error() -> None:
    with pytest.raises(CompileError, match="unknown kind 'tiles'"):
        Kernel("k0_Y", "Y", (), (), ("X",), kind="tiles")


def test_a_kind_is_declared_once() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        register_kind("rows", "again")
