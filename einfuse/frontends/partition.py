"""Partitioning a model at the operators capture has no rule for: each maximal subgraph of
supported ATen operators becomes a submodule that a compiler replaces, the rest runs in eager
(``einfuse.compile(..., fallback=True)`` and the ``torch.compile`` backend, issue 23).

The ATen graph (:func:`~.torch_export.export_aten`, unlifted: parameters are attributes) is
split by ``torch.fx.passes.infra.partitioner.CapabilityBasedPartitioner`` over the operators in
``RULES``; each ``fused_<i>`` submodule is run once on the example inputs to know its own, then
given to ``compile_fn``. A submodule the compiler still refuses stays in eager, and the warning
(:class:`EagerFallbackWarning`) names what ran in eager.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from ..errors import EinfuseError
from .aten import RULES


class EagerFallbackWarning(UserWarning):
    """Part of a model runs in eager; the message says which and why."""


class _Supported(OperatorSupportBase):
    """The ATen operators capture has a rule for."""

    def is_node_supported(self, submodules: dict, node: torch.fx.Node) -> bool:
        return node.op == "get_attr" or node.op == "call_function" and str(node.target) in RULES   # (a constant
        # joins its readers' subgraph, rather than coming in as an input)


class _Compiled(torch.nn.Module):
    """A compiled subgraph in place of its submodule."""

    def __init__(self, run: Callable) -> None:
        super().__init__()
        self.run = run

    def forward(self, *inputs: Any) -> Any:
        return self.run(*inputs)


def compiled_parts(module: torch.nn.Module) -> dict[str, Any]:
    """The compiled models of a partitioned module (:func:`partitioned`), by subgraph name."""
    return {name: m.run.einfuse_model for name, m in module.named_children()
            if isinstance(m, _Compiled) and hasattr(m.run, "einfuse_model")}


def partitioned(module: torch.fx.GraphModule, args: tuple, compile_fn: Callable[[torch.nn.Module, tuple], Callable],
                unsupported: list[str]) -> torch.fx.GraphModule:
    """``module`` (an ATen graph) with each maximal subgraph of supported operators replaced by
    what ``compile_fn(submodule, its example inputs)`` returns; one warning names the
    ``unsupported`` operators that run in eager."""
    partitioner = CapabilityBasedPartitioner(module, _Supported(), allows_single_node_partition=True)
    fused = partitioner.fuse_partitions(partitioner.propose_partitions())
    compiled = 0
    for name, sub_args in _submodule_inputs(fused, args).items():
        try:
            setattr(fused, name, _Compiled(compile_fn(getattr(fused, name), sub_args)))
            compiled += 1
        except EinfuseError as err:   # (a subgraph the compiler still cannot take stays in eager)
            warnings.warn(f"einfuse: subgraph {name} runs in eager: {err}", EagerFallbackWarning, stacklevel=3)
    warnings.warn(f"einfuse: {', '.join(sorted(set(unsupported)))} ran in eager; {compiled} subgraph(s) compiled "
                  "by einfuse", EagerFallbackWarning, stacklevel=3)
    return fused


def single_output(module: torch.nn.Module, run: Callable) -> Callable:
    """``run`` (which gives a tuple back), giving one output bare where ``module``'s graph
    returns one bare."""
    outputs = next(n for n in module.graph.nodes if n.op == "output").args[0]
    if isinstance(outputs, (tuple, list)):
        return run

    def first(*inputs: Any) -> Any:
        return run(*inputs)[0]
    return first


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
