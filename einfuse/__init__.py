"""einfuse: a compiler for PyTorch models over an extended-Einsum cascade IR.

``einfuse.compile(model, args)`` compiles a torch model and ``einfuse.load(dir)`` loads an exported
one; ``einfuse.kernels(model, args, target=..., output=DIR)`` writes its kernels' source for a target;
``einfuse.tune(model, args, trials=N)`` tunes its kernels for ``compile`` to use;
``einfuse.simulate(model, args, target="accel:fusemax")`` runs its accelerator kernels here, counting cycles;
``einfuse.compile_lm(model, max_len=N)`` compiles a causal LM's prefill and decode programs for ``generate``;
``einfuse.load_gguf(model, path)`` loads a GGUF file's weights, Q8_0/Q4_0 ones kept quantized;
``einfuse.capture(model, args)`` only captures it (all imported on first use, so that working
with ``.ein`` files loads neither torch nor TVM); ``einfuse.ir`` is the IR; ``einfuse.errors`` the errors.
"""
from typing import Any

from . import errors, ir
from .version import __version__ as __version__

__all__ = ["capture", "compile", "compile_lm", "errors", "ir", "kernels", "load", "load_gguf", "simulate", "tune"]


def __getattr__(name: str) -> Any:
    if name == "capture":
        from .frontends import capture
        return capture
    if name == "compile":
        from .api import compile
        return compile
    if name in ("kernels", "simulate", "tune"):
        from . import api
        return getattr(api, name)
    if name == "compile_lm":
        from .lm import compile_lm
        return compile_lm
    if name == "load":
        from .codegen.runtime import load
        return load
    if name == "load_gguf":
        from .frontends.prequantized import load_gguf
        return load_gguf
    raise AttributeError(f"module 'einfuse' has no attribute '{name}'")
