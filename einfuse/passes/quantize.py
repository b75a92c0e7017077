"""``quantize{format=q4_0}``: weight-only quantization. Each contraction's constant weight is
stored in a quantized format (:mod:`einfuse.ir.quant_formats`: packed integers, scales, zero points) and
read through an Einsum that dequantizes it, which the interpreter runs exactly: the reference
every kernel is checked against.

Why: a decoder's step reads every weight once per token, so it is bound by memory; 4-bit weights
read 8x fewer bytes than float32 (issue 19; llama.cpp's ``Q4_0``, GPTQ/AWQ's grouped int4).

Which weights: a parameter with data, two-dimensional, read with plain variables by a
contraction that reduces one of them (a Linear's ``W[out, in]``, a matmul's constant operand),
except those read by more than one Einsum (an embedding's table, a tied LM head), with at least
one whole block of the format along the reduction. Any other is left in float and counted as
``kept:<reason>``. Before/after (``q8_0``)::

    Y[m,n] = X[m,k] * W[n,k]          W_q[W_Q,N] param i8, W_d[W_D,N] param f16
                                      W_dq[k,n] = f32(W_q[k,n]) * f32(W_d[k//32,n])
                                      Y[m,n] = X[m,k] * W_dq[k,n]

The dequantized weight is a temp reduction-major (``W_dq[k,n]``: a vector of output channels
contiguous) that never reaches memory: grouping makes it a stage of the contraction reading it
(a ``dequant`` kernel, ``passes/group_kernels.py``) and the CPU schedules dequantize a few rows
of it at a time for a GEMV, a panel at a time for a GEMM (``codegen/schedules/cpu.py``).
``canonicalize`` never folds it back into a float weight (integer weights are never unpacked).

``compute=int8`` (4-bit formats on an x86 CPU) instead quantizes the activations too and
contracts integers (``passes/quantize_int8.py``); a weight it cannot take this way is read as
above and counted as ``int8:<reason>``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from ..errors import EinfuseError
from ..ir import Access, Call, Cascade, Einsum, Index, IVar, TensorDecl, TensorRank, interpret, parse
from ..ir.quant_formats import FORMATS, Stored, quantize_weight
from ..ir.scope import declarations, expr_vars, fresh_name, gathers, lhs_vars, reads, reduced_vars, var_ranks
from .awq import search
from .quantize_int8 import int8_read, refusal
from .manager import Pass, PassContext, register


METHODS = ("rtn", "awq")
COMPUTES = ("f32", "int8")


@register
@dataclass(frozen=True)
class Quantize(Pass):
    """Store each contraction's constant weight quantized, read through its dequantization."""

    name = "quantize"
    format: str = "q4_0"
    method: str = "rtn"   # (rtn: round to nearest; awq: scales searched on the example inputs, passes/awq.py)
    head: bool = False    # (quantize the LM head too)
    compute: str = "f32"  # (int8: activations quantized per block too, integer dot products: passes/quantize_int8.py)

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        if self.compute not in COMPUTES:
            raise EinfuseError(f"unknown quantized compute '{self.compute}'; known: {', '.join(COMPUTES)}")
        chosen = []
        for choice in choices(c, self.format, self.method, self.head):
            if choice.kept:
                ctx.stats[f"kept:{choice.kept}"] += 1
            else:
                chosen.append(choice)
        acts = calibration(c, ctx, chosen) if self.method == "awq" else {}
        now: dict[Einsum, Einsum] = {}
        for choice in chosen:
            e, w = now.get(choice.einsum, choice.einsum), choice.weight
            data = oriented(c, e, w)
            if self.method == "awq":
                searched = search(data, acts[w.tensor], self.format)
                ctx.stats["awq:rescaled"] += searched.alpha > 0
                stored = searched.stored
            else:
                stored = quantize_weight(data, self.format)
            why = "f32" if self.compute == "f32" else refusal(c, e, w, _variables(e, w), self.format, stored, ctx.target)
            if why:
                c, now[choice.einsum] = quantized_read(c, e, w, stored)
                if why != "f32":
                    ctx.stats[f"int8:{why}"] += 1
            else:
                c, now[choice.einsum] = int8_read(c, e, w, _variables(e, w), self.format, stored, ctx.target)
                ctx.stats["compute:int8"] += 1
            ctx.stats[f"quantized:{self.format}"] += 1
        return c


