"""``torch.compile(model, backend="einfuse")``: registered by name, a whole graph compiled, an
unsupported operator left to eager with the rest compiled, graph breaks, new shapes, options."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import einfuse
from einfuse import zoo
from einfuse.dynamo import EagerFallbackWarning
from einfuse.errors import EinfuseError, UnsupportedOperatorError
from tests.conftest import rel_err


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()


class WithBessel(torch.nn.Module):
    """Two Linears around an operator einfuse has no rule for (``i0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.special.i0(self.a(x).tanh()))


def _recorded(fn, *args):
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = fn(*args)
    return out, [str(w.message) for w in caught if issubclass(w.category, EagerFallbackWarning)]


def test_a_zoo_model_compiles_whole_by_the_backends_name() -> None:
    model, args = zoo.build("mlp")
    compiled = torch.compile(model, backend="einfuse")
    got, fell_back = _recorded(compiled, *args)
    with torch.no_grad():
        assert rel_err(got.numpy(), model(*args).numpy()) <= 1e-5
    assert fell_back == []


def test_an_unsupported_operator_runs_in_eager_and_the_rest_is_compiled() -> None:
    torch.manual_seed(0)
    model, x = WithBessel().eval(), torch.randn(3, 16)
    got, fell_back = _recorded(torch.compile(model, backend="einfuse"), x)
    with torch.no_grad():
        assert rel_err(got.numpy(), model(x).numpy()) <= 1e-5
    assert fell_back == ["einfuse: aten.i0.default ran in eager; 2 subgraph(s) compiled by einfuse"]


def test_each_graph_of_a_graph_break_is_compiled() -> None:
    torch.manual_seed(0)

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x).relu()
            torch._dynamo.graph_break()
            return self.b(y)
    model, x = Broken().eval(), torch.randn(2, 8)
    graphs = []

    def counting(gm: torch.fx.GraphModule, inputs: list, **kw: object) -> object:
        from einfuse.dynamo import backend
        graphs.append(gm)
        return backend(gm, inputs, **kw)
    got, fell_back = _recorded(torch.compile(model, backend=counting), x)
    with torch.no_grad():
        assert rel_err(got.numpy(), model(x).numpy()) <= 1e-5
    assert len(graphs) == 2 and fell_back == []


def test_a_new_shape_recompiles_and_dynamic_sizes_compile_once() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).eval()
    static = torch.compile(model, backend="einfuse", dynamic=False)
    for rows in (2, 5):
        x = torch.randn(rows, 8)
        got, fell_back = _recorded(static, x)
        with torch.no_grad():
            assert rel_err(got.numpy(), model(x).numpy()) <= 1e-5 and fell_back == []
    torch._dynamo.reset()
    graphs = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        from einfuse.dynamo import backend
        graphs.append(gm)
        return backend(gm, example_inputs)
    compiled = torch.compile(model, backend=counting, dynamic=True)
    for rows in (3, 7, 11):   # (dynamo's symbol is the cascade's size: one graph, compiled once)
        x = torch.randn(rows, 8)
        got, fell_back = _recorded(compiled, x)
        with torch.no_grad():
            assert rel_err(got.numpy(), model(x).numpy()) <= 1e-5 and fell_back == []
    assert len(graphs) == 1
    torch._dynamo.reset()


class ScaledBySize(torch.nn.Module):
    """A scale computed from a size: a float that is symbolic where the size is (``symbolic``:
    written so that torch.export keeps it so too, where ``math.sqrt`` makes it specialize)."""

    def __init__(self, symbolic: bool = False) -> None:
        super().__init__()
        self.symbolic = symbolic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        return x.softmax(-1) * (torch._sym_sqrt(torch.sym_float(n)) if self.symbolic else math.sqrt(n))


