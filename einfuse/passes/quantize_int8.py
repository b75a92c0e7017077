"""``quantize{compute=int8}``: a 4-bit weight's contraction on integer dot products (issue 19).

Where ``quantize`` (``passes/quantize.py``) reads a quantized weight through its dequantization
to float32, ``compute=int8`` also quantizes the activations, to int8 per block of the weight's
(llama.cpp's ``q8_0``; ONNX Runtime's ``MatMulNBits accuracy_level=4``), and contracts the
integers: one int32 dot product a block (VNNI's ``vpdpbusd``), scaled by the weight's scale and
the activations'. The IR it writes and the weight's layout: :mod:`einfuse.ir.int8_dot`; the kernel:
``codegen/int8_dot.py``. It is an approximation of the float contraction, as ORT's level 4 is:
the activations' rounding adds an error of about 1/254 of each block's largest value.

For ``q4_0`` and ``int4-gG`` (G a multiple of 32) weights on an x86 CPU with AVX2 or AVX-512 VNNI
(:func:`einfuse.targets.int8_isa`), read by a contraction ``Y[rows..., n] = X[..] * W`` (``Y``'s
indices plain, ``n`` last; ``X`` read as ``[rows..., k]`` where its indices allow, else through a copy
``X_rows[rows..., k]``, as a reshaped attention output is), static sizes, ``k`` whole blocks and ``n``
whole vectors; any other weight keeps the float contraction, counted as ``int8:<reason>``.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..ir import Access, Call, Cascade, Einsum, IConst, Index, IVar, Rank, TensorDecl, TensorRank, parse
from ..ir.int8_dot import pack
from ..ir.text import index_text
from ..ir.quant_formats import FORMATS, Stored
from ..ir.scope import declarations, fresh_name, gathers, index_vars, var_ranks
from ..targets import Target, int8_isa

FORMATS_INT8 = ("q4_0", "int4-g32", "int4-g64", "int4-g128")


def lanes(target: Target) -> int:
    """The int32 lanes of ``target``'s integer dot product."""
    return 16 if int8_isa(target) == "avx512" else 8


def refusal(c: Cascade, e: Einsum, w: Access, variables: tuple[str, str], fmt: str, stored: Stored,
            target: Target) -> str:
    """Why ``e``'s read of weight ``w`` (``stored`` in ``fmt``; ``variables``: its output channel's
    and reduction's) keeps the float contraction, or ``""``."""
    if fmt not in FORMATS_INT8:
        return "format"
    if int8_isa(target) is None:
        return "target"
    if stored.along_k:
        return "awq"
    out_var, red = variables
    if _operand(c, e, w, variables) is None:
        return "operand"
    size, ranks = {r.name: r.size for r in c.ranks}, var_ranks(c)
    if not all(isinstance(size[ranks[v]], int) for v in (out_var, red)):
        return "dynamic-size"   # (symbolic rows are fine; symbolic channels or reduction are not)
    if size[ranks[out_var]] % lanes(target):
        return "channels"
    block, k = FORMATS[fmt][0], size[ranks[red]]
    return "" if isinstance(k, int) and k % block == 0 else "partial-block"


def _var(ix: object) -> str:
    return ix.expr.name   # type: ignore[attr-defined]


def _operand(c: Cascade, e: Einsum, w: Access, variables: tuple[str, str]) -> Access | None:
    """The activations ``X`` of ``Y[rows..., n] = X[..] * W[n, k]`` (``Y`` plain, ``n`` last; ``X``
    indexed by the rows' variables and ``k`` alone, without filters or gathers), or None."""
    if e.reduce is not None or e.populate or not isinstance(e.rhs, Call) or len(e.rhs.args) != 2:
        return None
    x = next(a for a in e.rhs.args if a != w)
    if not isinstance(x, Access) or declarations(c)[x.tensor].dtype != "f32":
        return None
    if not all(isinstance(ix.expr, IVar) and not ix.filter for ix in e.lhs.indices) or len(e.lhs.indices) < 2:
        return None
    (out_var, red), ys = variables, [_var(ix) for ix in e.lhs.indices]
    used = {v for ix in x.indices for v in index_vars(ix)}
    simple = not any(ix.filter for ix in x.indices) and not any(True for _ in gathers(x))
    ok = ys[-1] == out_var and len(set(ys)) == len(ys) and red not in ys and red in used <= {*ys[:-1], red}
    return x if ok and simple else None


