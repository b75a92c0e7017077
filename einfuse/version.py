"""einfuse's version: one place, below every layer (the package root imports the compiler)."""
__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """The versions a compiled library depends on (imports TVM and torch)."""
    import torch
    import tvm
    return {"einfuse": __version__, "tvm": tvm.__version__, "torch": torch.__version__}