def test_a_float_from_a_symbolic_size_compiles_per_shape_not_as_a_constant() -> None:
    """Capture once took ``sqrt(size)`` at the example's size: right there, wrong at the next."""
    compiled = torch.compile(ScaledBySize(), backend="einfuse", dynamic=True)
    warned = []
    for n in (5, 11, 7):
        x = torch.randn(2, n)
        got, fell_back = _recorded(compiled, x)
        warned += fell_back
        assert rel_err(got.numpy(), ScaledBySize()(x).numpy()) <= 1e-5
    assert warned == ["einfuse: this graph is compiled for each input shape: its sizes are symbolic and "
                      "1 unsupported operator(s): sym_float"]
    with pytest.raises(UnsupportedOperatorError, match=r"a float computed from a symbolic size \(ToFloat"):
        einfuse.compile(ScaledBySize(symbolic=True), (torch.randn(2, 6),), dynamic_shapes=({1: torch.export.Dim("n")},))


def test_options_pass_through_and_gradients_run_in_eager() -> None:
    model, args = zoo.build("mlp")
    with pytest.raises(Exception, match="unknown options \\['tile'\\]"):
        _recorded(torch.compile(model, backend="einfuse", options={"tile": 4}), *args)
    torch._dynamo.reset()
    got, fell_back = _recorded(torch.compile(model, backend="einfuse", options={"quantize": "int8"}), *args)
    with torch.no_grad():
        assert 0 < rel_err(got.numpy(), model(*args).numpy()) <= 0.02   # (int8 weights: close, not equal)
    torch._dynamo.reset()
    x = torch.randn(3, 16, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(WithBessel(), backend="einfuse")(x).sum().backward()
    assert any("needs gradients" in str(w.message) for w in caught) and x.grad is not None
    assert issubclass(EagerFallbackWarning, UserWarning) and issubclass(EinfuseError, Exception)


def test_einfuse_compile_with_fallback_compiles_around_an_unsupported_operator() -> None:
    import einfuse
    from einfuse.errors import UnsupportedOperatorError
    torch.manual_seed(0)
    model, x = WithBessel().eval(), torch.randn(3, 16)
    with pytest.raises(UnsupportedOperatorError, match="aten.i0"):
        einfuse.compile(model, (x,))
    compiled, fell_back = _recorded(lambda: einfuse.compile(model, (x,), fallback=True))
    x2 = torch.randn(3, 16)
    got, again = _recorded(compiled, x2)
    with torch.no_grad():
        assert rel_err(got.numpy(), model(x2).numpy()) <= 1e-5
    assert fell_back == ["einfuse: aten.i0.default ran in eager; 2 subgraph(s) compiled by einfuse"] and again == []


def test_a_literal_tensor_and_an_empty_constant_in_the_graph() -> None:
    """``torch.tensor([])`` in a graph (how an empty KV cache starts) is a buffer the export can
    trace, and an empty constant is dropped where a ``cat`` reads it."""
    class Grows(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.tensor([]), x.flatten()]) * 2
    x = torch.randn(3, 4)
    got, fell_back = _recorded(torch.compile(Grows(), backend="einfuse"), x)
    assert rel_err(got.numpy(), (x.flatten() * 2).numpy()) == 0 and fell_back == []


def test_the_cli_compiles_around_an_unsupported_operator_with_fallback(tmp_path, capsys) -> None:
    from einfuse.cli import main
    source = tmp_path / "bessel.py"
    source.write_text("import torch\n\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                      "        self.lin = torch.nn.Linear(16, 16)\n\n    def forward(self, x):\n"
                      "        return torch.special.i0(self.lin(x)).tanh() * 2\n\n"
                      "def build():\n    torch.manual_seed(0)\n    return M().eval(), (torch.randn(3, 16),)\n")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerFallbackWarning)
        assert main(["compile", f"{source}:build", "-o", str(out), "--fallback", "--no-cache"]) == 0
    parts = sorted(p.name for p in out.iterdir())
    assert parts == ["fused_0", "fused_1"] and all((out / p / "model.so").is_file() for p in parts)
    assert "wrote 2 compiled subgraph(s)" in capsys.readouterr().out