def _direct(c: Cascade, x: Access, rows: list[str], red: str) -> bool:
    """Whether the kernel reads ``X`` as it is, flat ``[rows, k]``: ``k`` innermost, the other
    indices ``Y``'s row variables in their order (dimensions of size one aside: a variable or 0 there)."""
    decl, size, of = declarations(c)[x.tensor], {r.name: r.size for r in c.ranks}, var_ranks(c)
    if x.indices[-1].expr != IVar(red) or size[of[red]] != size[decl.ranks[-1].rank] or any(r.iterative for r in decl.ranks):
        return False
    lead = []
    for ix, dim in zip(x.indices[:-1], decl.ranks):
        if isinstance(ix.expr, IVar) and size[of[ix.expr.name]] == size[dim.rank]:
            lead.append(ix.expr.name)
        elif not (ix.expr == IConst(0) and size[dim.rank] == 1):
            return False
    return [v for v in lead if size[of[v]] != 1] == [v for v in rows if size[of[v]] != 1]


def _copied(c: Cascade, e: Einsum, x: Access, rows: list[str], red: str) -> tuple[Cascade, Einsum, Access]:
    """``c`` with ``X_rows[rows.., k] = X[..]`` before ``e``, which reads that instead of ``X``
    (the kernel's flat operand); ``e`` and the new read."""
    of = var_ranks(c)
    name = fresh_name(f"{x.tensor}_rows", {t.name for t in c.tensors})
    plain = Access(name, tuple(Index(IVar(v)) for v in [*rows, red]))
    copy = Einsum(plain, x, provenance=e.provenance)
    read = replace(e, rhs=replace(e.rhs, args=tuple(plain if a == x else a for a in e.rhs.args)))
    decl = TensorDecl(name, tuple(TensorRank(of[v]) for v in [*rows, red]))
    at = c.stmts.index(e)
    stmts = c.stmts[:at] + (copy, read) + c.stmts[at + 1:]
    return replace(c, tensors=c.tensors + (decl,), stmts=stmts), read, plain


def integers(stored: Stored, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``stored``'s 4-bit values ``[n, k]``, scales and zero points (``[n, blocks]``; None: q4_0's 8)."""
    p = stored.arrays["p"][0].T
    low, high = p & 15, p >> 4
    if fmt == "q4_0":   # (llama.cpp's block: byte j holds elements j and j + 16)
        n = p.shape[0]
        q = np.concatenate([low.reshape(n, -1, 16), high.reshape(n, -1, 16)], axis=2).reshape(n, -1)
        return q, stored.arrays["d"][0].T, None
    q = np.stack([low, high], axis=2).reshape(p.shape[0], -1)   # (element k in byte k // 2, the low nibble first)
    return q, stored.arrays["s"][0].T, stored.arrays["z"][0].T


def int8_read(c: Cascade, e: Einsum, w: Access, variables: tuple[str, str], fmt: str, stored: Stored,
              target: Target) -> tuple[Cascade, Einsum]:
    """``c`` with contraction ``e`` (its weight ``w`` stored as ``stored``) computed on int8
    activations and the weight's integers (:mod:`einfuse.ir.int8_dot`), and the contraction as it is now."""
    x = _operand(c, e, w, variables)
    assert x is not None, "int8_read of a contraction refusal() refuses"
    (out_var, red), rows = variables, [_var(ix) for ix in e.lhs.indices[:-1]]
    if not _direct(c, x, rows, red):
        c, e, x = _copied(c, e, x, rows, red)
    block, L = FORMATS[fmt][0], lanes(target)
    q, scale, zero = integers(stored, fmt)
    packed, per_block = pack(q, [scale] if zero is None else [scale, zero], block, L)
    scale_name = "d" if zero is None else "s"
    arrays = {"p": (packed, "u8"), scale_name: (per_block[0], stored.arrays[scale_name][1]),
              **({} if zero is None else {"z": (per_block[1], "u8")})}
    taken = {t.name for t in c.tensors}
    base = w.tensor
    while any(f"{base}_{suffix}" in taken for suffix in "pdsz"):
        base += "_"
    ranks, new = _ranks(c, base, q.shape, block, L)
    amax, xq = fresh_name(f"{x.tensor}_amax", taken), fresh_name(f"{x.tensor}_q", taken)
    piece = parse(_text(c, e, x, out_var, base, arrays, (amax, xq), ranks, new, block, L))
    decls = {t.name: t for t in piece.tensors}
    before = declarations(c)
    output = () if e.lhs.tensor in taken else (before[e.lhs.tensor],)   # (an inferred temp: inferred i8 now)
    tensors = tuple(t for t in c.tensors if t.name != w.tensor) + output + tuple(
        replace(decls[t], role="temp") if t in (amax, xq) else decls[t] for t in [f"{base}_{s}" for s in arrays] + [amax, xq])
    params = {name: a for name, a in c.params.items() if name != w.tensor}
    params.update({f"{base}_{s}": a for s, (a, _) in arrays.items()})
    stmts = tuple(replace(s, provenance=e.provenance) for s in piece.stmts[:2]) + (
        replace(piece.stmts[2], provenance=e.provenance, lhs=e.lhs),)
    at = c.stmts.index(e)
    c = replace(c, ranks=tuple(ranks), tensors=tensors, params=params, stmts=c.stmts[:at] + stmts + c.stmts[at + 1:])
    return c, stmts[-1]


