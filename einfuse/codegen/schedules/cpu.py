"""Rule-based CPU schedules, chosen per kernel kind, with sizes from the target.

The rules are dlight-style: :data:`RULES` maps each kernel kind (``ir.kernels.KINDS``; a loop
kind, built as TIR already, has none) to a list of rules, each taking ``(sch, blocks, kernel,
target)`` and returning the schedule, or None where it does not apply; the first that applies
wins. A single kernel's rule applies the block rules (contraction, row reduction, element-wise)
to each of its blocks in turn.

* every block but the kernel's output block and its stages is inlined (the fused element-wise
  producers), unless the kernel gathers (nested data-dependent selects make TVM's simplifier
  take minutes);
* **contraction** (a reduction over a product of reads, one of which ignores the innermost output
  dimension: GEMM, batched GEMM, convolution, attention's QK and AV): a register tile of
  rows x lanes (:meth:`~einfuse.targets.Target.register_tile`) accumulated in a local buffer (so in vector registers),
  the reduction inside, the streamed operand packed per panel, parallel outer loops
  (TVM_0.27_NOTES.md §2); padded to whole tiles when the tile does not divide a static output;
  an ``epilogue`` kernel applies its element-wise consumer to the tile as it is stored;
  a few rows (decoding's tokens) run as a **GEMV** instead where the cost model says so: each
  core's slice of the columns accumulated in L1 over the streamed operand's rows;
* **row groups** and lone reductions: parallel over rows, every stage computed one row at a time,
  reductions in vector-wide partial results (``rfactor``);
* **attention**: the ``P V`` contraction over blocks of query rows, with the scores and softmax
  of each block as stages computed inside the block loop;
* **element-wise**: the innermost loop split by the vector width and vectorized (a ragged static
  row vectorized whole; nothing vectorized if the kernel gathers), the rest fused and parallel
  (fusing everything would put ``//`` and ``%`` by symbolic sizes in every index, which LLVM
  takes minutes over).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import s_tir, tirx

from ...targets import Target, cost
from ...ir import panels
from ...ir.kernels import Kernel

WHOLE_VECTOR = 2048  # the longest ragged row vectorized whole


def schedule(func: tirx.PrimFunc, kernel: Kernel, target: Target) -> tirx.PrimFunc:
    """``func`` scheduled for ``target``; the unscheduled function if a rule does not apply."""
    return rule_schedule(func, kernel, target).mod["main"].with_attr("global_symbol", kernel.name)


def rule_schedule(func: tirx.PrimFunc, kernel: Kernel, target: Target) -> s_tir.Schedule:
    """The schedule (with its trace, which tuning records as a candidate) the rules give ``func``."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    stages = set(kernel.stages)
    for b in blocks[:-1]:
        if sch.get(b).name_hint not in stages and not _is_reduction(sch, b) and not kernel.gathers:
            sch.compute_inline(b)  # (inlined gathers: TVM takes minutes)
    out = sch.get_child_blocks(sch.get_sblock("root"))
    return next((done for rule in RULES[kernel.kind] if (done := rule(sch, out, kernel, target)) is not None), sch)


Rule = Callable[[s_tir.Schedule, list[Any], Kernel, Target], s_tir.Schedule | None]


def _epilogue_rule(sch: s_tir.Schedule, blocks: list[Any], kernel: Kernel, target: Target) -> s_tir.Schedule:
    """An epilogue kernel: its contraction, the element-wise reader applied to the tile as it is stored."""
    return _dequant_rule(sch, blocks, kernel, target, epilogue=True)


def _rows_rule(sch: s_tir.Schedule, blocks: list[Any], kernel: Kernel, target: Target) -> s_tir.Schedule:
    """A row group, parallel over its rows, each stage one row at a time."""
    _row_schedule(sch, blocks, target)
    return sch


def _attention_rule(sch: s_tir.Schedule, blocks: list[Any], kernel: Kernel, target: Target) -> s_tir.Schedule:
    """A row group and the ``P V`` reading it, one block of query rows at a time."""
    _row_schedule(sch, blocks, target, attention=True)
    return sch


def _dequant_rule(sch: s_tir.Schedule, blocks: list[Any], kernel: Kernel, target: Target,
                  epilogue: bool = False) -> s_tir.Schedule:
    """A contraction after its weight's dequantization (stages before it, if the weight is
    quantized): as a GEMV the dequantization is inlined into the loads; on register tiles it
    computes each packed panel (``_contraction_schedule``), once per panel."""
    at = next(i for i, b in enumerate(blocks) if _is_reduction(sch, b))
    _contraction_schedule(sch, blocks[at], target, epilogue=epilogue, dequant=blocks[:at])
    return sch


