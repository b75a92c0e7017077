"""``group-kernels``: which Einsums become one kernel, as the side table code generation consumes.

The groups are FuseMax's fusion groups (§III-B; EINSUM_CASCADES.md §2.3): each kernel *streams*
a rank, producing and consuming its intermediates a tile (a row, a block of rows, a key tile) at a
time along it, and every Einsum it fuses is at the same pass level on that rank; Einsums at
different levels are not fused along it. A row group (softmax, LayerNorm) streams its rows and
holds one whole row in registers or cache, so its passes over the row's own variable stay inside
it; the 1-pass attention loop streams the key tiles with every Einsum at level 1. The pass checks
this for every group it forms and fails, naming the kernel, if a group breaks it.

The table is ``Cascade.groups`` (not part of the IR: the text shows it as ``# kernel`` comments):
one :class:`~einfuse.ir.kernels.Kernel` per generated function, in execution order. ``einfuse.compile``
runs this pass last in the target's codegen pipeline, after the operand layouts
(``passes/layout.py``); ``einfuse ir -p default,codegen`` shows the groups as code generation
receives them. The grouping:

A tensor is *inlined* into its reader when it is a temp written once by an element-wise Einsum
(no reduction, no filter, plain output indices), read by exactly one Einsum, and every variable
that reader iterates indexes the tensor (so inlining recomputes nothing). Every other tensor
is a kernel's output; a kernel computes it from its writes and the Einsums inlined into them.
So a bias add and the GELU after it are one kernel, and the square inside a variance's sum is
computed inside the reduction.

Then a kernel is *absorbed* into the one kernel that reads its output, as a stage computed in the
same loop nest, when the two fit one:

* **epilogue**: a contraction ``T[m,n] = X[m,k] * W[k,n]`` whose only reader is element-wise over
  the same ``[m,n]`` (bias, GELU, residual add): the epilogue runs on the register tile before it
  is stored, and ``T`` is never written to memory;
* **row group**: kernels over the same rows that reduce or map along the same innermost variable
  (softmax's max, exp, sum and division; LayerNorm's mean, variance and normalization) become one
  kernel, parallel over rows, each stage computing one row before the next stage reads it; an
  epilogue kernel joins a row group only if its contraction reads no weights (attention's scores);
* **attention**: a row group read by a contraction over its rows' variable (``P[s,t] * V[t,f]``)
  becomes a stage of that contraction, computed one block of query rows at a time.

Each is a merge rule of :data:`MERGES`, tried in this order; the first that fits names the kind
(``ir.kernels.KINDS``) of the merged kernel.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..errors import CompileError
from ..ir import Access, Call, Cascade, Const, Einsum, IAccess, IVar, Loop
from ..ir.nodes import walk
from ..ir.grouped import grouped as grouped_parts
from ..ir.decode import DecodeAttention, decode_attentions
from ..ir.select import selection
from ..ir.int8_dot import parts
from ..ir.kernels import KINDS, Kernel, contraction, rows, stream_levels
from ..ir.scope import (
    access_vars,
    broadcast,
    declarations,
    index_atoms,
    iteration_vars,
    lhs_vars,
    reads,
    reduced_vars,
)
from .manager import Pass, PassContext, register



@register
@dataclass(frozen=True)
class GroupKernels(Pass):
    """Group the Einsums into kernels (FuseMax's legality checked) and record them as the side table."""

    name = "group-kernels"
    attention: bool = True   # a softmax row group joins the P V reading it (off: one phase each, as on an accelerator)
    grouped: bool = False    # each grouped contraction (ir/grouped.py) one kernel of its kind (a CPU's)
    select: bool = False     # each top-k's coordinates by rank (ir/select.py) one kernel of its kind (a CPU's)
    decode: bool = False     # each decode attention (ir/decode.py) one kernel of its kind (a CPU's)

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        stats = ctx.stats
        kernels = group_kernels(c, self.attention, self.grouped, self.select, self.decode)
        for k in kernels:
            stats[f"kernel:{KINDS[k.kind].label}"] += 1
            stream, levels = stream_levels(c, k)
            if len(levels) > 1 and not KINDS[k.kind].one_pass:   # (select: the count's 2 passes are 1 insertion pass)
                raise CompileError(f"kernel {k.name} fuses Einsums at pass levels {sorted(levels)} along "
                                   f"{','.join(stream)}; FuseMax's legality rule forbids it")
        return replace(c, groups=tuple(kernels))


def group_kernels(c: Cascade, attention: bool = True, grouped: bool = False, select: bool = False,
                  decode: bool = False) -> list[Kernel]:
    """Kernels in execution order (``attention``, ``grouped``, ``select``, ``decode``: see :class:`GroupKernels`)."""
    decls = declarations(c)
    loops = {k.output: k for k in (_loop_kernel(c, s, decls) for s in c.stmts if isinstance(s, Loop))}
    in_loops = {t for k in loops.values() for t in k.internal + (k.output,)}  # (with recomputed temps)
    writes: dict[str, list[Einsum]] = {}
    readers: dict[str, set[int]] = {}
    for i, (e, _) in enumerate(c.einsums()):
        writes.setdefault(e.lhs.tensor, []).append(e)
        for a in reads(e):
            readers.setdefault(a.tensor, set()).add(i)
    einsums = [e for e, _ in c.einsums()]
    inline = {t for t, ws in writes.items()
              if decls[t].role == "temp" and len(ws) == 1 and _elementwise(ws[0])
              and len(readers.get(t, ())) == 1 and _reads_each_once(einsums[next(iter(readers[t]))], t)}
    inline -= in_loops | {a.tensor for e in einsums if e.lhs.tensor in in_loops for a in reads(e)}
    decodes = decode_attentions(c) if decode else []
    inline -= {d.output for d in decodes}   # (its kernel writes it: not inlined into its reader)
    kernels, done = [], set()
    for e in einsums:
        t = e.lhs.tensor
        if t in loops and t not in done:
            kernels.append(loops[t])
            done.add(t)
        if t in inline or t in done or t in in_loops:
            continue
        done.add(t)
        members = _inlined_into(writes[t], writes, inline)
        external, gathers = [], False
        for w in list(writes[t]) + [writes[m][0] for m in members]:
            for a in reads(w):
                gathers = gathers or any(isinstance(atom, IAccess) for ix in a.indices for atom in index_atoms(ix.expr))
                if a.tensor not in inline and a.tensor != t and a.tensor not in external:
                    external.append(a.tensor)
        kernels.append(Kernel(t, t, tuple(writes[t]), tuple(members), tuple(external), gathers))
    kernels = _int8_dots(c, _grouped(c, kernels) if grouped else kernels)
    kernels = _selects(c, kernels, readers) if select else kernels
    kernels = _decodes(c, kernels, decodes)
    kernels = _absorb(kernels, {t: d.role for t, d in decls.items()}, writes, attention)
    return [replace(k, name=f"k{i}_{k.output}") for i, k in enumerate(kernels)]


def _int8_dots(c: Cascade, kernels: list[Kernel]) -> list[Kernel]:
    """``kernels`` with each int8 contraction (``quantize{compute=int8}``, :mod:`einfuse.ir.int8_dot`)
    one ``int8-dot`` kernel with its activations' quantization (their max, their int8 values)."""
    for k in list(kernels):
        found = parts(c, k.writes[0]) if len(k.writes) == 1 else None
        if found is None:
            continue
        stages = (found.amax, found.xq)
        producers = [j for j in kernels if j.output in stages]
        inputs = tuple(dict.fromkeys(t for j in (*producers, k) for t in j.inputs if t not in stages))
        kernels = [j for j in kernels if j not in producers]
        kernels[kernels.index(k)] = replace(k, internal=stages, inputs=inputs, stages=stages, kind="int8-dot")
    return kernels


def _selects(c: Cascade, kernels: list[Kernel], readers: dict[str, set[int]]) -> list[Kernel]:
    """``kernels`` with each top-k's coordinates (:mod:`einfuse.ir.select`) one ``select`` kernel
    with the rank count it reads, where nothing else reads the count."""
    by_output = {k.output: k for k in kernels}
    for k in list(kernels):
        count = by_output.get(k.inputs[0]) if len(k.writes) == 1 and len(k.inputs) == 1 else None
        if count is None or len(count.writes) != 1 or count.internal or len(readers.get(count.output, ())) != 1:
            continue
        found = selection(count.writes[0], k.writes[0])
        if found is not None:
            kernels.remove(count)
            kernels[kernels.index(k)] = replace(k, internal=(count.output,), inputs=count.inputs, kind="select")
    return kernels


def _decodes(c: Cascade, kernels: list[Kernel], decodes: list[DecodeAttention]) -> list[Kernel]:
    """``kernels`` with each decode attention (:mod:`einfuse.ir.decode`) in float32 one ``decode``
    kernel: the kernels writing its temps merged into the one writing its output."""
    decls = declarations(c)
    for d in decodes:
        members = [k for k in kernels if k.output in d.group]
        if any(decls[t].dtype != "f32" for t in d.group) or any(set(k.internal) - set(d.group) for k in members):
            continue
        inputs = tuple(dict.fromkeys(t for k in members for t in k.inputs if t not in d.group))
        (last,) = [k for k in members if k.output == d.output]
        merged = replace(last, writes=tuple(e for e, _ in c.einsums() if e.lhs.tensor == d.output),
                         internal=tuple(t for t in d.group if t != d.output), inputs=inputs, stages=(),
                         kind="decode", gathers=any(k.gathers for k in members))
        kernels = [merged if k is last else k for k in kernels if k not in members or k is last]
    return kernels


def _grouped(c: Cascade, kernels: list[Kernel]) -> list[Kernel]:
    """``kernels`` with each grouped contraction over a weight stored ``[E, d, n]`` (``n`` at
    least a vector of 16) of kind ``grouped``."""
    size = {r.name: r.size for r in c.ranks}
    decls = declarations(c)

    def fits(k: Kernel) -> bool:
        found = grouped_parts(c, k.writes[0]) if len(k.writes) == 1 and not k.internal else None
        if found is None or not found.transposed:
            return False
        n = found.columns([size[r.rank] for r in decls[found.weight].ranks])
        return isinstance(n, int) and n >= 16
    return [replace(k, kind="grouped") if fits(k) else k for k in kernels]


def _loop_kernel(c: Cascade, loop: Loop, decls: dict) -> Kernel:
    """A ``for`` loop as one kernel: the Einsums initialising its running tensors (those with an
    iterative rank), its body, and the one Einsum after it that reads its results (its output)."""
    body = [e.lhs.tensor for e, _ in walk(loop.body)]
    running = {t for t in body if any(r.iterative for r in decls[t].ranks)}
    outside = [s for s in c.stmts if isinstance(s, Einsum)]
    init = [e for e in outside if e.lhs.tensor in running]
    finals = [e for e in outside if any(a.tensor in body for a in reads(e))]
    if len(finals) != 1 or sum(e.lhs.tensor == finals[0].lhs.tensor for e in outside) != 1:
        raise CompileError(f"the loop over {loop.rank}: its results must be read by one Einsum, the only "
                           f"writer of its output (read by {len(finals)})")
    members = init + [e for e, _ in walk(loop.body)] + finals
    recomputed = _recomputed(c, members, decls)
    internal = tuple(dict.fromkeys([e.lhs.tensor for e in init] + body + [e.lhs.tensor for e in recomputed]))
    inputs = tuple(dict.fromkeys(a.tensor for e in members + recomputed for a in reads(e)
                                 if a.tensor not in internal and a.tensor != finals[0].lhs.tensor))
    return Kernel(finals[0].lhs.tensor, finals[0].lhs.tensor, (finals[0],), internal, inputs, kind="loop")


def _recomputed(c: Cascade, members: list[Einsum], decls: dict) -> list[Einsum]:
    """The broadcasts a loop reads that it recomputes where it reads them, instead of reading them
    from memory: element-wise temps written once, from no gather, with a variable their
    right-hand side does not use, read only inside loops (a mask's additive bias
    ``B[s,k] = where(M[s], 0, -inf)`` is otherwise a load per score)."""
    writers: dict[str, list[Einsum]] = {}
    outside: set[str] = set()
    for s in c.stmts:
        if isinstance(s, Einsum):
            writers.setdefault(s.lhs.tensor, []).append(s)
            outside |= {a.tensor for a in reads(s)}
    out = []
    for t in dict.fromkeys(a.tensor for e in members for a in reads(e)):
        ws = writers.get(t, [])
        if len(ws) == 1 and decls[t].role == "temp" and _elementwise(ws[0]) and t not in outside \
                and broadcast(ws[0], c) \
                and not any(isinstance(x, IAccess) for a in reads(ws[0]) for ix in a.indices for x in index_atoms(ix.expr)):
            out.append(ws[0])
    return out


def _absorb(kernels: list[Kernel], roles: dict[str, str], writes: dict[str, list[Einsum]],
            attention: bool) -> list[Kernel]:
    """Merge kernels into the one kernel reading their output, while one fits (module docstring)."""
    merged = True
    while merged:
        merged = False
        for a in kernels:
            readers = [k for k in kernels if a.output in k.inputs]
            if roles[a.output] != "temp" or len(readers) != 1:
                continue
            b = readers[0]
            kind = _merged_kind(a, b, writes, roles)
            if kind is None or (kind == "attention" and not attention):
                continue
            inputs = tuple(dict.fromkeys(t for t in a.inputs + b.inputs if t != a.output))
            kernels[kernels.index(b)] = replace(
                b, internal=a.internal + (a.output,) + b.internal, inputs=inputs, kind=kind,
                stages=a.stages + (a.output,) + b.stages)
            kernels.remove(a)
            merged = True
            break
    return kernels


MergeRule = Callable[[Kernel, Kernel, dict[str, list[Einsum]], dict[str, str]], bool]


def _merged_kind(a: Kernel, b: Kernel, writes: dict[str, list[Einsum]], roles: dict[str, str]) -> str | None:
    """The kind of kernel ``a`` absorbed into its reader ``b`` makes (the first rule of
    :data:`MERGES` that fits), or None if they do not fit."""
    return next((kind for kind, fits in MERGES if fits(a, b, writes, roles)), None)


def _single(k: Kernel) -> Einsum | None:
    """The kernel's one write, if it has one with plain, unfiltered output indices."""
    if len(k.writes) != 1 or k.gathers:
        return None
    e = k.writes[0]
    plain = all(isinstance(ix.expr, IVar) for ix in e.lhs.indices)
    filtered = any(ix.filter for ix in e.lhs.indices)  # allowed on a contraction: causal scores
    return e if plain and not e.populate and (not filtered or contraction(e)) else None


def _read_plainly(tensor: str, k: Kernel, writes: dict[str, list[Einsum]]) -> bool:
    """Whether every read of ``tensor`` in ``k`` uses the indices ``tensor`` is written with."""
    (w,) = writes[tensor]
    members = list(k.writes) + [writes[t][0] for t in k.internal]
    written = [ix.expr for ix in w.lhs.indices]
    return all([ix.expr for ix in a.indices] == written and not any(ix.filter for ix in a.indices)
               for e in members for a in reads(e) if a.tensor == tensor)


def _epilogue(a: Kernel, b: Kernel, writes: dict[str, list[Einsum]], roles: dict[str, str]) -> bool:
    """A single kernel (or a dequantizing one) computing a contraction (a sum of products) of a
    matrix or more (the register tile's rows and columns), read by a single element-wise map over
    its output."""
    ea, eb = _single(a), _single(b)
    return (a.kind in ("", "dequant") and not b.kind and ea is not None and eb is not None and contraction(ea)
            and isinstance(ea.rhs, Call) and ea.rhs.op == "mul" and len(lhs_vars(ea)) > 1
            and not eb.reduce and lhs_vars(ea) == lhs_vars(eb) and _read_plainly(a.output, b, writes))


def _same_rows(a: Kernel, b: Kernel, writes: dict[str, list[Einsum]], roles: dict[str, str]) -> bool:
    """Kernels over the same rows, reducing or mapping along the same variable. A contraction
    (an epilogue kernel) joins only if it reads no weights (attention's ``Q K``): a GEMM computed
    one row block at a time would stream its whole weight once per block."""
    activations = a.kind != "epilogue" or all(roles[t] != "param" for t in a.inputs)
    if a.kind not in ("", "rows", "epilogue") or b.kind not in ("", "rows") or not activations:
        return False
    ea, eb = _single(a), _single(b)
    if ea is None or eb is None or contraction(eb) or (contraction(ea) and a.kind != "epilogue"):
        return False
    ra, rb = rows(ea), rows(eb)
    return ra is not None and ra == rb and bool(ra[0]) and _read_plainly(a.output, b, writes)


def _attention(a: Kernel, b: Kernel, writes: dict[str, list[Einsum]], roles: dict[str, str]) -> bool:
    """A row group (softmax) read by a contraction over its rows' variable (``P[s,t] * V[t,f]``)."""
    ea, eb = _single(a), _single(b)
    if a.kind != "rows" or b.kind or ea is None or eb is None or not contraction(eb) or rows(ea) is None:
        return False
    row_vars, along = rows(ea)
    return (lhs_vars(eb)[:-1] == row_vars and reduced_vars(eb) == along and bool(row_vars)
            and _read_plainly(a.output, b, writes))


def _dequantizing(a: Kernel, b: Kernel, writes: dict[str, list[Einsum]], roles: dict[str, str]) -> bool:
    """A map of weights alone (after ``canonicalize``, which folds the others: a quantized
    weight's dequantization, ``passes/quantize.py``) read by a contraction as its operand: the
    contraction dequantizes where it loads (a GEMV) or a panel at a time (a GEMM), and the float
    weight is never written out."""
    ea, eb = _single(a), _single(b)
    return (not a.kind and not b.kind and ea is not None and eb is not None and not ea.reduce
            and all(roles[t] == "param" for t in a.inputs) and contraction(eb) and _read_plainly(a.output, b, writes))


def _int8_epilogue(a: Kernel, b: Kernel, writes: dict[str, list[Einsum]], roles: dict[str, str]) -> bool:
    """An ``int8-dot`` kernel read by a single element-wise kernel over its output (a bias, an
    activation, a residual add), each of whose other reads is indexed by the output's variables
    or by its innermost alone (``R[m,n]``, ``B[n]``): it runs on the accumulators as they are stored."""
    eb = _single(b)
    if a.kind != "int8-dot" or b.kind or eb is None or not _read_plainly(a.output, b, writes):
        return False
    out = lhs_vars(a.writes[-1])
    members = [eb] + [writes[t][0] for t in b.internal]
    allowed = (out, out[-1:])
    return all(not e.reduce and not e.populate and lhs_vars(e) == out and _values_only(e.rhs) and all(
        a_.tensor in b.internal or a_.tensor == a.output or
        (all(isinstance(ix.expr, IVar) and not ix.filter for ix in a_.indices) and access_vars(a_) in allowed)
        for a_ in reads(e)) for e in members)


def _values_only(x: object) -> bool:
    """Whether ``x`` is built of reads, constants and op calls alone (no coordinates, no conditions)."""
    if isinstance(x, Call):
        return all(_values_only(a) for a in x.args)
    return isinstance(x, (Access, Const))


#: The merge rules, in order: (the kind formed, whether kernel ``a`` absorbed into its reader
#: ``b`` forms it); the first that fits wins. Each kind is a key of ``ir.kernels.KINDS``.
MERGES: tuple[tuple[str, MergeRule], ...] = (("int8-dot", _int8_epilogue), ("dequant", _dequantizing), ("epilogue", _epilogue), ("rows", _same_rows),
                                             ("attention", _attention))


def _reads_each_once(reader: Einsum, tensor: str) -> bool:
    """Whether every iteration variable of ``reader`` indexes its reads of ``tensor`` (so inlining
    the tensor's computation into the reader recomputes nothing; a GEMM operand fails this), and
    a reduction reads it at one index (``K[r2] < K[r]`` would put both sides in one pass)."""
    found = [a for a in reads(reader) if a.tensor == tensor]
    used = {v for a in found for v in access_vars(a)}
    one_index = not reduced_vars(reader) or len({a.indices for a in found}) == 1
    return set(iteration_vars(reader)) <= used and one_index


def _elementwise(e: Einsum) -> bool:
    lhs = [ix.expr for ix in e.lhs.indices]
    return (not e.reduce and not e.populate and all(isinstance(x, IVar) for x in lhs)
            and len({x.name for x in lhs}) == len(lhs) and not any(ix.filter for ix in e.lhs.indices)
            and len(iteration_vars(e)) == len(lhs))


def _inlined_into(ws: list[Einsum], writes: dict[str, list[Einsum]], inline: set[str]) -> list[str]:
    """Inlined tensors a kernel needs, producers before consumers."""
    out: list[str] = []

    def visit(e: Einsum) -> None:
        for a in reads(e):
            if a.tensor in inline and a.tensor not in out:
                visit(writes[a.tensor][0])
                out.append(a.tensor)
    for w in ws:
        visit(w)
    return out
