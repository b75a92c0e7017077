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
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from ..errors import EinfuseError
from ..ir import Access, Call, Cascade, Einsum, IVar, Rank, parse
from ..ir.quant_formats import FORMATS, Stored, quantize_weight
from ..ir.scope import declarations, fresh_name, lhs_vars, reads, reduced_vars, var_ranks
from .manager import Pass, PassContext, register


@register
@dataclass(frozen=True)
class Quantize(Pass):
    """Store each contraction's constant weight quantized, read through its dequantization."""

    name = "quantize"
    format: str = "q4_0"

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        if self.format not in FORMATS:
            raise EinfuseError(f"unknown quantization format '{self.format}'; known: {', '.join(FORMATS)}")
        readers = Counter(a.tensor for e, _ in c.einsums() for a in reads(e))
        for e in [s for s in c.stmts if isinstance(s, Einsum)]:
            for weight in _weights(c, e):
                reason = _refusal(c, weight, e, readers, FORMATS[self.format][0])
                if reason:
                    ctx.stats[f"kept:{reason}"] += 1
                    continue
                c, e = quantized_read(c, e, weight, quantize_weight(_oriented(c, e, weight), self.format))
                ctx.stats[f"quantized:{self.format}"] += 1
        return c


def _weights(c: Cascade, e: Einsum) -> list[Access]:
    """The parameter reads of contraction ``e`` (none if ``e`` is not a product that reduces)."""
    if not reduced_vars(e) or not isinstance(e.rhs, Call) or e.rhs.op != "mul":
        return []
    decls = declarations(c)
    return [a for a in e.rhs.args if isinstance(a, Access) and decls[a.tensor].role == "param"]


def _refusal(c: Cascade, w: Access, e: Einsum, readers: Counter, block: int) -> str:
    """Why weight read ``w`` of ``e`` is kept in float, or ``""``."""
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
    k = size[var_ranks(c)[reduced[0]]]
    return "" if isinstance(k, int) and k >= block else "short-reduction"


def _variables(e: Einsum, w: Access) -> tuple[str, str]:
    """The output channel's and the reduction's variables of ``e``'s read of weight ``w``."""
    first, second = (ix.expr.name for ix in w.indices)   # type: ignore[union-attr]
    return (first, second) if second in reduced_vars(e) else (second, first)


def _oriented(c: Cascade, e: Einsum, w: Access) -> np.ndarray:
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
            reason = _refusal(c, weight, e, readers, 1)
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
    first, second = (ix.expr.name for ix in w.indices)   # type: ignore[union-attr]
    out_var, red_var = _variables(e, w)
    base = w.tensor
    while any(f"{base}_{suffix}" in decls for suffix in (*stored.arrays, "dq")):
        base += "_"
    new_ranks, decl_lines, params = [], [], dict(c.params)
    taken = {r.name for r in c.ranks}
    for suffix, (array, dtype) in stored.arrays.items():
        dims = [ranks[out_var]]
        if array.ndim == 2:   # ([k-ish, n])
            dims.insert(0, fresh_name(f"{base}_{suffix}".upper(), taken))
            taken.add(dims[0])
            new_ranks.append(Rank(dims[0], array.shape[0]))
        decl_lines.append(f"tensor {base}_{suffix}[{','.join(dims)}] param {dtype}")
        params[f"{base}_{suffix}"] = array
    dequant = f"{base}_dq"
    del params[w.tensor]   # (read by this Einsum alone: the float weight is gone)
    size = {r.name: r.size for r in c.ranks}
    used = {ranks[first], ranks[second]}
    text = "\n".join([f"cascade {dequant}", "rank " + ", ".join(f"{r}={size[r]}" for r in sorted(used)) +
                      "".join(f", {r.name}={r.size}" for r in new_ranks), *decl_lines,
                      f"tensor {dequant}[{ranks[red_var]},{ranks[out_var]}] output f32",   # (reduction-major)
                      f"{dequant}[{red_var},{out_var}] = " + stored.rhs.format(W=base, n=out_var, k=red_var)])
    piece = parse(text + "\n")
    indices = w.indices if red_var == first else w.indices[::-1]
    reader = replace(e, rhs=replace(e.rhs, args=tuple(Access(dequant, indices) if a == w else a
                                                      for a in e.rhs.args)))   # type: ignore[union-attr]
    temp = replace(piece.tensors[-1], role="temp")
    at = c.stmts.index(e)
    kept = tuple(t for t in c.tensors if t.name != w.tensor)
    c = replace(c, ranks=c.ranks + tuple(new_ranks), tensors=kept + piece.tensors[:-1] + (temp,),
                params=params, stmts=c.stmts[:at] + (piece.stmts[0], reader) + c.stmts[at + 1:])
    return c, reader
