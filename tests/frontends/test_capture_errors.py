"""Capture's promises at its edges: every rule is reachable, data-dependent shapes and bad inputs
are einfuse errors naming what is wrong, a dynamic model refuses sizes outside its Dim's range."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import einfuse
from einfuse.frontends import capture
from einfuse.frontends.aten import RULES
from einfuse.ir import interpret

from ..conftest import rel_err

DOCS = Path(__file__).resolve().parents[2] / "docs" / "frontend.md"


def _eager(model: torch.nn.Module, args: tuple) -> np.ndarray:
    with torch.no_grad():
        return model(*args).double().numpy()


def _interpreted(model: torch.nn.Module, args: tuple) -> np.ndarray:
    cascade = capture(model, args)
    names = [t.name for t in cascade.tensors if t.role == "input"]
    return interpret(cascade, dict(zip(names, args)))["out0"]


# ---- the rule table --------------------------------------------------------------------------

def test_every_registered_rule_names_an_overload_torch_has() -> None:
    missing = []
    for key in RULES:
        namespace, op, overload = key.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is None or overload not in packet.overloads():
            missing.append(key)
    assert not missing, f"rules registered under overloads torch does not have: {missing}"


def _documented_ops() -> set[str]:
    """The ATen op names in the op table of docs/frontend.md (``logical_and/or/xor`` expanded,
    ``max_pool2d(_with_indices)`` both ways)."""
    table = DOCS.read_text().split("## Op table", 1)[1].split("\n###", 1)[0]
    ops: set[str] = set()
    for row in table.splitlines()[3:]:
        cells = row.split("|")
        for group in re.findall(r"`([^`]+)`", cells[2] if len(cells) > 2 else ""):
            for token in group.split():
                if m := re.fullmatch(r"(\w+)\((_\w+)\)", token):
                    ops |= {m[1], m[1] + m[2]}
                elif "/" in token:
                    first, *rest = token.split("/")
                    ops |= {first} | {first.rsplit("_", 1)[0] + "_" + r for r in rest}
                else:
                    ops.add(token.split(".")[0])
    return {op for op in ops if hasattr(torch.ops.aten, op)}


def test_every_op_the_docs_list_has_a_rule() -> None:
    documented = _documented_ops()
    assert {"maximum", "minimum", "logical_and", "logical_xor", "topk"} <= documented   # (the parse works)
    have = {key.split(".")[1] for key in RULES}
    assert sorted(documented - have) == []


class _MinMaxLogical(torch.nn.Module):
    """maximum, minimum and the logical ops, as T5's clamping and masks use them."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        both = torch.logical_and(x > 0, y > 0)
        either = torch.logical_or(x > 0.5, y < -0.5)
        one = torch.logical_xor(x, y > 0)
        mixed = torch.maximum(x, y) * both + torch.minimum(x, y) * either + one.float()
        return mixed + torch.floor_divide(x, torch.full_like(y, 0.25))


def test_maximum_minimum_and_logical_ops_capture_and_match_eager(rng: np.random.Generator) -> None:
    x, y = (torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32)) for _ in range(2))
    x[0, 0] = 0.0   # (logical_xor reads a float as "nonzero")
    assert rel_err(_interpreted(_MinMaxLogical(), (x, y)), _eager(_MinMaxLogical(), (x, y))) <= 1e-6


def test_maximum_minimum_and_logical_ops_compile_and_match_eager(tmp_path: Path, rng: np.random.Generator) -> None:
    x, y = (torch.from_numpy(rng.standard_normal((4, 16)).astype(np.float32)) for _ in range(2))
    compiled = einfuse.compile(_MinMaxLogical(), (x, y), cache_dir=tmp_path)
    x, y = (torch.from_numpy(rng.standard_normal((4, 16)).astype(np.float32)) for _ in range(2))
    assert rel_err(compiled(x, y).numpy(), _eager(_MinMaxLogical(), (x, y))) <= 1e-5