def _contraction_rule(sch: s_tir.Schedule, blocks: list[Any], kernel: Kernel, target: Target) -> s_tir.Schedule | None:
    """A contraction block on register tiles (or as a GEMV)."""
    if not (_is_reduction(sch, blocks[0]) and _contraction(sch, blocks[0])):
        return None
    _contraction_schedule(sch, blocks[0], target, gathers=kernel.gathers)
    return sch


def _reduction_rule(sch: s_tir.Schedule, blocks: list[Any], kernel: Kernel, target: Target) -> s_tir.Schedule | None:
    """A row reduction block, parallel over its rows."""
    if not _is_reduction(sch, blocks[0]):
        return None
    _row_schedule(sch, blocks, target)
    return sch


def _elementwise_rule(sch: s_tir.Schedule, blocks: list[Any], kernel: Kernel, target: Target) -> s_tir.Schedule:
    """An element-wise block, vectorized unless the kernel gathers."""
    _elementwise_schedule(sch, blocks[0], target, vectorize=not kernel.gathers)
    return sch


def _each_block(*rules: Rule) -> Rule:
    """The rule scheduling every block alone, by the first of ``rules`` that applies to it."""
    def rule(sch: s_tir.Schedule, blocks: list[Any], kernel: Kernel, target: Target) -> s_tir.Schedule:
        for b in blocks:
            for r in rules:
                if r(sch, [b], kernel, target) is not None:
                    break
        return sch
    return rule


#: The rules of each kernel kind, in order (module docstring).
RULES: dict[str, list[Rule]] = {
    "": [_each_block(_contraction_rule, _reduction_rule, _elementwise_rule)],
    "epilogue": [_epilogue_rule],
    "dequant": [_dequant_rule],
    "rows": [_rows_rule],
    "attention": [_attention_rule],
}


def _is_reduction(sch: s_tir.Schedule, block: Any) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _contraction(sch: s_tir.Schedule, block: Any) -> bool:
    """A product of loads of which one ignores the innermost output variable."""
    blk = sch.get(block)
    spatial = [iv.var for iv in blk.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    loads = [ld for ld in _loads(blk.body.value) if not _source(ld).same_as(blk.body.buffer)]
    if len(spatial) < 2 or len(loads) < 2:
        return False
    return not all(any(_mentions(i, spatial[-1]) for i in ld.indices) for ld in loads)


def _loads(e: Any) -> list[Any]:
    """Every buffer load in an expression tree."""
    if type(e).__name__ in ("BufferLoad", "TensorLoad"):  # this TVM's name for a buffer load
        return [e]
    out = []
    for field in ("a", "b", "value", "condition", "true_value", "false_value"):
        if hasattr(e, field):
            out += _loads(getattr(e, field))
    for arg in getattr(e, "args", ()):
        out += _loads(arg)
    return out


def _source(node: Any) -> Any:
    """The buffer a load or a read region refers to (field names vary across TVM versions)."""
    for field in ("buffer", "source", "tensor"):
        found = getattr(node, field, None)
        if found is not None:
            return found
    raise AttributeError(f"no buffer on {type(node).__name__}")


def _mentions(e: Any, var: Any) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(e, []))


def uses_var(region: Any, var: Any) -> bool:
    """Whether a buffer region's indices mention ``var``."""
    return any(uses_var_range(rng, var) for rng in region.region)


def uses_var_range(rng: Any, var: Any) -> bool:
    """Whether one dimension of a region mentions ``var``."""
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(rng.min, []))


def _innermost_last(uses: list[bool]) -> list[int]:
    """Dimension order putting the dimensions indexed by the vectorized variable last."""
    return [d for d, u in enumerate(uses) if not u] + [d for d, u in enumerate(uses) if u]


