"""The whole cascade as one Relax module: a ``call_tir`` per kernel, weights as constants,
intermediates allocated and reused by the VM's memory planner."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from tvm import relax

from ..ir import Cascade
from ..ir.dtypes import DTYPES
from ..ir.scope import declarations
from ..ir.kernels import Kernel
from .lower import SizeVars


@dataclass
class Graph:
    """A Relax IRModule and what the runtime needs to call it."""

    module: object
    inputs: list[str]
    outputs: list[str]
    kernels: list[Kernel]


def build_graph(c: Cascade, kernels: list[Kernel], make: Callable[[Kernel, SizeVars], object]) -> Graph:
    """Wire the kernels (``make(kernel, sizes)`` returns each one's scheduled PrimFunc) in Relax."""
    decls = declarations(c)
    sizes = SizeVars()
    rank_size = {r.name: r.size for r in c.ranks}

    def tensor_type(name: str) -> relax.TensorType:
        d = decls[name]
        return relax.TensorType([sizes.expr(rank_size[r.rank] + int(r.iterative)) for r in d.ranks], DTYPES[d.dtype].tvm)

    bb = relax.BlockBuilder()
    functions = {}
    for k in kernels:
        functions[k.name] = bb.add_func(make(k, sizes), k.name)
    inputs = [t.name for t in c.tensors if t.role == "input"]
    outputs = [t.name for t in c.tensors if t.role == "output"]
    params = {t.name: relax.Var(t.name, tensor_type(t.name)) for t in c.tensors if t.role == "input"}
    with bb.function("main", list(params.values())):
        with bb.dataflow():
            values: dict[str, object] = dict(params)
            for t in c.tensors:
                if t.role == "param":
                    data = np.asarray(c.params[t.name]).astype(DTYPES[t.dtype].numpy)
                    values[t.name] = relax.const(data, DTYPES[t.dtype].tvm)
            for k in kernels:
                args = [values[name] for name in k.inputs] + [relax.prim_value(v) for v in sizes.loose(c, k)]
                values[k.output] = bb.emit(relax.call_tir(functions[k.name], args, tensor_type(k.output)))
            # (one result alone: reading an item of a returned tuple costs 1.8 us a call)
            result = bb.emit_output(values[outputs[0]] if len(outputs) == 1 else relax.Tuple([values[o] for o in outputs]))
        bb.emit_func_output(result)
    return Graph(bb.finalize(), inputs, outputs, kernels)
