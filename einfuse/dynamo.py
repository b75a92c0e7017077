"""``torch.compile(model, backend="einfuse")``: einfuse as a TorchDynamo backend, with eager
fallback for the operators einfuse has no rule for (issue 23, a first part).

Dynamo hands the backend each FX graph it captured (graph breaks give several) with example
inputs, the module's parameters among them. The backend makes the parameters constants of the
graph (so the weights are transposed, packed and folded at compile time, as ``einfuse.compile``
does them, and not copied in on every call), exports the graph to ATen operators
(``torch.export``) and compiles it
whole when every operator has a rule; otherwise each maximal subgraph of supported operators is
compiled and the rest runs in eager (:mod:`einfuse.frontends.partition`, one warning per graph).
``options`` of ``torch.compile`` pass through to :func:`einfuse.compile` (``target``,
``pipeline``, ``quantize``). A graph with symbolic sizes (dynamo's dynamic shapes) is compiled
once for every size where ``torch.export`` keeps them symbolic, else once per input shape (up to
8, then in eager); one that needs gradients runs in eager, with a warning saying why. The entry point
(``torch_dynamo_backends``) registers the name on ``pip install``.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Sequence

import torch

from .errors import CaptureError, EinfuseError, UnsupportedOperatorError
from .frontends.partition import EagerFallbackWarning, partitioned
from .frontends.recurrent_ops import rnn_calls_as_ops

OPTIONS = ("target", "pipeline", "quantize")
__all__ = ["EagerFallbackWarning", "backend"]


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
    gm = rnn_calls_as_ops(torch.fx.GraphModule(gm, copy.deepcopy(gm.graph)))   # (dynamo keeps its own: it calls with its inputs)
    gm, kept = _parameters_as_constants(_literals_as_buffers(gm), example_inputs)
    gm, kept = _sizes_read_from_tensors(gm, example_inputs, kept)
    run = _compiled(gm, tuple(example_inputs[i] for i in kept), options)
    return run if len(kept) == len(example_inputs) else lambda *inputs: run(*(inputs[i] for i in kept))


def _compiled(gm: torch.fx.GraphModule, args: tuple, options: dict) -> Callable:
    """``gm`` compiled whole, or in parts where operators have no rule; with symbolic sizes that
    ``torch.export`` cannot keep (or that the parts do not take), compiled once per input shape."""
    dynamic = _dynamic_shapes(gm)
    if dynamic is None:
        return _compiled_for(gm, args, options, None)
    try:
        return _compiled_for(gm, args, options, dynamic)
    except (CaptureError, UnsupportedOperatorError) as exc:
        warnings.warn(f"einfuse: this graph is compiled for each input shape: its sizes are symbolic and "
                      f"{exc}".splitlines()[0], EagerFallbackWarning, stacklevel=3)
        return PerShape(gm, options)


def _compiled_for(gm: torch.fx.GraphModule, args: tuple, options: dict, dynamic: tuple | None) -> Callable:
    """``gm`` exported for ``args`` (``dynamic``: the symbolic dimensions) and compiled; with
    static sizes, in parts where operators have no rule."""
    from .api import compiled_graph
    from .frontends.torch_export import export_aten
    with torch._guards.tracing(None):   # (not dynamo's frame: export's shape guards would name it)
        try:
            exported = export_aten(gm, args, {}, dynamic).module()   # (ATen, as capture reads it)
            return compiled_graph(exported, args, dynamic_shapes=dynamic, **options)
        except UnsupportedOperatorError as exc:
            if dynamic is not None:
                raise
            return partitioned(exported, args, lambda m, a: compiled_graph(m, a, **options),
                               [op for op, _ in exc.ops]).forward


class PerShape:
    """A graph compiled for each distinct shape of its inputs, as a recompile would: up to
    ``LIMIT`` shapes (dynamo's own recompile limit), then in eager with a warning."""

    LIMIT = 8

    def __init__(self, gm: torch.fx.GraphModule, options: dict) -> None:
        self.gm, self.options = gm, options
        self.compiled: dict[tuple, Callable] = {}

    def __call__(self, *inputs: Any) -> Any:
        key = tuple(tuple(x.shape) for x in inputs)
        run = self.compiled.get(key)
        if run is None and len(self.compiled) >= self.LIMIT:
            warnings.warn(f"einfuse: {self.LIMIT} input shapes compiled for this graph; new ones run in eager",
                          EagerFallbackWarning, stacklevel=2)
            run = self.compiled[key] = self.gm.forward
        elif run is None:
            fresh = tuple(x.detach() for x in inputs)   # (without the dynamic marks dynamo left on them)
            run = self.compiled[key] = _compiled_for(self.gm, fresh, self.options, None)
        return run(*inputs)


def _sizes_read_from_tensors(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                             kept: list[int]) -> tuple[torch.fx.GraphModule, list[int]]:
    """``gm`` with each size input (a ``SymInt``: dynamo's dynamic shapes pass the symbols too)
    read from a tensor input that has it as a dimension (``aten.sym_size``), and dropped from the
    inputs; the positions of the inputs left (:func:`_eager_reason` made sure a tensor has it)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = [n for n in placeholders if isinstance(n.meta.get("example_value"), torch.Tensor)]
    left = []
    for i, node in zip(kept, placeholders):
        if not isinstance(example_inputs[i], torch.SymInt):
            left.append(i)
            continue
        holder, dim = next((n, d) for n in tensors for d, s in enumerate(n.meta["example_value"].shape)
                           if str(s) == str(node.meta["example_value"]))
        with gm.graph.inserting_after(tensors[-1]):
            size = gm.graph.call_function(torch.ops.aten.sym_size.int, (holder, dim))
        node.replace_all_uses_with(size)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, left


def _dynamic_shapes(gm: torch.fx.GraphModule) -> tuple | None:
    """The inputs' free symbolic dimensions (not fixed by dynamo's guards: a Linear's width) as
    ``torch.export`` hints, one name per symbol (dynamo's ``s33``); None where all are static."""
    from .frontends.torch_export import named_dynamic
    shapes = [n.meta["example_value"].shape for n in gm.graph.nodes if n.op == "placeholder"]
    spec = tuple({d: named_dynamic(str(s)) for d, s in enumerate(shape) if isinstance(s, torch.SymInt)
                  and not s.node.shape_env.replace(s.node.expr).is_number} for shape in shapes)
    return spec if any(spec) else None


def _parameters_as_constants(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[torch.fx.GraphModule, list[int]]:
    """``gm`` with each input that is a module's parameter (dynamo passes them as inputs) made a
    buffer of the graph, so that einfuse reads it as a weight (transposed, packed, quantized at
    compile time, as ``einfuse.compile`` does: later changes to it are not seen); the positions
    of the inputs left."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kept = []
    for i, (node, x) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(x, torch.nn.Parameter):
            kept.append(i)
            continue
        gm.register_buffer(f"_einfuse_parameter_{i}", x.detach())
        with gm.graph.inserting_before(node):
            node.replace_all_uses_with(gm.graph.get_attr(f"_einfuse_parameter_{i}"))
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, kept


def _literals_as_buffers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with each ``torch.tensor(<literal>)`` call (an empty KV cache's start, say) a buffer:
    ``torch.export`` traces with fake tensors and cannot run it."""
    for i, node in enumerate([n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.tensor
                              and not any(isinstance(a, torch.fx.Node) for a in (*n.args, *n.kwargs.values()))]):
        gm.register_buffer(f"_einfuse_literal_{i}", torch.tensor(*node.args, **node.kwargs))
        with gm.graph.inserting_before(node):
            node.replace_all_uses_with(gm.graph.get_attr(f"_einfuse_literal_{i}"))
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _eager_reason(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> str:
    """Why ``gm`` cannot be compiled at all, or ``""``."""
    if any(not isinstance(x, (torch.Tensor, torch.SymInt)) for x in example_inputs):
        return "inputs other than tensors and sizes"
    dims = {str(s) for n in gm.graph.nodes if n.op == "placeholder"
            and isinstance(n.meta.get("example_value"), torch.Tensor) for s in n.meta["example_value"].shape}
    if any(isinstance(x, torch.SymInt) and str(x) not in dims for x in example_inputs):
        return "a size input that no tensor input has as a dimension"
    if torch.is_grad_enabled() and any(x.requires_grad for x in [*example_inputs, *gm.parameters()]):
        return "it needs gradients (einfuse compiles inference; run under torch.no_grad())"
    return ""
