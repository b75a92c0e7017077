"""Code generation: cascades -> TE/TIR kernels -> one Relax module -> ``tvm.compile``.

TVM is imported only here and in ``einfuse/targets`` (DESIGN.md).
"""