def _ranks(c: Cascade, base: str, shape: tuple[int, int], block: int, L: int) -> tuple[list[Rank], dict[str, str]]:
    """``c``'s ranks and the new ones (by role: ``kb`` blocks, ``ki`` within a block, ``t``, ``j``,
    ``byte``, ``lane`` the packed weight's), named after ``base``."""
    ranks, taken, new = list(c.ranks), {r.name for r in c.ranks}, {}
    n, k = shape
    for role, size in (("kb", k // block), ("ki", block), ("t", n // L), ("j", block // 8), ("byte", 4 * L), ("lane", L)):
        new[role] = fresh_name(f"{base}_{role}".upper(), taken)
        taken.add(new[role])
        ranks.append(Rank(new[role], size))
    return ranks, new


def _text(c: Cascade, e: Einsum, x: Access, out_var: str, base: str, arrays: dict, temps: tuple[str, str],
          ranks: list[Rank], new: dict[str, str], block: int, L: int) -> str:
    """The cascade text of the three Einsums (:mod:`einfuse.ir.int8_dot`'s docstring), the
    temps over ``Y``'s rows, ``X`` read at its own row indices (:func:`_direct`)."""
    amax, xq = temps
    of = var_ranks(c)
    rows, red = [_var(ix) for ix in e.lhs.indices[:-1]], _var(x.indices[-1])
    row_ranks = [of[v] for v in rows]
    x_ranks = [d.rank for d in declarations(c)[x.tensor].ranks]
    used = {*row_ranks, *x_ranks, of[red], of[out_var], *new.values()}
    r, h, b, i = ",".join(rows), block // 2, new["kb"].lower(), new["ki"].lower()
    at = "".join(index_text(ix) + "," for ix in x.indices[:-1])   # (X's row indices)
    nibble = f"bitand(shr({base}_p[{out_var}//{L},{b},{i}%{h}//4,4*({out_var}%{L})+{i}%4], 4*idx({i}//{h})), 15)"
    per_block = f"[{out_var}//{L},{b},{out_var}%{L}]"
    zero = f"f32({base}_z{per_block})" if "z" in arrays else "8"
    scale = f"f32({base}_{'s' if 'z' in arrays else 'd'}{per_block})"
    inverse = f"where({amax}[{r},{red}//{block}] > 0, 127 / {amax}[{r},{red}//{block}], 0)"
    return "\n".join([
        f"cascade {base}_int8",
        "rank " + ", ".join(f"{rk.name}={rk.size}" for rk in ranks if rk.name in used),
        f"tensor {x.tensor}[{','.join(x_ranks)}] input f32",
        f"tensor {base}_p[{new['t']},{new['kb']},{new['j']},{new['byte']}] param u8",
        *[f"tensor {base}_{s}[{new['t']},{new['kb']},{new['lane']}] param {dt}" for s, (_, dt) in arrays.items() if s != "p"],
        f"tensor {amax}[{','.join(row_ranks + [new['kb']])}] output f32",
        f"tensor {xq}[{','.join(row_ranks + [of[red]])}] output i8",
        f"tensor {e.lhs.tensor}[{','.join(row_ranks + [of[out_var]])}] output f32",
        f"{amax}[{r},{b}] = abs({x.tensor}[{at}{b}*{block}+{i}]) :: reduce[{i}] max",
        f"{xq}[{r},{red}] = i8(round(f32({x.tensor}[{at}{red}] * f32({inverse}))))",
        f"{e.lhs.tensor}[{r},{out_var}] = {xq}[{r},{b}*{block}+{i}] * ({nibble} - {zero}) * {scale}"
        f" * f32({amax}[{r},{b}] / 127)", ""])