def _contraction_schedule(sch: s_tir.Schedule, block: Any, target: Target, epilogue: bool = False,
                          dequant: list[Any] | None = None, gathers: bool = False) -> None:
    """A contraction on register tiles, or as a GEMV where that is estimated faster; a quantized
    weight's ``dequant`` stages computed per GEMV step or per packed panel; an operand read
    through a gather (``gathers``) not packed (TVM cannot bound the panel it reads)."""
    spatial_vars = [iv for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    row = _row_dim(sch.get(block))
    if _streams_rows(sch.get(block), row, target):
        _gemv_schedule(sch, block, target, epilogue, dequant or [])
        return
    mr, nr = target.register_tile(_static(spatial_vars[-1].dom.extent), _static(spatial_vars[row].dom.extent))
    before = sch.get_producers(block)
    padded = _pad_ragged(sch, block, row, mr, nr)
    block = sch.get_sblock(sch.get(block).name_hint) if padded else block
    loops = sch.get_loops(block)
    blk = sch.get(block)
    kinds = [iv.iter_type for iv in blk.iter_vars]
    spatial = [lp for lp, k in zip(loops, kinds) if k == tirx.IterVar.DataPar]
    reduce = [lp for lp, k in zip(loops, kinds) if k == tirx.IterVar.CommReduce]
    inner = blk.iter_vars[len(spatial) - 1].var
    streamed = [i for i, r in enumerate(blk.reads) if uses_var(r, inner)]
    if padded:  # the padded result lives in registers; the copy out of it is the write-back
        (writeback,) = sch.get_consumers(block)
        sch.set_scope(block, 0, "local")
    else:
        writeback = sch.cache_write(block, 0, "local")
    if epilogue:  # the element-wise consumer runs on the register tile as it is stored
        (consumer,) = sch.get_consumers(writeback)
        sch.reverse_compute_inline(consumer)
    i0, i1 = sch.split(spatial[row], [None, mr])
    j0, j1 = sch.split(spatial[-1], [None, nr])
    outer = [lp for d, lp in enumerate(spatial[:-1]) if d != row]
    sch.reorder(*outer, j0, i0, *reduce, i1, j1)
    loads = _loads(blk.body.value)
    packs = len(streamed) == 1 and sum(_source(ld).same_as(_source(blk.reads[streamed[0]])) for ld in loads) == 1 \
        and not _reads_panels(blk) and not gathers
    if packs:
        # pack the reduction x NR panel the streamed operand reads, once per j0, reused by every i0
        region = blk.reads[streamed[0]].region
        packed = sch.cache_read(block, streamed[0], "global")
        order = _innermost_last([uses_var_range(r, inner) for r in region])
        if order != list(range(len(region))):  # the panel's NR lanes must be contiguous
            sch.transform_layout(packed, ("write", 0), lambda *ix: tuple(ix[d] for d in order))
        sch.compute_at(packed, j0)
        lanes = sch.get_loops(packed)[-1]
        if _static(sch.get(lanes).extent) is not None:   # (a transposed convolution's input read
            sch.vectorize(lanes)                          # at (o+p-k)//s spans a varying range)
        for producer in sch.get_producers(packed) if not padded else []:   # (a quantized weight's
            sch.compute_inline(producer)                                    # dequantization, per panel)
    if padded:  # the operands' zero padding is computed where they are read
        keep = {sch.get(b).name_hint for b in before + [block, writeback] + ([packed] if packs else [])}
        # (producers only: a consumer, a causal mask's select on the scores, stays a stage of its own)
        for pad in list(sch.get_producers(block)) + (list(sch.get_producers(packed)) if packs else []):
            if sch.get(pad).name_hint not in keep:
                sch.compute_inline(pad)
    sch.reverse_compute_at(writeback, i0)
    _vector_columns(sch, sch.get_loops(writeback)[-1], nr, target.vector_lanes)   # (and its epilogue)
    sch.unroll(i1)
    _vector_columns(sch, j1, nr, target.vector_lanes)
    sch.parallel(sch.fuse(*outer, j0) if outer else j0)
    init = sch.decompose_reduction(block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])


def _streams_rows(blk: Any, row: int, target: Target) -> bool:
    """Whether a contraction is a GEMV (one vector x matrix, or a few: decoding's tokens) that
    the cost model runs faster as :func:`_gemv_schedule` than on register tiles."""
    extents = [_static(iv.dom.extent) for iv in blk.iter_vars]
    kinds = [iv.iter_type for iv in blk.iter_vars]
    spatial = [e for e, k in zip(extents, kinds) if k == tirx.IterVar.DataPar]
    depth = [e for e, k in zip(extents, kinds) if k == tirx.IterVar.CommReduce]
    if None in spatial + depth or len(depth) != 1 or len(spatial) != 2 or _reads_panels(blk):
        return False
    return cost.prefers_gemv(cost.nominal(target), 1, spatial[row], spatial[-1], depth[0])


