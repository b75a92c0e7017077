"""``fuse-attention``: attention as FuseMax's 1-pass cascade (FlashAttention-2), derived by rewriting.

What: finds attention written the ordinary way, whatever it was captured from (SDPA, or the eager
``softmax(Q K^T * scale + bias) V`` of GPT-2, Llama, BERT, ViT: causal or padding masks as an
additive bias or as a filter on the scores (``QK[r,k:k<=s]``, kept on the tiled scores), GQA as ``h//G`` in K's index, any batch and head ranks),

    QK[r,k] = Q[..e..] * K[..k..e..]          scores (r: batch, head and query variables)
    MK[r,k] = QK[r,k] * c + BIAS[..]          any element-wise chain of QK
    MX[r]   = MK[r,k] :: reduce[k] max        pass 1 over the keys
    EX[r,k] = exp(MK[r,k] - MX[r])
    SM[r]   = EX[r,k]                         pass 2
    P[r,k]  = EX[r,k] / SM[r]
    O[r,f]  = P[r,k] * V[..k..f..]            pass 3

and rewrites it to FuseMax Cascade 5 (EINSUM_CASCADES.md §2.4): the keys split into tiles
``k = t*T + i`` (``t`` iterative), a running max ``RM``, denominator ``RD`` and numerator x V
``RNV`` carried across tiles (R2, the online rebase), and the division deferred to the end (R1):

    RM[0,r] = -inf;  RD[0,r] = 0;  RNV[0,r,f] = 0
    for t in T {
      BQK[t,r,i:t*T+i<N] = (Q * K[..t*T+i..]) * c + BIAS[..t*T+i..]     (keys past N are absent)
      LM[t,r] = BQK[t,r,i] :: reduce[i] max;   RM[t+1,r] = max(RM[t,r], LM[t,r])
      SLN[t,r,i] = exp(BQK[t,r,i] - RM[t+1,r]);   SLD[t,r] = SLN[t,r,i]
      SLNV[t,r,f] = SLN[t,r,i] * V[..t*T+i..f..];   PRM[t,r] = exp(RM[t,r] - RM[t+1,r])
      RD[t+1,r] = SLD[t,r] + RD[t,r] * PRM[t,r];   RNV[t+1,r,f] = SLNV[t,r,f] + RNV[t,r,f] * PRM[t,r]
    }
    O[r,f] = RNV[T,r,f] / RD[T,r]

Why: the 3-pass form reads the N x N scores three times and keeps them in memory; the 1-pass
form touches each key tile once (``count_passes`` over the keys: 3 -> 1). FuseMax §III-C, §IV-E.

The tile ``T`` is the target's choice (``Target.attention_tile``: on a CPU the tile the cost
model estimates fastest for these widths and this length, see docs/tuning.md) or an option
(``fuse-attention{tile=128}``); the target is the pass context's (``einfuse ir --target``). Patterns counted: ``attention`` (fused),
and ``not-fused:<reason>`` for an attention-shaped Einsum that was left alone (symbolic key
length, scores read outside the attention, ...). The old Einsums become dead; ``canonicalize``
removes them. A row whose every key is masked gives what the original gives (see
``_normalized``): 0 where masked scores are absent (SDPA's), NaN where they are ``-inf`` values.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import sympy

from ..ir import Access, Call, Cascade, Const, Einsum, Index, IVar, Loop, Rank, TensorDecl
from ..ir.nodes import Cond, IBin, IConst, ISym, Reduce, TensorRank, rewrite
from ..ir.scope import access_vars, declarations, fresh_name, lhs_vars, plain, reads, reduced_vars, var_ranks
from ..targets import Target
from .manager import Pass, PassContext, register


@dataclass(frozen=True)
class _Match:
    """The parts of one attention: its output Einsum, scores expression and operands."""

    out: Einsum                 # O[r,f] = P[r,k] * V
    key: str                    # k
    rows: list[str]             # r, in MX's order
    qk: Einsum                  # QK[r,k] = Q * K :: sum over e
    score: Any                  # MK's expression with the element-wise chain from QK inlined
    value: Access               # V's access
    group: set[str]             # the temps the attention computes
    absent: bool                # masked scores are absent points (MK has empty=-inf), not -inf values
    original: Einsum | None = None   # the statement ``out`` stands for, if its variables were renamed
    ranks: tuple[Rank, ...] = ()     # the ranks the renaming added
    read_rows: tuple = ()            # where ``out`` reads P's rows (a squeezed batch of one: 0)


@register
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Rewrite each 3-pass attention into the 1-pass tiled cascade."""

    name = "fuse-attention"
    tile: int = 0          # keys per tile; 0: the target's choice (Target.attention_tile)

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        stats = ctx.stats
        done: set[str] = set()
        while True:
            found = _find(c, stats, done)
            if found is None:
                return c
            c = replace(c, ranks=c.ranks + found.ranks)   # (those the renaming of its output Einsum added)
            c = _rewrite(c, found, self.tile or _target_tile(c, found, ctx.target))
            done.add(found.out.lhs.tensor)
            stats["attention"] += 1


