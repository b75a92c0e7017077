"""Schedules for a CUDA target: TVM's dlight GPU rules (TVM_0.27_NOTES.md §5).

GEMM, GEMV, reduction and general-reduction rules, then the fallback (one thread per output
point); where a rule's analysis fails on a kernel (top-k's ranks), the fallback alone. The
1-pass attention is not scheduled here: :mod:`einfuse.codegen.loop_gpu` builds it bound already.
"""
from __future__ import annotations

from typing import Any

from ...targets import Target


def schedule(func: Any, name: str, target: Target) -> Any:
    """``func`` scheduled for the GPU ``target`` by the first rule set whose analysis accepts it."""
    import tvm
    from tvm.s_tir import dlight as dl
    rules = [(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
             (dl.gpu.Fallback(),)]
    for n, chosen in enumerate(rules):
        try:
            with target.tvm_target():
                return dl.ApplyDefaultSchedule(*chosen)(tvm.IRModule({name: func}))[name]
        except (AssertionError, ValueError):   # (an analysis that does not hold: the next rule set)
            if n == len(rules) - 1:
                raise
    raise AssertionError("unreachable")
