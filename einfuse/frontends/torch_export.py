"""Capture a PyTorch model into a cascade: ``torch.export`` (non-strict) -> core ATen -> one rule
per op (``einfuse/frontends/aten``).

Views are index renaming, weights and buffers become ``param`` tensors whose data the cascade
carries, inputs keep forward()'s argument names, outputs are ``out0, out1, ...``, and a
``torch.export.Dim`` becomes a symbolic rank size. ``scaled_dot_product_attention`` is kept whole
and translated to FuseMax's attention cascade, and LSTM and GRU layers to a loop over time.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import os
import re
import warnings
from dataclasses import replace
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import sympy
import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from ..errors import CaptureError, InputError, UnsupportedOperatorError
from ..ir import Cascade, Const, verify
from ..ir.dtypes import DTYPES
from .aten import RULES, Ctx, RuleError
from .builder import Builder, Ref, identifier
from .experts import batched_experts
from .recurrent_ops import recurrent_ops

#: the torch dtype of each IR dtype (ir.dtypes names it; a torch before 2.6 has no int4), and
#: the IR dtype of each torch dtype
TORCH_DTYPES = {name: getattr(torch, d.torch) for name, d in DTYPES.items() if hasattr(torch, d.torch)}
IR_DTYPES = {t: name for name, t in TORCH_DTYPES.items()}

#: ops kept out of the decomposition: their rules translate them whole (attention's cascade; a
#: recurrence as a loop, where the decomposition unrolls every step; export meets these two only
#: outside ``nn.LSTM``/``nn.GRU``, see .recurrent_ops)
KEPT_WHOLE = (torch.ops.aten.scaled_dot_product_attention.default, torch.ops.aten.lstm.input,
              torch.ops.aten.gru.input)

#: shorter tensor names for nodes named after long op names
SHORT_NAMES = {"native_layer_norm": "layernorm", "scaled_dot_product_attention": "attn",
               "_native_batch_norm_legit_no_training": "batchnorm", "_softmax": "softmax",
               "max_pool2d_with_indices": "maxpool", "_adaptive_avg_pool2d": "avgpool", "convolution": "conv"}

#: torch 2.13's own deprecation warning from inside ``torch.export`` (its pytree ``LeafSpec``),
#: printed on every capture although nothing the user wrote causes it: ignored, and only it.
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)

#: ops that only assert metadata: they produce nothing the cascade needs
IGNORED = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
           "aten.sym_constrain_range_for_size.default", "aten._assert_async.msg",
           "aten.sym_constrain_range.default"}


def capture(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any] | None = None,
            dynamic_shapes: Any = None, *, rank_names: Mapping[Any, str] | None = None) -> Cascade:
    """Capture ``model(*args, **kwargs)`` as a cascade.

    ``dynamic_shapes`` is passed to ``torch.export.export``; each ``Dim`` becomes a size symbol of
    that name. ``rank_names`` names ranks by size (``{64: "D", "seq": "S"}``); other ranks are
    named ``N<size>`` or after their symbol (a model may carry its own as ``einfuse_rank_names``).
    The cascade is named after the model's class (or its ``einfuse_name``). Raises :class:`~einfuse.errors.CaptureError` for bad
    arguments or a failed export, and :class:`~einfuse.errors.UnsupportedOperatorError` listing
    every op that has no rule.
    Inputs that cannot be captured (``None``, non-tensors, ``meta`` tensors, unsupported dtypes,
    empty dimensions, the wrong number of arguments) raise :class:`~einfuse.errors.InputError`;
    an op whose output shape depends on the data (``x[x > 0]``, ``nonzero``) a ``CaptureError``
    naming it and its source line. Each ``Dim``'s ``min``/``max`` travel as ``size_ranges``.
    """
    _check_arguments(model, args, kwargs)
    check_inputs(model, tuple(args), dict(kwargs or {}))
    exported = export_aten(model, tuple(args), dict(kwargs or {}), dynamic_shapes)
    dependent = data_dependent_ops(exported.graph)
    if dependent:
        raise CaptureError("\n".join(["the shape of a result depends on the values in a tensor, which a "
                                      "compiled cascade cannot follow (its shapes are fixed or Dim symbols):"]
                                     + [f"  {op} at {where}" for op, where in dependent]
                                     + ["compute with a fixed shape instead: torch.where(mask, x, 0) for x[mask]"]))
    missing = unsupported_ops(exported.graph)
    if missing:
        raise UnsupportedOperatorError(missing)
    symbols = _symbol_names(exported, dynamic_shapes)
    name = re.sub(r"\W", "_", getattr(model, "einfuse_name", type(model).__name__).lower()).strip("_") or "model"
    names = rank_names if rank_names is not None else getattr(model, "einfuse_rank_names", None)
    cascade = verify(_Translator(exported, Builder(names), symbols).run(name))
    return replace(cascade, size_ranges=_size_ranges(exported, symbols))


def _check_arguments(model: Any, args: Any, kwargs: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, (tuple, list)):
        raise CaptureError(f"capture: args must be a tuple of example inputs, got {type(args).__name__} "
                           "(write (x,) for a single input)")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise CaptureError(f"capture: kwargs must be a dict, got {type(kwargs).__name__}")


def check_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise :class:`~einfuse.errors.InputError` unless ``model.forward`` takes ``args`` and
    ``kwargs`` and every value among them (lists, tuples and dicts looked into) is a real tensor
    of a supported dtype with no empty dimension."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise InputError(f"{type(model).__name__}.forward cannot take these arguments: {exc}") from None
    for name, value in bound.arguments.items():
        leaves, _ = torch.utils._pytree.tree_flatten(value)
        if value is None:
            raise InputError(f"input '{name}' is None; leave an optional input out (pass the others by "
                             "keyword) or give a tensor")
        for leaf in leaves:
            problem = input_problem(leaf)
            if problem:
                raise InputError(f"input '{name}' {problem}")


def input_problem(x: Any) -> str | None:
    """Why ``x`` cannot be a model input (None when it can): the end of ``"input 'x' ..."``."""
    if not isinstance(x, torch.Tensor):
        kind = type(x).__name__ if type(x).__module__ == "builtins" else f"{type(x).__module__}.{type(x).__name__}"
        hint = " (torch.from_numpy(x) makes it one)" if isinstance(x, np.ndarray) else ""
        return f"is of type {kind}; einfuse takes tensor inputs only{hint}"
    if x.is_meta:
        return f"is a meta tensor {tuple(x.shape)} (it has no data); give a tensor with values"
    if x.layout != torch.strided:
        return f"has layout {x.layout}; give a dense tensor (x.to_dense())"
    if x.dtype not in IR_DTYPES:
        return f"has dtype {x.dtype}; supported: {', '.join(str(t) for t in IR_DTYPES)}"
    if 0 in x.shape:
        return f"has an empty dimension {tuple(x.shape)}; every size must be at least 1"
    return None


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Ignore :data:`LEAFSPEC_WARNING` here too (a test or a ``-W`` option may have reset the
    filter set at import), and export's note that an RNN module sets its ``_flat_weights`` (its
    parameters, which capture reads as such)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights", category=UserWarning)
        yield


def export_aten(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> torch.export.ExportedProgram:
    """``model`` exported by ``torch.export`` and decomposed to the ATen operators capture translates."""
    with _quiet_torch(), batched_experts(model), recurrent_ops():
        try:
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # torch.export raises many unrelated types; all mean "could not export"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptureError(f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
                               f"{first}") from exc
        table = torch.export.default_decompositions()
        for kept in KEPT_WHOLE:
            table.pop(kept, None)
        return exported.run_decompositions(table)


def data_dependent_ops(graph: torch.fx.Graph) -> list[tuple[str, str]]:
    """Every call whose result has a size (or is a number) known only from the data, an
    *unbacked* symbol it does not read from its arguments, with its source location."""
    out = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        read = set().union(*(free_unbacked_symbols(a.meta.get("val")) for a in node.all_input_nodes))
        if free_unbacked_symbols(node.meta.get("val")) - read:
            out.append((str(node.target), source_location(node, code=True)))
    return out


def unsupported_ops(graph: torch.fx.Graph) -> list[tuple[str, str]]:
    """Every call in ``graph`` with no rule, with its source location, in graph order."""
    out = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem or _is_size(node):
            continue
        op = str(node.target)
        if op not in RULES and op not in IGNORED:
            out.append((op, source_location(node, code=True)))
    return out


def _is_size(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def source_location(node: torch.fx.Node, code: bool = False) -> str:
    """``file.py:LINE`` of the user code that made ``node`` (with the line's text if ``code``): the
    innermost frame outside torch itself (a model's own line, not ``torch/nn/functional.py``)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return f"node {node.name} (no source location)"
    torch_dir = os.path.dirname(torch.__file__)
    path, line, fn, text = next((f for f in reversed(frames) if not f[0].startswith(torch_dir)), frames[-1])
    if not code:
        return f"{os.path.basename(path)}:{line}"
    return f"{path}:{line} in {fn}: {text.strip()}"


def named_dynamic(name: str, min: int | None = None, max: int | None = None) -> Any:
    """A ``Dim.DYNAMIC`` hint whose size symbol is called ``name``: like ``Dim(name)``, but where
    one size reaches several inputs (a KV cache's length in every layer) torch.export neither
    demands it prove each guard for the whole range (GQA's ``repeat_kv`` makes one it cannot,
    ``Min(16 + 16 L, 32 + 32 L) == 16 + 16 L``) nor keeps the inputs' symbols apart after capture."""
    hint = torch.export.Dim.DYNAMIC(min=min, max=max)
    hint.__name__ = name
    return hint


def _symbol_names(exported: torch.export.ExportedProgram, dynamic_shapes: Any) -> dict[sympy.Symbol, sympy.Symbol]:
    """torch's shape symbols (``s70``) -> size symbols named after the ``Dim`` (``seq``)."""
    user = [s.arg.name for s in exported.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    specs = dict(zip(user, dynamic_shapes)) if isinstance(dynamic_shapes, (tuple, list)) else dict(dynamic_shapes or {})
    nodes = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    for arg, spec in list(specs.items()):   # (``*args``' specs, one per tensor: placeholders arg_0, arg_1, ...)
        if arg not in nodes and isinstance(spec, (tuple, list)) and all(isinstance(s, Mapping) for s in spec):
            specs.update({f"{arg}_{i}": s for i, s in enumerate(spec)})
    names: dict[sympy.Symbol, sympy.Symbol] = {}
    for arg, spec in specs.items():
        dims = spec.items() if isinstance(spec, Mapping) else enumerate(spec or ())
        val = nodes[arg].meta.get("val") if arg in nodes else None
        for d, dim in dims:
            size = val.shape[d] if val is not None else None
            if isinstance(size, torch.SymInt) and getattr(dim, "__name__", None) and size.node.expr.is_Symbol:
                names[size.node.expr] = sympy.Symbol(dim.__name__, integer=True, positive=True)
    return names


def _size_ranges(exported: torch.export.ExportedProgram,
                 symbols: dict[sympy.Symbol, sympy.Symbol]) -> dict[str, tuple[int, int | None]]:
    """Each size symbol's ``(least, greatest)`` (None: unbounded) from the export's constraints."""
    ranges = {}
    for symbol, bounds in exported.range_constraints.items():
        name = symbols.get(symbol)
        if name is not None:
            hi = int(bounds.upper) if bounds.upper.is_Integer else None
            ranges[str(name)] = (max(int(bounds.lower), 1), hi)
    return ranges


class _Translator:
    """Walks the exported graph in order, keeping each node's value (a Ref, a size or a tuple)."""

    def __init__(self, exported: torch.export.ExportedProgram, builder: Builder,
                 symbols: dict[sympy.Symbol, sympy.Symbol]) -> None:
        self.ep, self.b, self.symbols = exported, builder, symbols
        self.env: dict[str, Any] = {}

    def run(self, name: str) -> Cascade:
        for node in self.ep.graph.nodes:
            self.b.provenance = source_location(node) if node.op == "call_function" and node.meta.get("stack_trace") else None
            if node.op == "placeholder":
                self.env[node.name] = self.placeholder(node)
            elif node.op == "call_function":
                self.env[node.name] = self.call(node)
            elif node.op == "output":
                self.outputs(node)
        return self.b.cascade(name)

    # ---- graph values -------------------------------------------------------------------------

    def size(self, d: Any) -> sympy.Expr:
        if isinstance(d, torch.SymInt):
            node = d.node   # (replacements solved after tracing, e.g. the symbols Dim.DYNAMIC made equal)
            return sympy.sympify(node.shape_env.replace(node.expr)).xreplace(self.symbols)
        return sympy.Integer(int(d))

    def scalar(self, node: torch.fx.Node, val: Any) -> Any:
        """A scalar the graph computes: a size (sympy), or a float or bool, which must not depend
        on a symbolic size (its value at the example, a rule's constant, would be wrong at the
        next size: ``math.sqrt(x.shape[-1])``)."""
        if isinstance(val, (int, torch.SymInt)):
            return self.size(val)
        if isinstance(val, (torch.SymFloat, torch.SymBool)):
            expr = val.node.shape_env.replace(val.node.expr)
            if expr.free_symbols:
                kind = "float" if isinstance(val, torch.SymFloat) else "bool"
                op = getattr(node.target, "__name__", str(node.target))
                raise UnsupportedOperatorError([(op, f"{source_location(node, code=True)}\n    not supported: "
                                                 f"a {kind} computed from a symbolic size ({expr}); make that size static")])
            return float(expr) if isinstance(val, torch.SymFloat) else bool(expr)
        return val

    def shape_of(self, val: Any) -> Any:
        if isinstance(val, torch.Tensor):
            return tuple(self.size(d) for d in val.shape)
        if isinstance(val, (tuple, list)):
            return [self.shape_of(v) for v in val]
        return None

    def dtype_of(self, val: Any) -> Any:
        if isinstance(val, torch.Tensor):
            if val.dtype not in IR_DTYPES:
                raise CaptureError(f"tensors of dtype {val.dtype} are not supported")
            return IR_DTYPES[val.dtype]
        if isinstance(val, (tuple, list)):
            return [self.dtype_of(v) for v in val]
        return None

    def resolve(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self.resolve(x) for x in a)
        if isinstance(a, torch.dtype):
            return IR_DTYPES.get(a, str(a))
        if isinstance(a, torch.SymInt):
            return self.size(a)
        return a

    # ---- nodes -------------------------------------------------------------------------------------

    def placeholder(self, node: torch.fx.Node) -> Ref:
        spec = next(s for s in self.ep.graph_signature.input_specs if s.arg.name == node.name)
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise CaptureError(f"input '{node.name}' is a {type(val).__name__}; only tensor inputs are supported")
        shape, dtype = self.shape_of(val), self.dtype_of(val)
        if spec.kind.name == "USER_INPUT":
            return self.b.declare(self.b.name(node.name), shape, "input", dtype)
        data = self.ep.state_dict.get(spec.target)
        if data is None:
            data = self.ep.constants[spec.target]
        if data.numel() == 0:   # (an empty constant, such as a KV cache's start: its readers drop it, as cat does)
            return Ref(Const(0.0), shape, dtype)
        keys = [s.target for s in self.ep.graph_signature.input_specs if s.target]
        name = self.b.name(param_name(spec.target, keys))
        self.b.params[name] = data.detach().to(torch.float64 if data.is_floating_point() else torch.int64).numpy()
        return self.b.declare(name, shape, "param", dtype)

    def call(self, node: torch.fx.Node) -> Any:
        if node.target is operator.getitem:
            return self.resolve(node.args[0])[node.args[1]]
        val = node.meta.get("val")
        if _is_size(node):
            return self.scalar(node, val)
        op = str(node.target)
        if op in IGNORED:
            return None
        name = next((node.name.replace(k, v, 1) for k, v in SHORT_NAMES.items() if node.name.startswith(k)), node.name)
        ctx = Ctx(self.b, op, name, list(self.resolve(node.args)), self.resolve(dict(node.kwargs)),
                  self.shape_of(val), self.dtype_of(val))
        try:
            return RULES[op](ctx)
        except RuleError as exc:
            raise UnsupportedOperatorError([(op, f"{source_location(node, code=True)}\n    not supported: {exc}")]) from None

    def outputs(self, node: torch.fx.Node) -> None:
        user = [s for s in self.ep.graph_signature.output_specs if s.kind.name == "USER_OUTPUT"]
        values = dict(zip([s.arg.name for s in self.ep.graph_signature.output_specs], node.args[0]))
        for i, spec in enumerate(user):
            ref = self.resolve(values[spec.arg.name])
            if not isinstance(ref, Ref):
                raise CaptureError(f"output {i} is a {type(ref).__name__}; only tensor outputs are supported")
            self.b.provenance = None
            self.b.emit(f"out{i}", ref.shape, ref.dtype, lambda o, _, r=ref: r.at(o), role="output",
                        name=self.b.name(f"out{i}"))


def param_name(target: str, keys: Iterable[str]) -> str:
    """The tensor name of the parameter or buffer ``target`` of a model whose parameters and buffers
    are ``keys``: its state-dict key, without the ``model.`` that wraps every key of a wrapped
    model (``model.h.0.attn.c_attn.weight`` -> ``h_0_attn_c_attn_weight``), as an identifier
    (``0.weight`` -> ``t0_weight``); capture adds ``_2`` to a name already taken."""
    if all(k.startswith("model.") for k in keys):
        target = target[len("model."):]
    return identifier(target.replace(".", "_"))
