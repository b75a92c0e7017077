"""Build a grouped cascade into one executable: each kernel lowered and scheduled by the
target's backend, the Relax graph calling them, ``tvm.compile``; the compile cache's key.

Errors from TVM become a :class:`~einfuse.errors.CompileError` naming the kernel, with a
reproducer file holding the cascade text.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from ..errors import CompileError
from ..ir import Cascade, to_text
from ..ir.kernels import kernels_of
from .graph import build_graph

TUNED = "einfuse.tuned"   # (the attribute of a kernel scheduled from a tuning record)


def compile_executable(cascade: Cascade, backend: Any, tuning: Any = None) -> tuple[Any, list, str, list[str]]:
    """(TVM's executable, the kernels, their scheduled TIR, the names of the tuned ones), each
    kernel lowered and scheduled by ``backend`` (:mod:`.backends`); errors name the kernel and
    leave a reproducer. For a GPU no device is needed: the executable holds the CUDA source."""
    kernels = kernels_of(cascade)
    scheduled: list[str] = []
    tuned: list[str] = []

    def lower(kernel: Any, sizes: Any) -> Any:
        try:
            out = backend.kernel_function(cascade, kernel, sizes, tuning)
        except Exception as exc:  # TVM raises its own error types; each becomes a CompileError
            raise kernel_error(exc, cascade, kernel) from exc
        scheduled.append(out.script())
        if out.attrs is not None and TUNED in out.attrs:
            tuned.append(kernel.name)
        return out
    try:
        graph = build_graph(cascade, kernels, lower)
    except CompileError:
        raise
    except Exception as exc:
        raise _model_error(exc, cascade) from exc
    try:
        executable = tvm.compile(graph.module, target=backend.target.tvm_target())
    except Exception as exc:
        culprit = _failing_kernel(graph.module, kernels, backend)
        raise (kernel_error(exc, cascade, culprit, backend.target) if culprit else _model_error(exc, cascade)) from exc
    return executable, kernels, "\n\n".join(scheduled), tuned


def _model_error(exc: Exception, cascade: Cascade) -> CompileError:
    return CompileError(f"TVM could not compile the model: {type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[-1]}", reproducer(cascade, None))


def _failing_kernel(module: Any, kernels: list, backend: Any) -> Any:
    """The first of ``kernels`` whose function in ``module`` does not compile by itself, or None
    (the model failed elsewhere: its graph)."""
    functions = {gv.name_hint: f for gv, f in module.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    for kernel in kernels:
        func = functions.get(kernel.name)
        if func is None:
            continue
        try:
            backend.compiled_alone(func, kernel.name)
        except Exception:   # (TVM's own error types: this is the kernel)
            return kernel
    return None


def kernel_error(exc: Exception, cascade: Cascade, kernel: Any, target: Any = None) -> CompileError:
    """``exc`` (raised building ``kernel``) as a CompileError naming the kernel, with a reproducer."""
    last = (str(exc).strip().splitlines() or [""])[-1]
    where = f"kernel {kernel.name}" + (f" ({kernel.kind or 'single'}) for {target.name}" if target is not None else "")
    return CompileError(f"{where}: {type(exc).__name__}: {last}", reproducer(cascade, kernel))


def reproducer(cascade: Cascade, kernel: Any) -> str:
    """Write the cascade (naming the failing kernel's Einsums) to a file; return its path."""
    from ..ir.text import einsum_text
    header = ""
    if kernel is not None:
        lines = [einsum_text(e) for e in kernel.writes]
        header = f"# einfuse could not compile kernel {kernel.name}, which computes:\n" + \
            "".join(f"#   {line}\n" for line in lines)
    fd, path = tempfile.mkstemp(prefix=f"einfuse_repro_{kernel.name if kernel else 'model'}_", suffix=".ein")
    with os.fdopen(fd, "w") as f:
        f.write(header + to_text(cascade))
    return path


def cache_key(cascade: Cascade, target: Any, tuning: Any = None) -> str:
    """A digest of everything a compiled library depends on: the cascade, its weights, the target,
    the versions (:func:`~einfuse.codegen.persist.versions`), the tuning records and the code
    generator's own source (a changed compiler recompiles)."""
    from ..version import versions
    digest = hashlib.sha256()
    records = tuning.digest() if tuning is not None else ""
    for part in (to_text(cascade), repr(sorted(cascade.size_ranges.items())), repr(sorted(target.tvm.items())),
                 target.tiles, f"{target.vector_bytes}x{target.registers}", repr(sorted(versions().items())),
                 records):
        digest.update(part.encode())
    for source in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    for name in sorted(cascade.params):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(cascade.params[name]).tobytes())
    return digest.hexdigest()[:24]
