"""Capture's promises at its edges: every rule is reachable, data-dependent shapes and bad inputs
are einfuse errors naming what is wrong, a dynamic model refuses sizes outside its Dim's range."""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
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
    import transformers.integrations.moe  # noqa: F401   # (registers torch.ops.transformers.grouped_mm_fallback)
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


# ---- warnings ---------------------------------------------------------------------------------

def test_capturing_a_model_emits_no_future_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capture(_MinMaxLogical(), (_X, _X))
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_a_capture_in_a_fresh_process_prints_no_warning_and_other_warnings_still_show() -> None:
    script = ("import warnings, torch, einfuse\n"
              "einfuse.capture(torch.nn.Linear(4, 3), (torch.ones(2, 4),))\n"
              "warnings.warn('`isinstance(treespec, LeafSpec)` is deprecated', FutureWarning)\n"
              "warnings.warn('`isinstance(treespec, LeafSpec)` is deprecated', DeprecationWarning)\n"
              "warnings.warn('another deprecation', FutureWarning)\n")
    run = subprocess.run([sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    shown = re.findall(r"(\w+Warning): (.*)", run.stderr)
    assert shown == [("DeprecationWarning", "`isinstance(treespec, LeafSpec)` is deprecated"),
                     ("FutureWarning", "another deprecation")]


# ---- data-dependent shapes -------------------------------------------------------------------

class _MaskedSelect(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0] * 2


class _NonZero(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(x).float()


class _MaskedSelectOp(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.masked_select(x, x > 0)


@pytest.mark.parametrize("model, op, line", [
    (_MaskedSelect(), "aten.index.Tensor", "return x[x > 0] * 2"),
    (_NonZero(), "aten.nonzero.default", "return torch.nonzero(x).float()"),
    (_MaskedSelectOp(), "aten.masked_select.default", "return torch.masked_select(x, x > 0)"),
])
def test_a_data_dependent_shape_is_a_capture_error_naming_the_op_and_line(model: torch.nn.Module, op: str,
                                                                          line: str) -> None:
    with pytest.raises(einfuse.errors.CaptureError) as info:
        capture(model, (torch.randn(3, 4),))
    assert not isinstance(info.value, einfuse.errors.UnsupportedOperatorError)
    message = str(info.value)
    assert "depends on the values in a tensor" in message
    assert f"{op} at {__file__}:" in message and f"in forward: {line}" in message


# ---- bad inputs at capture -------------------------------------------------------------------

class _TwoInputs(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x * y if mask is None else x * y + mask


_X = torch.ones(3, 4)


@pytest.mark.parametrize("args, kwargs, message", [
    ((torch.empty(3, 4, device="meta"), _X), {}, "input 'x' is a meta tensor (3, 4) (it has no data)"),
    ((None, _X), {}, "input 'x' is None"),
    ((_X, _X, None), {}, "input 'mask' is None; leave an optional input out"),
    ((_X,), {}, "_TwoInputs.forward cannot take these arguments: missing a required argument: 'y'"),
    ((_X, _X, _X, _X), {}, "_TwoInputs.forward cannot take these arguments: too many positional arguments"),
    ((_X,), {"z": _X}, "_TwoInputs.forward cannot take these arguments: missing a required argument: 'y'"),
    ((_X, 2.0), {}, "input 'y' is of type float; einfuse takes tensor inputs only"),
    ((_X, "2"), {}, "input 'y' is of type str"),
    ((_X, np.ones((3, 4), np.float32)), {}, "input 'y' is of type numpy.ndarray; einfuse takes tensor inputs "
                                            "only (torch.from_numpy(x) makes it one)"),
    ((_X, [_X, 1]), {}, "input 'y' is of type int"),
    ((_X, _X.to(torch.complex64)), {}, "input 'y' has dtype torch.complex64; supported: torch.float16"),
    ((_X, _X.to(torch.uint16)), {}, "input 'y' has dtype torch.uint16"),
    ((_X, _X.to_sparse()), {}, "input 'y' has layout torch.sparse_coo"),
    ((torch.ones(0, 4), _X), {}, "input 'x' has an empty dimension (0, 4); every size must be at least 1"),
])
def test_bad_inputs_at_capture_are_input_errors(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(einfuse.errors.InputError, match=re.escape(message)):
        capture(_TwoInputs(), args, kwargs)


def test_an_optional_input_left_out_captures() -> None:
    cascade = capture(_TwoInputs(), (_X, _X))
    assert [t.name for t in cascade.tensors if t.role == "input"] == ["x", "y"]


# ---- bad inputs of a compiled model ----------------------------------------------------------

class _Scale(torch.nn.Module):
    """A per-column scale and a row sum: a (rows, 8) float input and a (rows,) int64 one."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 2.0, 8))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).sum(-1) + ids


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    rows = torch.export.Dim("rows", min=2, max=16)
    example = (torch.ones(4, 8), torch.ones(4, dtype=torch.int64))
    compiled = einfuse.compile(_Scale(), example, dynamic_shapes={"x": {0: rows}, "ids": {0: rows}},
                               cache_dir=tmp_path_factory.mktemp("cache"))
    return _Scale(), compiled


def test_a_dynamic_capture_records_each_dims_range() -> None:
    rows, cols = torch.export.Dim("rows", min=2, max=16), torch.export.Dim("cols")
    cascade = capture(_Scale(), (torch.ones(4, 8), torch.ones(4, dtype=torch.int64)),
                      dynamic_shapes={"x": {0: rows}, "ids": {0: rows}})
    assert cascade.size_ranges == {"rows": (2, 16)}
    free = capture(torch.nn.Flatten(0), (torch.ones(4, 8),), dynamic_shapes={"input": {1: cols}})
    assert free.size_ranges == {"cols": (1, None)}


def test_a_dynamic_model_serves_its_range_and_refuses_sizes_outside_it(dynamic: tuple,
                                                                        rng: np.random.Generator) -> None:
    model, compiled = dynamic
    for n in (2, 7, 16):
        x = torch.from_numpy(rng.standard_normal((n, 8)).astype(np.float32))
        ids = torch.from_numpy(rng.integers(0, 9, n))
        with torch.no_grad():
            assert rel_err(compiled(x, ids).numpy(), model(x, ids).numpy()) <= 1e-5
    for n in (1, 17, 40):
        with pytest.raises(einfuse.errors.InputError, match=re.escape(
                f"input 'x' dimension 0 (Dim 'rows') is {n}, outside the range the model was captured for: "
                "2 <= rows <= 16")):
            compiled(torch.ones(n, 8), torch.ones(n, dtype=torch.int64))


def test_the_range_survives_the_cache_and_an_export(tmp_path: Path) -> None:
    rows = torch.export.Dim("rows", min=2, max=16)
    example = (torch.ones(4, 8), torch.ones(4, dtype=torch.int64))
    shapes = {"x": {0: rows}, "ids": {0: rows}}
    first = einfuse.compile(_Scale(), example, dynamic_shapes=shapes, cache_dir=tmp_path / "cache")
    first.export(tmp_path / "export")
    wider = einfuse.compile(_Scale(), example, dynamic_shapes={"x": {0: torch.export.Dim("rows", min=2, max=32)},
                                                               "ids": {0: torch.export.Dim("rows", min=2, max=32)}},
                            cache_dir=tmp_path / "cache")
    assert wider.size_ranges == {"rows": (2, 32)}   # (another range is another cache entry)
    for model in (einfuse.compile(_Scale(), example, dynamic_shapes=shapes, cache_dir=tmp_path / "cache"),
                  einfuse.load(tmp_path / "export")):
        assert model.size_ranges == {"rows": (2, 16)}
        with pytest.raises(einfuse.errors.InputError, match="outside the range"):
            model(torch.ones(17, 8), torch.ones(17, dtype=torch.int64))


@pytest.mark.parametrize("args, message", [
    ((torch.ones(4, 8),), "expected 2 input(s) (x, ids), got 1"),
    ((torch.ones(4, 8), torch.ones(4, dtype=torch.int64), torch.ones(4)), "expected 2 input(s) (x, ids), got 3"),
    ((None, torch.ones(4, dtype=torch.int64)), "input 'x' is None; the model takes torch tensors"),
    ((torch.ones(4, 8), [1, 2, 3, 4]), "input 'ids' is of type list; the model takes torch tensors"),
    ((torch.ones(4, 8), 3), "input 'ids' is of type int"),
    ((torch.empty(4, 8, device="meta"), torch.ones(4, dtype=torch.int64)), "input 'x' is a meta tensor"),
    ((torch.ones(4, 8).to_sparse(), torch.ones(4, dtype=torch.int64)), "input 'x' is a torch.sparse_coo tensor"),
    ((torch.ones(4, 8, dtype=torch.float64), torch.ones(4, dtype=torch.int64)),
     "input 'x' has dtype torch.float64; the model was compiled for torch.float32"),
    ((torch.ones(4, 8), torch.ones(4)), "input 'ids' has dtype torch.float32; the model was compiled for torch.int64"),
    ((torch.ones(4, 8, 1), torch.ones(4, dtype=torch.int64)), "'x' has 3 dimensions (4, 8, 1) but is declared with 2"),
    ((torch.ones(4, 7), torch.ones(4, dtype=torch.int64)), "'x' dimension 1 (rank N8) has extent 7 but the "
                                                          "cascade declares 8"),
    ((torch.ones(4, 8), torch.ones(5, dtype=torch.int64)), "'ids' dimension 0 (rank ROWS) has extent 5 but the "
                                                          "cascade declares 4"),
])
def test_bad_inputs_of_a_compiled_model_are_input_errors(dynamic: tuple, args: tuple, message: str) -> None:
    _, compiled = dynamic
    with pytest.raises(einfuse.errors.InputError, match=re.escape(message)):
        compiled(*args)


def test_a_compiled_model_takes_numpy_arrays(dynamic: tuple, rng: np.random.Generator) -> None:
    model, compiled = dynamic
    x, ids = rng.standard_normal((5, 8)).astype(np.float32), rng.integers(0, 9, 5)
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(ids)).numpy()
    assert rel_err(compiled(x, ids).numpy(), want) <= 1e-5
