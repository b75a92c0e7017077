"""``torch.compile(model, backend="einfuse")``: einfuse as a TorchDynamo backend, with eager
fallback for the operators einfuse has no rule for (issue 23, a first part).

Dynamo hands the backend each FX graph it captured (graph breaks give several) with example
inputs. The backend exports the graph to ATen operators (``torch.export``, parameters kept as
constants, so the weights are packed and folded as ``einfuse.compile`` does) and compiles it
whole when every operator has a rule. Otherwise it partitions the ATen graph
(``torch.fx.passes.infra.partitioner.CapabilityBasedPartitioner``): each maximal subgraph of
supported operators is compiled by einfuse, the rest runs in eager, and one warning per graph
names what fell back. ``options`` of ``torch.compile`` pass through to :func:`einfuse.compile`
(``target``, ``pipeline``, ``quantize``). A graph with symbolic sizes (dynamo's dynamic shapes),
one that needs gradients, or one einfuse cannot capture at all runs in eager, with a warning
saying why. The entry point (``torch_dynamo_backends``) registers the name on ``pip install``.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from .errors import EinfuseError, UnsupportedOperatorError

OPTIONS = ("target", "pipeline", "quantize")


class EagerFallbackWarning(UserWarning):
    """Part of a graph given to the einfuse backend runs in eager; the message says which and why."""


def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None) -> Callable:
    """The TorchDynamo backend: a callable running ``gm`` with einfuse's kernels."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise EinfuseError(f"torch.compile(backend='einfuse'): unknown options {unknown}; known: {', '.join(OPTIONS)}")
    why = _eager_reason(gm, example_inputs)
    if why:
        warnings.warn(f"einfuse: this graph runs in eager: {why}", EagerFallbackWarning, stacklevel=2)
        return gm.forward
    from .frontends.torch_export import export_aten
    exported = export_aten(gm, tuple(example_inputs), {}, None).module()   # (ATen, as capture reads it)
    try:
        return _compiled(exported, tuple(example_inputs), options)
    except UnsupportedOperatorError as exc:
        return _partitioned(exported, tuple(example_inputs), options, exc)


def _eager_reason(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str:
    """Why ``gm`` cannot be compiled at all, or ``""``."""
    if any(not isinstance(x, torch.Tensor) for x in example_inputs):
        return "symbolic sizes among its inputs (dynamic shapes are not taken by the backend yet)"
    if torch.is_grad_enabled() and any(x.requires_grad for x in [*example_inputs, *gm.parameters()]):
        return "it needs gradients (einfuse compiles inference; run under torch.no_grad())"
    return ""


def _compiled(module: torch.nn.Module, args: tuple, options: dict) -> Callable:
    """``module`` compiled whole, called as the graph is (a tuple or list back, as dynamo expects)."""
    from .api import compile as compile_model
    model = compile_model(module, args, **options)

    def run(*inputs: Any) -> Any:
        out = model(*inputs)
        return out if isinstance(out, tuple) else (out,)
    return _single(module, run)


def _single(module: torch.nn.Module, run: Callable) -> Callable:
    """``run``, giving one output back bare where ``module``'s graph returns one bare."""
    outputs = next(n for n in module.graph.nodes if n.op == "output").args[0]
    if isinstance(outputs, (tuple, list)):
        return run
    return lambda *inputs: run(*inputs)[0]


class _Supported(OperatorSupportBase):
    """The ATen operators einfuse has a rule for."""

    def is_node_supported(self, submodules: dict, node: torch.fx.Node) -> bool:
        from .frontends.aten import RULES
        return node.op == "call_function" and str(node.target) in RULES


def _partitioned(module: torch.fx.GraphModule, args: tuple, options: dict, exc: UnsupportedOperatorError) -> Callable:
    """``module`` with each maximal subgraph of supported operators compiled by einfuse and the
    rest in eager; one warning names what fell back."""
    partitioner = CapabilityBasedPartitioner(module, _Supported(), allows_single_node_partition=True)
    fused = partitioner.fuse_partitions(partitioner.propose_partitions())
    inputs = _submodule_inputs(fused, args)
    compiled = 0
    for name, sub_args in inputs.items():
        try:
            setattr(fused, name, _Callable(_compiled(getattr(fused, name), sub_args, options)))
            compiled += 1
        except EinfuseError as err:   # (a subgraph einfuse still cannot take stays in eager)
            warnings.warn(f"einfuse: subgraph {name} runs in eager: {err}", EagerFallbackWarning, stacklevel=3)
    ops = sorted({op for op, _ in exc.ops})
    warnings.warn(f"einfuse: {', '.join(ops)} ran in eager; {compiled} subgraph(s) compiled by einfuse",
                  EagerFallbackWarning, stacklevel=3)
    return fused.forward


class _Callable(torch.nn.Module):
    """A compiled subgraph in place of its submodule."""

    def __init__(self, run: Callable) -> None:
        super().__init__()
        self.run = run

    def forward(self, *inputs: Any) -> Any:
        return self.run(*inputs)


def _submodule_inputs(fused: torch.fx.GraphModule, args: tuple) -> dict[str, tuple]:
    """Each fused submodule's inputs when ``fused`` runs on ``args`` (its example inputs)."""
    seen: dict[str, tuple] = {}

    class Recorder(torch.fx.Interpreter):
        def call_module(self, target: Any, call_args: tuple, kwargs: dict) -> Any:
            seen.setdefault(str(target), tuple(call_args))
            return super().call_module(target, call_args, kwargs)
    with torch.no_grad():
        Recorder(fused).run(*args)
    return {name: value for name, value in seen.items() if name.startswith("fused_")}