@dataclass(frozen=True)
class Choice:
    """A weight read of a contraction and why it stays in float (``""``: it is quantized)."""

    einsum: Einsum
    weight: Access
    kept: str


def choices(c: Cascade, fmt: str, method: str = "rtn", head: bool = False) -> list[Choice]:
    """Every parameter read of every contraction of ``c``, with the quantize pass's decision."""
    if fmt not in FORMATS:
        raise EinfuseError(f"unknown quantization format '{fmt}'; known: {', '.join(FORMATS)}")
    if method not in METHODS:
        raise EinfuseError(f"unknown quantization method '{method}'; known: {', '.join(METHODS)}")
    readers = Counter(a.tensor for e, _ in c.einsums() for a in reads(e))
    reading = [(e, _weights(c, e)) for e in c.stmts if isinstance(e, Einsum)]
    reading = [(e, ws) for e, ws in reading if ws]
    vocab = set() if head else _table_rows(c)   # (the LM head: the last contraction, as many outputs as a table's rows)
    return [Choice(e, w, _refusal(c, w, e, readers, FORMATS[fmt][0], vocab if e is reading[-1][0] else set()))
            for e, ws in reading for w in ws]


def calibration(c: Cascade, ctx: PassContext, chosen: list[Choice]) -> dict[str, np.ndarray]:
    """Each chosen weight's activations on the example inputs, ``[rows, k]``: the other operand
    of its contraction, copied out by an Einsum of the contraction's row variables and ``k``."""
    if ctx.inputs is None:
        raise EinfuseError("quantize{method=awq} calibrates on example inputs: give them "
                           "(einfuse.compile(model, args, ...) passes its args)")
    ranks, extra, tensors = var_ranks(c), [], []
    for ch in chosen:
        out_var, red_var = _variables(ch.einsum, ch.weight)
        operand = next(a for a in ch.einsum.rhs.args if a != ch.weight)   # type: ignore[union-attr]
        row_vars = [v for v in lhs_vars(ch.einsum) if v != out_var and v in expr_vars(operand)]
        name = fresh_name(f"{ch.weight.tensor}_calibration", {t.name for t in c.tensors} | {t.name for t in tensors})
        tensors.append(TensorDecl(name, tuple(TensorRank(ranks[v]) for v in (*row_vars, red_var)), "output", "f64"))
        extra.append(Einsum(Access(name, tuple(Index(IVar(v)) for v in (*row_vars, red_var))), operand))
    marked = replace(c, tensors=c.tensors + tuple(tensors), stmts=c.stmts + tuple(extra))
    values = interpret(marked, ctx.inputs)
    return {ch.weight.tensor: values[t.name].reshape(-1, values[t.name].shape[-1]) for ch, t in zip(chosen, tensors)}


def _table_rows(c: Cascade) -> set:
    """The row counts of the embedding tables of ``c``: parameters read through a gather."""
    size = {r.name: r.size for r in c.ranks}
    decls = declarations(c)
    return {size[decls[a.tensor].ranks[0].rank] for e, _ in c.einsums() for a in reads(e)
            if decls[a.tensor].role == "param" and a.indices and list(gathers(a))}


def _weights(c: Cascade, e: Einsum) -> list[Access]:
    """The parameter reads of contraction ``e`` (none if ``e`` is not a product that reduces)."""
    if not reduced_vars(e) or not isinstance(e.rhs, Call) or e.rhs.op != "mul":
        return []
    decls = declarations(c)
    return [a for a in e.rhs.args if isinstance(a, Access) and decls[a.tensor].role == "param"]


def _refusal(c: Cascade, w: Access, e: Einsum, readers: Counter, block: int, vocab: set) -> str:
    """Why weight read ``w`` of ``e`` is kept in float (``vocab``: the LM head's output sizes
    when it is kept), or ``""``."""
    decls, size = declarations(c), {r.name: r.size for r in c.ranks}
    names = [ix.expr.name if isinstance(ix.expr, IVar) and not ix.filter else None for ix in w.indices]
    if w.tensor not in c.params:
        return "no-data"
    if len(names) != 2 or None in names:
        return "not-a-matrix"
    if readers[w.tensor] != 1:
        return "shared"
    if not decls[w.tensor].dtype.startswith("f"):
        return "not-float"
    reduced = [v for v in names if v in reduced_vars(e)]
    if len(reduced) != 1 or not any(v in lhs_vars(e) for v in names):
        return "not-a-linear"
    out_var = next(v for v in names if v not in reduced)
    if size[var_ranks(c)[out_var]] in vocab:
        return "lm-head"
    k = size[var_ranks(c)[reduced[0]]]
    return "" if isinstance(k, int) and k >= block else "short-reduction"


