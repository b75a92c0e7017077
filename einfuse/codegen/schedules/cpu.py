"""Rule-based CPU schedules, chosen per kernel kind, with sizes from the target.

* every block but the kernel's output block is inlined (the fused element-wise producers), unless
  the kernel gathers (nested data-dependent selects make TVM's simplifier take minutes);
* **contraction** (a reduction over a product of reads, one of which ignores the innermost output
  dimension: GEMM, batched GEMM, convolution, attention's QK and AV): a register tile of
  ``MR`` rows x ``NR`` lanes accumulated in a local buffer (so in vector registers), the reduction
  inside, parallel outer loops (TVM_0.27_NOTES.md §2);
* **reduction** (row sums, maxima): parallel over the output points, the reduction serial inside;
* **element-wise**: the innermost loop split by the vector width and vectorized (unless the
  kernel gathers), the rest fused and parallel (fusing everything would put ``//`` and ``%`` by symbolic sizes in every index,
  which LLVM takes minutes over).
"""
from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx

from ...targets import Target
from ..fusion import Kernel

MR = 4  # register-tile rows


def schedule(func: tirx.PrimFunc, kernel: Kernel, target: Target) -> tirx.PrimFunc:
    """``func`` scheduled for ``target``; the unscheduled function if a rule does not apply."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for b in blocks[:-1]:
        if not _is_reduction(sch, b) and not kernel.gathers:  # inlined gathers: TVM takes minutes
            sch.compute_inline(b)
    out = sch.get_child_blocks(sch.get_sblock("root"))
    for b in out:
        if _is_reduction(sch, b) and _contraction(sch, b):
            _contraction_schedule(sch, b, target)
        elif _is_reduction(sch, b):
            _reduction_schedule(sch, b, target)
        else:
            _elementwise_schedule(sch, b, target, vectorize=not kernel.gathers)
    return sch.mod["main"].with_attr("global_symbol", kernel.name)


def _is_reduction(sch: s_tir.Schedule, block: Any) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _contraction(sch: s_tir.Schedule, block: Any) -> bool:
    """A product of reads of which one ignores the innermost output variable."""
    blk = sch.get(block)
    spatial = [iv.var for iv in blk.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    if len(spatial) < 2 or len(blk.reads) < 2:
        return False
    return not all(uses_var(r, spatial[-1]) for r in blk.reads)


def uses_var(region: Any, var: Any) -> bool:
    """Whether a buffer region's indices mention ``var``."""
    return any(v.same_as(var) for rng in region.region for v in tirx.analysis.undefined_vars(rng.min, []))


def _contraction_schedule(sch: s_tir.Schedule, block: Any, target: Target) -> None:
    loops = sch.get_loops(block)
    blk = sch.get(block)
    kinds = [iv.iter_type for iv in blk.iter_vars]
    spatial = [lp for lp, k in zip(loops, kinds) if k == tirx.IterVar.DataPar]
    reduce = [lp for lp, k in zip(loops, kinds) if k == tirx.IterVar.CommReduce]
    nr = target.vector_lanes * (4 if target.registers >= 32 else 2)
    streamed = [i for i, r in enumerate(blk.reads) if uses_var(r, blk.iter_vars[len(spatial) - 1].var)]
    local = sch.cache_write(block, 0, "local")
    i0, i1 = sch.split(spatial[-2], [None, MR])
    j0, j1 = sch.split(spatial[-1], [None, nr])
    outer = spatial[:-2]
    sch.reorder(*outer, j0, i0, *reduce, i1, j1)
    if len(streamed) == 1:  # pack the reduction x NR panel it streams, once per j0, reused by every i0
        packed = sch.cache_read(block, streamed[0], "global")
        sch.compute_at(packed, j0)
        sch.vectorize(sch.get_loops(packed)[-1])
    sch.reverse_compute_at(local, i0)
    sch.vectorize(sch.get_loops(local)[-1])
    sch.unroll(i1)
    sch.vectorize(j1)
    sch.parallel(sch.fuse(*outer, j0) if outer else j0)
    init = sch.decompose_reduction(block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])


def _reduction_schedule(sch: s_tir.Schedule, block: Any, target: Target) -> None:
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    spatial = [lp for lp, k in zip(loops, kinds) if k == tirx.IterVar.DataPar]
    if spatial:
        sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])


def _elementwise_schedule(sch: s_tir.Schedule, block: Any, target: Target, vectorize: bool) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    if not vectorize:  # data-dependent loads do not vectorize, and LLVM takes minutes trying
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
        return
    outer, inner = sch.split(loops[-1], [None, target.vector_lanes])
    sch.parallel(sch.fuse(*loops[:-1], outer) if len(loops) > 1 else outer)
    sch.vectorize(inner)