def _reads_panels(blk: Any) -> bool:
    """Whether the block reads a weight packed into panels at compile time (the layout of
    :mod:`einfuse.ir.panels`, as TIR): nothing to copy out."""
    return any(len(ld.indices) == panels.INDICES and isinstance(ld.indices[-1], tirx.FloorMod)
               for ld in _loads(blk.body.value))


GEMV_ROWS = 4   # rows of the matrix a GEMV step reads (4 streams from memory, one accumulator load and
                # store per 4 FMAs: 1 x 4096 x 4096 3.1 -> 2.1 ms; 8 rows 2.2 ms, 16 rows 2.5 ms)


def _gemv_schedule(sch: s_tir.Schedule, block: Any, target: Target, epilogue: bool, dequant: list[Any]) -> None:
    """A GEMV: the reduction outermost within each core's slice of the columns, each row of the
    matrix streamed once, contiguous, through accumulators of the slice's width in L1,
    ``GEMV_ROWS`` rows per step (where they divide the reduction). (On
    register tiles, every step of the reduction would read a few columns of another row: a new
    page each, 2.5x slower than torch at 1 x 4096 x 4096.)"""
    writeback = sch.cache_write(block, 0, "local")
    if epilogue:
        (consumer,) = sch.get_consumers(writeback)
        sch.reverse_compute_inline(consumer)
    i, j, k = sch.get_loops(block)
    j0, j1 = sch.split(j, [target.cores, None])
    j2, j3 = sch.split(j1, [None, target.vector_lanes])
    rows = GEMV_ROWS if _static(sch.get(k).extent) % GEMV_ROWS == 0 else 1
    k0, k1 = sch.split(k, [None, rows])
    sch.reorder(j0, k0, i, j2, k1, j3)
    for b in dequant:   # (a quantized weight: dequantized where it is loaded for one input row; for more,
        if _static(sch.get(i).extent) == 1:   # its rows of this step once, for every input row)
            sch.compute_inline(b)
        else:
            sch.compute_at(b, k0)
            _vectorize_inner(sch, sch.get_loops(b)[-1], target)
    sch.unroll(k1)
    sch.reverse_compute_at(writeback, j0)
    _vectorize_inner(sch, sch.get_loops(writeback)[-1], target)
    sch.vectorize(j3)
    sch.parallel(j0)
    init = sch.decompose_reduction(block, k0)
    sch.vectorize(sch.get_loops(init)[-1])


def _vector_columns(sch: s_tir.Schedule, loop: Any, width: int, lanes: int) -> None:
    """The register tile's columns as whole vectors, unrolled: a loop vectorized over a width
    that is no power of two (24 lanes) becomes LLVM vectors it splits with shuffles (10x slower)."""
    if width > lanes and width % lanes == 0:
        vectors, loop = sch.split(loop, [None, lanes])
        sch.unroll(vectors)
    sch.vectorize(loop)