def _variables(e: Einsum, w: Access) -> tuple[str, str]:
    """The output channel's and the reduction's variables of ``e``'s read of weight ``w``."""
    first, second = (ix.expr.name for ix in w.indices)   # type: ignore[union-attr]
    return (first, second) if second in reduced_vars(e) else (second, first)


def oriented(c: Cascade, e: Einsum, w: Access) -> np.ndarray:
    """Weight ``w``'s data as ``[n, k]`` (output channel, reduction)."""
    out_var, _ = _variables(e, w)
    first = w.indices[0].expr.name   # type: ignore[union-attr]
    return c.params[w.tensor] if out_var == first else c.params[w.tensor].T


def read_imported(c: Cascade, weights: Mapping[str, Stored]) -> Cascade:
    """``c`` with each parameter ``weights`` names read through its given stored form (weights
    quantized before capture: torchao, GGUF), each quantized along its last dimension, which its
    one contraction must reduce; raises :class:`EinfuseError` naming a weight that cannot be."""
    readers, left = Counter(a.tensor for e, _ in c.einsums() for a in reads(e)), dict(weights)
    for e in [s for s in c.stmts if isinstance(s, Einsum)]:
        for weight in [w for w in _weights(c, e) if w.tensor in left]:
            reason = _refusal(c, weight, e, readers, 1, set())
            if not reason and _variables(e, weight)[1] != weight.indices[1].expr.name:   # type: ignore[union-attr]
                reason = "reduced over its first dimension"
            if reason:
                raise EinfuseError(f"the pre-quantized weight '{weight.tensor}' cannot be read quantized ({reason})")
            c, e = quantized_read(c, e, weight, left.pop(weight.tensor))
    if left:
        raise EinfuseError(f"no contraction reads the pre-quantized weight {', '.join(map(repr, sorted(left)))} as a "
                           "Linear reads its weight (load it as float)")
    return c


def quantized_read(c: Cascade, e: Einsum, w: Access, stored: Stored) -> tuple[Cascade, Einsum]:
    """``c`` with ``e``'s read of weight ``w`` replaced by its dequantization from ``stored``
    (:func:`einfuse.ir.quant_formats.quantize_weight`'s arrays, reduction-major), and ``e`` as it is now."""
    decls, ranks = declarations(c), var_ranks(c)
    out_var, red_var = _variables(e, w)
    base = w.tensor
    while any(f"{base}_{suffix}" in decls for suffix in (*stored.arrays, "dq")):
        base += "_"
    taken, names = {r.name for r in c.ranks}, {"n": ranks[out_var], "k": ranks[red_var]}
    for suffix, (array, _) in stored.arrays.items():
        if array.ndim == 2:
            names[suffix] = fresh_name(f"{base}_{suffix}".upper(), taken)
            taken.add(names[suffix])
    piece = parse(stored.text(base, (out_var, red_var), names, {r.name: r.size for r in c.ranks}))
    new_ranks = tuple(r for r in piece.ranks if r.name not in {x.name for x in c.ranks})
    params = {k: v for k, v in c.params.items() if k != w.tensor}   # (read by this Einsum alone: the float weight is gone)
    params.update({f"{base}_{suffix}": array for suffix, (array, _) in stored.arrays.items()})
    dequant = piece.tensors[-1].name
    first = w.indices[0].expr.name   # type: ignore[union-attr]
    indices = w.indices if red_var == first else w.indices[::-1]
    reader = replace(e, rhs=replace(e.rhs, args=tuple(Access(dequant, indices) if a == w else a
                                                      for a in e.rhs.args)))   # type: ignore[union-attr]
    temp = replace(piece.tensors[-1], role="temp")
    at = c.stmts.index(e)
    kept = tuple(t for t in c.tensors if t.name != w.tensor)
    c = replace(c, ranks=c.ranks + new_ranks, tensors=kept + piece.tensors[:-1] + (temp,),
                params=params, stmts=c.stmts[:at] + (piece.stmts[0], reader) + c.stmts[at + 1:])
    return c, reader