def _target_tile(c: Cascade, m: _Match, target: Target) -> int:
    """The target's tile for this attention's head and value widths (64 where symbolic) and key
    length."""
    size, ranks = {r.name: r.size for r in c.ranks}, var_ranks(c)

    def width(variables: list[str]) -> int:
        n = 1
        for v in variables:
            n *= size[ranks[v]] if isinstance(size[ranks[v]], int) else 64
        return n
    values = [v for v in lhs_vars(m.out) if v not in m.rows]
    keys = size[ranks[m.key]]
    return target.attention_tile(width(reduced_vars(m.qk)), width(values), keys if isinstance(keys, int) else None)


def _find(c: Cascade, stats: Counter, done: set[str]) -> _Match | None:
    writers: dict[str, list[Einsum]] = {}
    readers: Counter = Counter()
    for e, _ in c.einsums():
        writers.setdefault(e.lhs.tensor, []).append(e)
        for a in reads(e):
            readers[a.tensor] += 1
    for s in c.stmts:
        if isinstance(s, Einsum) and s.lhs.tensor not in done:
            found = _match(c, s, writers, readers, stats)
            if found is not None:
                return found
    return None


def _writer(name: str, writers: dict[str, list[Einsum]]) -> Einsum | None:
    ws = writers.get(name, [])
    return ws[0] if len(ws) == 1 else None


def _match(c: Cascade, o: Einsum, writers: dict, readers: Counter, stats: Counter) -> _Match | None:
    """The attention whose output is ``o``, or None."""
    if o.reduce is not None or len(reduced_vars(o)) != 1 or not isinstance(o.rhs, Call) or o.rhs.op != "mul" \
            or len(o.rhs.args) != 2 or not all(isinstance(a, Access) for a in o.rhs.args):
        return None
    for i in (0, 1):
        aligned, added = _aligned(c, o, o.rhs.args[i], writers)
        p, v = aligned.rhs.args[i], aligned.rhs.args[1 - i]   # type: ignore[union-attr]
        key = reduced_vars(aligned)[0]
        chain = _softmax(p, key, writers)
        if chain is None:
            continue
        mk, mx_name, group = chain
        rows = lhs_vars(_writer(mx_name, writers))
        score, qk = _scores(mk, key, writers, group)
        if qk is None:
            stats["not-fused:scores-not-a-contraction"] += 1
            return None
        roles = {name: d.role for name, d in declarations(c).items()}
        if any(readers[t] > _uses_inside(t, group | {o.lhs.tensor}, writers) or roles[t] != "temp" for t in group):
            stats["not-fused:intermediate-read-elsewhere"] += 1
            return None
        pw = _writer(p.tensor, writers)
        at = {w.expr.name: ix.expr for w, ix in zip(pw.lhs.indices, p.indices) if isinstance(w.expr, IVar)}
        return _Match(aligned, key, rows, qk, score, v, group, declarations(c)[mk.tensor].empty == -math.inf,
                      None if aligned is o else o, added, tuple(at.get(r, IVar(r)) for r in rows))
    return None