def _static(extent: Any) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _row_dim(blk: Any) -> int:
    """The register tile's row dimension: the innermost output dimension besides the vectorized
    one that the streamed operand does not read (a GEMM's ``m``, a convolution's output channel),
    of extent above one where there is one, so the packed panel is reused by every row tile."""
    data = [iv for iv in blk.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    spatial = [iv.var for iv in data]
    streamed = [r for r in blk.reads if uses_var(r, spatial[-1])]
    free = [d for d in range(len(spatial) - 1) if not any(uses_var(r, spatial[d]) for r in streamed)]
    longer = [d for d in free if _static(data[d].dom.extent) != 1]   # (an LSTM's batch of one: its steps)
    return (longer or free)[-1] if free else len(spatial) - 2


def _pad_ragged(sch: s_tir.Schedule, block: Any, row: int, mr: int, nr: int) -> bool:
    """Pad a static register-tile dimension that the tile does not divide (785 tokens): the tile
    then computes on zeros instead of under a predicate that makes LLVM scalarize the loop; only
    the copy out of the register tile keeps the bounds check. Whether it padded."""
    blk = sch.get(block)
    kinds = [iv.iter_type for iv in blk.iter_vars]
    extents = [iv.dom.extent for iv in blk.iter_vars]
    spatial = [d for d, k in enumerate(kinds) if k == tirx.IterVar.DataPar]
    padding = [1] * len(kinds)
    padding[spatial[row]], padding[spatial[-1]] = mr, nr
    if not all(isinstance(x, tirx.IntImm) for x in extents) or \
            all(int(extents[d]) % padding[d] == 0 for d in range(len(kinds))):
        return False
    try:
        sch.pad_einsum(block, padding)
    except s_tir.ScheduleError:  # not a plain Einsum (a convolution's i + k index): keep the predicate
        return False
    return True


def _row_schedule(sch: s_tir.Schedule, blocks: list[Any], target: Target, attention: bool = False) -> None:
    """A row group (or a lone row reduction): parallel over the output's rows, every stage
    computed for one row at a time, reductions in vector-wide partial results. In an attention
    kernel the output is ``P V`` computed for a block of query rows, and the stages (the scores
    ``Q K``, the softmax) for that block only: the S x S scores never reach memory."""
    out = blocks[-1]
    kinds = [iv.iter_type for iv in sch.get(out).iter_vars]
    rows = [lp for lp, k in zip(sch.get_loops(out), kinds) if k == tirx.IterVar.DataPar]
    rows = rows if _is_reduction(sch, out) else rows[:-1]
    partials = [_partial_reduction(sch, b, target) for b in blocks[:len(blocks) - attention]
                if _is_reduction(sch, b) and not _contraction(sch, b)]
    if attention:
        row, finish = _attention_output(sch, out, target)
    else:
        if not rows:
            return
        row, finish = sch.fuse(*rows) if len(rows) > 1 else rows[0], None
        sch.parallel(row)
    before = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in before]
    for stage in reversed(before[:names.index(sch.get(out).name_hint)]):
        sch.compute_at(stage, row)
    for b in sch.get_child_blocks(row):
        if _is_reduction(sch, b) and _contraction(sch, b) and not sch.get(b).same_as(sch.get(out)):
            _stage_contraction(sch, b, row, target)
        elif not _is_reduction(sch, b) and not sch.get(b).same_as(sch.get(out)):
            _vectorize_inner(sch, sch.get_loops(b)[-1], target)
    for p in partials:
        if p is not None:  # under the row: the lanes, then the reduction; the lanes go innermost
            _, lanes, *reduce = sch.get_loops(p)
            try:
                sch.reorder(*reduce, lanes)
                sch.vectorize(lanes)
            except s_tir.ScheduleError:   # (a rank's sum of comparisons of the reduced coordinate, a sort's:
                pass                      # TVM cannot vectorize its partials; the lanes stay serial)
    if finish is not None:
        init = sch.decompose_reduction(out, finish)
        sch.vectorize(sch.get_loops(init)[-1])


def _attention_output(sch: s_tir.Schedule, out: Any, target: Target) -> tuple[Any, Any]:
    """``O[.., s, f] = P[.., s, t] * V[.., t, f]`` on a register tile of query rows x ``f``; the
    parallel loop over (batch, head, query block) and the reduction loop."""
    loops = sch.get_loops(out)
    blk = sch.get(out)
    spatial = [lp for lp, iv in zip(loops, blk.iter_vars) if iv.iter_type == tirx.IterVar.DataPar]
    reduce = [lp for lp, iv in zip(loops, blk.iter_vars) if iv.iter_type == tirx.IterVar.CommReduce]
    width = blk.iter_vars[len(spatial) - 1].dom.extent
    mr, nr = target.register_tile(int(width) if isinstance(width, tirx.IntImm) else None)
    writeback = sch.cache_write(out, 0, "local")
    s0, s1 = sch.split(spatial[-2], [None, mr])
    f0, f1 = sch.split(spatial[-1], [None, nr])
    sch.reorder(*spatial[:-2], s0, f0, *reduce, s1, f1)
    row = sch.fuse(*spatial[:-2], s0)
    sch.parallel(row)
    sch.reverse_compute_at(writeback, f0)
    _vector_columns(sch, sch.get_loops(writeback)[-1], nr, target.vector_lanes)
    sch.unroll(s1)
    _vector_columns(sch, f1, nr, target.vector_lanes)
    return row, reduce[0]


