"""``einfuse.compile``: frontend -> passes -> codegen, nothing else."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import CompileError, EinfuseError
from .ir import Cascade, to_text, verify

PIPELINES = ("default", "none")


def compile(model: Any, args: tuple | None = None, *, target: str = "cpu", pipeline: str = "default",
            dynamic_shapes: Any = None, cache_dir: str | Path | None = None) -> Any:
    """Compile a torch model (with example ``args``) or a :class:`~einfuse.ir.Cascade` for ``target``.

    Returns a :class:`~einfuse.codegen.runtime.CompiledModel`. A compiled library is cached under
    ``cache_dir`` (default ``$EINFUSE_CACHE`` or ``~/.cache/einfuse``), keyed by the cascade, its
    weights, the target, the versions and the code generator's source, so compiling the same
    model again only loads it.
    """
    if pipeline not in PIPELINES:
        raise EinfuseError(f"unknown pipeline '{pipeline}'; available: {', '.join(PIPELINES)}")
    if isinstance(model, Cascade):
        cascade = verify(model)
    else:
        if args is None:
            raise EinfuseError("compile: a torch model needs example args, e.g. einfuse.compile(model, (x,))")
        from .frontends import capture
        cascade = capture(model, args, dynamic_shapes=dynamic_shapes)
    return _compile_cascade(cascade, target, Path(cache_dir) if cache_dir else default_cache_dir())


def default_cache_dir() -> Path:
    """Where compiled models are cached."""
    return Path(os.environ.get("EINFUSE_CACHE", Path.home() / ".cache" / "einfuse"))


def _compile_cascade(cascade: Cascade, target_name: str, cache: Path) -> Any:
    from .codegen.layout import transpose_weights
    from .codegen.runtime import load
    from .targets import Target
    target = Target.parse(target_name)
    cascade = transpose_weights(cascade)
    entry = cache / _cache_key(cascade, target)
    if (entry / "model.so").is_file():
        try:
            return load(entry)
        except Exception:  # a damaged cache entry is removed and rebuilt, never trusted
            shutil.rmtree(entry, ignore_errors=True)
    model = build(cascade, target)
    model.export(entry)
    return model


def build(cascade: Cascade, target: Any) -> Any:
    """Lower, schedule and compile ``cascade``; errors name the kernel and leave a reproducer."""
    import tvm

    from .codegen.fusion import group_kernels
    from .codegen.graph import build_graph
    from .codegen.lower import KernelBuilder
    from .codegen.runtime import CompiledModel
    from .codegen.schedules.cpu import schedule
    start = time.perf_counter()
    kernels = group_kernels(cascade)
    scheduled: list[str] = []

    def lower(kernel: Any, sizes: Any) -> Any:
        try:
            out = schedule(KernelBuilder(cascade, kernel, sizes).prim_func(), kernel, target)
        except Exception as exc:  # TVM raises its own error types; each becomes a CompileError
            raise CompileError(f"kernel {kernel.name}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1]}",
                               reproducer(cascade, kernel)) from exc
        scheduled.append(out.script())
        return out
    try:
        graph = build_graph(cascade, kernels, lower)
        executable = tvm.compile(graph.module, target=target.tvm_target())
    except CompileError:
        raise
    except Exception as exc:
        raise CompileError(f"TVM could not compile the model: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[-1]}", reproducer(cascade, None)) from exc
    return CompiledModel(cascade, executable, kernels, target.name, time.perf_counter() - start,
                         {"tir": "\n\n".join(scheduled)})


def reproducer(cascade: Cascade, kernel: Any) -> str:
    """Write the cascade (naming the failing kernel's Einsums) to a file; return its path."""
    from .ir.text import einsum_text
    header = ""
    if kernel is not None:
        lines = [einsum_text(e) for e in kernel.writes]
        header = f"# einfuse could not compile kernel {kernel.name}, which computes:\n" + \
            "".join(f"#   {line}\n" for line in lines)
    fd, path = tempfile.mkstemp(prefix=f"einfuse_repro_{kernel.name if kernel else 'model'}_", suffix=".ein")
    with os.fdopen(fd, "w") as f:
        f.write(header + to_text(cascade))
    return path


def _cache_key(cascade: Cascade, target: Any) -> str:
    import numpy as np
    import tvm

    from . import __version__
    digest = hashlib.sha256()
    for part in (to_text(cascade), repr(sorted(target.tvm.items())), tvm.__version__, __version__):
        digest.update(part.encode())
    for source in sorted((Path(__file__).parent / "codegen").rglob("*.py")):  # a changed compiler recompiles
        digest.update(source.read_bytes())
    for name in sorted(cascade.params):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(cascade.params[name]).tobytes())
    return digest.hexdigest()[:24]
