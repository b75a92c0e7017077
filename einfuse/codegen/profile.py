"""Time every kernel of a compiled model on its own, at the sizes of given inputs."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import tvm

from ..ir import Cascade
from ..ir.dtypes import DTYPES
from ..ir.scope import declarations
from ..ir.kernels import Kernel
from .backends import Backend
from .lower import SizeVars


def kernel_seconds(c: Cascade, kernels: list[Kernel], backend: Backend, rank_sizes: Mapping[str, int],
                   tuning: Any = None, repeat: int = 5) -> dict[str, float]:
    """Median seconds of each kernel, rebuilt alone by ``backend`` (with its tuned schedule where
    ``tuning`` holds one) and run on random data of the model's sizes."""
    decls = declarations(c)
    rng = np.random.default_rng(0)
    device = backend.device()
    out = {}
    symbols = {str(r.size): rank_sizes[r.name] for r in c.ranks if getattr(r.size, "is_Symbol", False)}
    for k in kernels:
        sizes = SizeVars()
        func = backend.kernel_function(c, k, sizes, tuning)
        lib = tvm.compile(func, target=backend.target.tvm_target())
        args = []
        for name in list(k.inputs) + [k.output]:
            if name == k.output:   # (the sizes no tensor binds come between: SizeVars.loose)
                args += [symbols[v.name] for v in sizes.loose(c, k)]
            d = decls[name]
            shape = [rank_sizes[r.rank] + int(r.iterative) for r in d.ranks]
            data = rng.standard_normal(shape) if d.dtype.startswith(("f", "b")) and d.dtype != "bool" \
                else np.ones(shape) if d.dtype == "bool" else np.zeros(shape)  # (a mask that keeps all)
            args.append(tvm.runtime.tensor(data.astype(DTYPES[d.dtype].numpy), device))
        timer = lib.mod.time_evaluator(k.name, device, number=3, repeat=repeat)
        out[k.name] = float(timer(*args).median)
    return out