def _stage_contraction(sch: s_tir.Schedule, block: Any, row: Any, target: Target) -> None:
    """The scores ``S[s, t] = Q[s, e] * K[t, e]`` of one query block (an attention kernel's), or
    of one query row (a row group's: its row loop is the query's): ``K`` read with ``t``
    innermost (packed per block if it is not stored so), the ``t`` lanes vectorized, the query
    rows unrolled. A block streaming other than one read (a sort's rank compares two reads along
    ``t``) is left as it is."""
    blk = sch.get(block)
    spatial = [iv.var for iv in blk.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    found = [n for n, r in enumerate(blk.reads) if uses_var(r, spatial[-1])]
    if len(found) != 1:
        return
    (streamed,) = found
    region = blk.reads[streamed].region
    order = _innermost_last([uses_var_range(r, spatial[-1]) for r in region])
    if order != list(range(len(region))):  # (the layout rewrite usually stored it so already)
        packed = sch.cache_read(block, streamed, "global", consumer_blocks=[block])
        sch.transform_layout(packed, ("write", 0), lambda *ix: tuple(ix[d] for d in order))
        sch.compute_at(packed, row)
    *rows, j, k = _loops_under(sch, block, row)   # (rows: the block's query rows, none in a row group)
    extent = sch.get(j).extent
    lanes = target.vector_lanes
    if isinstance(extent, tirx.IntImm) and int(extent) % lanes:
        sch.reorder(k, *rows, j)  # a ragged row: one whole vector
        sch.vectorize(j)
        top = k
    else:
        top, j1 = sch.split(j, [None, lanes])
        sch.reorder(top, k, *rows, j1)
        sch.vectorize(j1)
    init = sch.decompose_reduction(block, top)
    sch.vectorize(sch.get_loops(init)[-1])


def _loops_under(sch: s_tir.Schedule, block: Any, outer: Any) -> list[Any]:
    """The loops of ``block`` nested inside the loop ``outer``."""
    loops = sch.get_loops(block)
    at = next(n for n, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(outer)))
    return list(loops[at + 1:])


def _partial_reduction(sch: s_tir.Schedule, block: Any, target: Target) -> Any:
    """Split a row reduction into vector-wide partial results (``rfactor``) reduced serially
    after: a serial sum is one dependent add per element, 4 cycles each. The partial block, or
    None where the vector width does not divide the row (it stays serial)."""
    loop = sch.get_loops(block)[-1]
    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm) or int(extent) < 2 * target.vector_lanes:
        return None
    if isinstance(sch.get(block).body.value, tirx.Select):   # (op_lowering.NAN_REDUCERS: not rfactor's)
        return None
    lanes = max(d for d in range(1, target.vector_lanes + 1) if int(extent) % d == 0)
    if lanes < 4:  # (785 = 5 x 157 takes 5 partial results)
        return None
    _, inner = sch.split(loop, [None, lanes])
    return sch.rfactor(inner, factor_axis=len(_source(sch.get(block).writes[0]).shape))  # lanes innermost


def _elementwise_schedule(sch: s_tir.Schedule, block: Any, target: Target, vectorize: bool) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    if not vectorize:  # data-dependent loads do not vectorize, and LLVM takes minutes trying
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
        return
    split = _vectorize_inner(sch, loops[-1], target)
    outer = list(loops[:-1]) + ([split] if split is not None else [])
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _contiguous(sch: s_tir.Schedule, loop: Any) -> bool:
    """Whether every load under ``loop`` is contiguous or constant along it (the loop's variable
    appears only in the last index of each load)."""
    for block in sch.get_child_blocks(loop):
        blk = sch.get(block)
        inner = [iv.var for iv in blk.iter_vars if iv.iter_type == tirx.IterVar.DataPar][-1]
        for ld in _loads(blk.body.value):
            if any(_mentions(ix, inner) for ix in list(ld.indices)[:-1]):
                return False
    return True


def _vectorize_inner(sch: s_tir.Schedule, loop: Any, target: Target) -> Any:
    """Vectorize an innermost loop; the outer part of its split, if it was split."""
    extent = sch.get(loop).extent
    if isinstance(extent, tirx.IntImm) and int(extent) % target.vector_lanes and int(extent) <= WHOLE_VECTOR:
        # a ragged static row (785 tokens) is one long vector: LLVM splits it into whole registers
        # and one masked tail; a split by the register width would put a predicate in the loop,
        # and a predicated loop is scalarized (4x slower). Not for strided reads (a transposing
        # copy): LLVM took 90 s to build one 785-lane gather.
        if _contiguous(sch, loop):
            sch.vectorize(loop)
            return None
    outer, inner = sch.split(loop, [None, target.vector_lanes])
    sch.vectorize(inner)
    return outer