def _aligned(c: Cascade, o: Einsum, p: Access, writers: dict) -> tuple[Einsum, tuple[Rank, ...]]:
    """``o`` with its variables renamed (it computes the same) so that those indexing ``P`` are
    named as ``P``'s writer names them, as the softmax chain is matched by name; one of ``o``'s own
    (a value's) whose name that takes becomes a fresh variable of a new rank of its size. (The
    frontend names variables by size, so where the keys are as many as a head's width the two
    Einsums name them differently.)"""
    pw = _writer(p.tensor, writers)
    if pw is None:
        return o, ()
    mapping = {ix.expr.name: wx.expr.name for ix, wx in zip(p.indices, pw.lhs.indices)
               if isinstance(ix.expr, IVar) and isinstance(wx.expr, IVar)}
    if all(k == v for k, v in mapping.items()):
        return o, ()
    ranks, size = var_ranks(c), {r.name: r.size for r in c.ranks}
    taken, added = set(mapping.values()), []
    for v in dict.fromkeys(lhs_vars(o) + reduced_vars(o)):
        if v not in mapping and v in taken:
            rank = Rank(fresh_name(ranks[v], set(size) | {r.name for r in added}), size[ranks[v]])
            added.append(rank)
            mapping[v] = rank.var
    return rewrite(o, lambda x: IVar(mapping[x.name]) if isinstance(x, IVar) and x.name in mapping else x), tuple(added)


def _softmax(p: Access, key: str, writers: dict) -> tuple[Access, str, set[str]] | None:
    """For ``P = EX / SM`` (the softmax over ``key``): (its input ``MK`` access, MX's name, temps)."""
    pw = _writer(p.tensor, writers)
    if pw is None or pw.reduce or not _is_call(pw.rhs, "div", Access, Access):
        return None
    ex, sm = pw.rhs.args
    exw, smw = _writer(ex.tensor, writers), _writer(sm.tensor, writers)
    if exw is None or smw is None or not _is_call(exw.rhs, "exp", None):
        return None
    if smw.reduce is not None or reduced_vars(smw) != [key] or not isinstance(smw.rhs, Access) \
            or smw.rhs.tensor != ex.tensor:
        return None
    shift, group = exw.rhs.args[0], {p.tensor, ex.tensor, sm.tensor}
    if isinstance(shift, Access):
        sw = _writer(shift.tensor, writers)
        if sw is None:
            return None
        group.add(shift.tensor)
        shift = sw.rhs
    if not _is_call(shift, "sub", Access, Access):
        return None
    mk, mx = shift.args
    mxw = _writer(mx.tensor, writers)
    if mxw is None or mxw.reduce is None or mxw.reduce.op != "max" or list(mxw.reduce.vars) != [key] \
            or not isinstance(mxw.rhs, Access) or mxw.rhs.tensor != mk.tensor:
        return None
    return mk, mx.tensor, group | {mx.tensor}


def _scores(mk: Access, key: str, writers: dict, group: set[str]) -> tuple[Any, Einsum | None]:
    """MK's expression with its element-wise chain inlined down to the ``Q K`` contraction."""
    expr: Any = mk
    qk = None
    for _ in range(8):  # the chain is short: scale, mask, cast
        temps = [a for a in _accesses(expr) if _writer(a.tensor, writers) is not None]
        contraction = [a for a in temps if reduced_vars(_writer(a.tensor, writers))]
        maps = [a for a in temps if a not in contraction and plain(a) and a.tensor not in group
                and _writer(a.tensor, writers).lhs == a and key in access_vars(a)]
        if len(contraction) == 1 and not maps:
            w = _writer(contraction[0].tensor, writers)
            if key in lhs_vars(w) and _is_product(w.rhs) and _unfiltered(w.lhs) == contraction[0] and w.reduce is None:
                qk = w
                group.add(w.lhs.tensor)
            break
        if not maps:
            break
        a = maps[0]
        group.add(a.tensor)
        expr = _substitute(expr, a, _writer(a.tensor, writers).rhs)
    group.add(mk.tensor)
    return expr, qk


def _rewrite(c: Cascade, m: _Match, tile: int) -> Cascade:
    """``c`` with the attention's output computed by the 1-pass cascade (old Einsums left dead)."""
    key_rank = var_ranks(c)[m.key]
    n = c.rank(key_rank).size
    static = isinstance(n, int)
    tile = min(tile, n) if static else tile
    tiles, inner = _fresh_ranks(c, key_rank)
    t, i = tiles.lower(), inner.lower()
    out = m.out.lhs.tensor
    names = {s: fresh_name(f"{out}_{s}", declarations(c)) for s in ("qk", "bqk", "lm", "rm", "rd", "rnv", "sln", "sld",
                                                           "slnv", "prm")}
    ranks = var_ranks(c)
    row_ranks = [TensorRank(ranks[v]) for v in m.rows]
    value_vars = [v for v in lhs_vars(m.out) if v not in m.rows]
    at = IBin("+", IBin("*", IVar(t), IConst(tile)), IVar(i))  # the key t*T+i
    rows = [Index(IVar(v)) for v in m.rows]
    step, prev, last = IBin("+", IVar(t), IConst(1)), Index(IVar(t)), Index(ISym(tiles))

    def acc(name: str, first: list[Index], extra: list[Index] | None = None) -> Access:
        return Access(names[name], tuple(first + rows + (extra or [])))
    vf = [Index(IVar(v)) for v in value_vars]
    mask = tuple(_at_key(cond, m.key, at) for ix in m.qk.lhs.indices for cond in ix.filter)  # causal
    qk_lhs = acc("qk", [Index(IVar(t))], [Index(IVar(i), mask)])
    keep = (Cond(at, "<", IConst(n) if static else ISym(key_rank)),) if not static or n % tile else ()
    bqk_lhs = Access(names["bqk"], (Index(IVar(t)), *rows, Index(IVar(i), keep)))
    decls = [TensorDecl(names["bqk"], (TensorRank(tiles), *row_ranks, TensorRank(inner)), "temp", "f32", float("-inf")),
             TensorDecl(names["lm"], (TensorRank(tiles), *row_ranks), "temp", "f32", float("-inf")),
             TensorDecl(names["rm"], (TensorRank(tiles, True), *row_ranks), "temp", "f32", float("-inf")),
             TensorDecl(names["rd"], (TensorRank(tiles, True), *row_ranks), "temp", "f32"),
             TensorDecl(names["rnv"], (TensorRank(tiles, True), *row_ranks, *[TensorRank(ranks[v]) for v in value_vars]),
                        "temp", "f32")]
    direct = m.score == _unfiltered(m.qk.lhs)   # the scores are the contraction itself: no copy
    if mask and not direct:
        qk_decl = declarations(c)[m.qk.lhs.tensor]
        decls.append(TensorDecl(names["qk"], (TensorRank(tiles), *row_ranks, TensorRank(inner)), "temp",
                                qk_decl.dtype, qk_decl.empty))
    exp, mul, add, sub = (lambda *a, op=op: Call(op, tuple(a)) for op in ("exp", "mul", "add", "sub"))
    rm_t, rm_next = Access(names["rm"], (prev, *rows)), Access(names["rm"], (Index(step), *rows))
    rd_t, rnv_t = Access(names["rd"], (prev, *rows)), Access(names["rnv"], (prev, *rows, *vf))
    bqk = acc("bqk", [Index(IVar(t))], [Index(IVar(i))])
    if direct:
        scores: tuple = (Einsum(replace(bqk_lhs, indices=(*bqk_lhs.indices[:-1], Index(IVar(i), mask + keep))),
                                _at_key(m.qk.rhs, m.key, at), provenance=m.qk.provenance),)
    else:
        scores = (Einsum(qk_lhs, _at_key(m.qk.rhs, m.key, at), provenance=m.qk.provenance),
                  Einsum(bqk_lhs, _at_key(_substitute(m.score, _unfiltered(m.qk.lhs), _unfiltered(qk_lhs)), m.key, at)))
    body = (
        *scores,
        Einsum(acc("lm", [prev]), bqk, Reduce((i,), "max")),
        Einsum(rm_next, Call("max", (rm_t, acc("lm", [prev])))),
        Einsum(acc("sln", [prev], [Index(IVar(i))]), exp(sub(bqk, rm_next))),
        Einsum(acc("sld", [prev]), acc("sln", [prev], [Index(IVar(i))])),
        Einsum(acc("slnv", [prev], vf), mul(acc("sln", [prev], [Index(IVar(i))]), _at_key(m.value, m.key, at))),
        Einsum(acc("prm", [prev]), exp(sub(rm_t, rm_next))),
        Einsum(Access(names["rd"], (Index(step), *rows)), add(acc("sld", [prev]), mul(rd_t, acc("prm", [prev])))),
        Einsum(Access(names["rnv"], (Index(step), *rows, *vf)), add(acc("slnv", [prev], vf), mul(rnv_t, acc("prm", [prev])))),
    )
    zero = Index(IConst(0))
    init = (Einsum(Access(names["rm"], (zero, *rows)), Const(float("-inf"))),
            Einsum(Access(names["rd"], (zero, *rows)), Const(0.0)),
            Einsum(Access(names["rnv"], (zero, *rows, *vf)), Const(0.0)))
    read = [Index(x) for x in m.read_rows] or rows
    final = replace(m.out, rhs=_normalized(Access(names["rnv"], (last, *read, *vf)), Access(names["rd"], (last, *read)),
                                           m.absent))
    stmts: list = []
    for s in c.stmts:
        stmts += [*init, Loop(tiles, body), final] if s is (m.original or m.out) else [s]
    new_ranks = (Rank(tiles, -(-n // tile) if static else sympy.ceiling(n / tile)), Rank(inner, tile))
    return replace(c, ranks=c.ranks + new_ranks, tensors=c.tensors + tuple(decls), stmts=tuple(stmts))


def _normalized(numerator: Access, denominator: Access, absent: bool) -> Call:
    """The output ``RNV / RD`` as the original gives a row whose every key is masked (no score
    present, so ``RD`` is 0 or absent): with masked scores absent (SDPA's, ``empty=-inf``) the
    original's output is absent there, 0, as ``RD == 0`` picks; with masked scores ``-inf``
    values (a spelled-out ``softmax(QK + mask)``) it is ``exp(-inf - -inf)``, NaN, as ``0 / 0``
    gives at every point (``@all``: here the tiles' scores are absent whatever the original had).
    Any other row has ``RD >= 1`` (its max's ``exp(0)``) or NaN."""
    if not absent:
        return Call("div", (numerator, denominator), merge="all")
    empty = Call("eq", (denominator, Const(0.0)))
    return Call("where", (empty, Const(0.0), Call("div", (numerator, denominator))))


# ---- small helpers ---------------------------------------------------------------------------

def _is_call(x: Any, op: str, *kinds: Any) -> bool:
    return isinstance(x, Call) and x.op == op and len(x.args) == len(kinds) and \
        all(k is None or isinstance(a, k) for a, k in zip(x.args, kinds))


def _is_product(x: Any) -> bool:
    """A product of accesses and constants (``Q * K * 0.125``)."""
    if isinstance(x, (Access, Const)):
        return True
    return isinstance(x, Call) and x.op == "mul" and all(_is_product(a) for a in x.args)


def _unfiltered(a: Access) -> Access:
    return replace(a, indices=tuple(Index(ix.expr) for ix in a.indices))


def _accesses(x: Any) -> list[Access]:
    if isinstance(x, Access):
        return [x]
    if isinstance(x, Call):
        return [a for arg in x.args for a in _accesses(arg)]
    return []


def _uses_inside(tensor: str, group: set[str], writers: dict) -> int:
    return sum(1 for t in group for w in writers.get(t, []) for a in reads(w) if a.tensor == tensor)


def _substitute(x: Any, old: Access, new: Any) -> Any:
    """``x`` with the access ``old`` replaced by the expression ``new``."""
    if x == old:
        return new
    if isinstance(x, Call):
        return replace(x, args=tuple(_substitute(a, old, new) for a in x.args))
    return x


def _at_key(node: Any, key: str, at: Any) -> Any:
    """``node`` with the key variable replaced by the index expression ``at`` everywhere."""
    return rewrite(node, lambda x: at if isinstance(x, IVar) and x.name == key else x)


def _fresh_ranks(c: Cascade, key: str) -> tuple[str, str]:
    """Names for the key's tile and in-tile ranks: ``S_2T``, ``S_2I`` (``S_2XT``... if taken)."""
    while c.rank(key + "T") is not None or c.rank(key + "I") is not None:
        key += "X"
    return key + "T", key + "I"
