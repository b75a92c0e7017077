"""``moe``: a mixture-of-experts block's rows sorted by expert, each expert's FFN one GEMM over
its contiguous rows (issue 22; Tutel's dispatch, MegaBlocks' dropless grouped GEMM, vLLM's
``fused_moe``, MLC's ``moe_gemv``).

**What it matches**, whatever ops wrote it (capture brings every transformers experts module to
this form, ``frontends/experts.py``): an *expert contraction*, a contraction whose weight is a
parameter stacked by expert and read through a gather of its leading index by the output's first
variable, the row ``r`` (a (token, slot) pair): ``H[r,n] = W[IDX[r//k,r%k],n,d] * X[r//k,d]``.
A *block* is the expert contractions sharing that gather (the FFN's up and down projections)
with the element-wise Einsums over ``r`` between them (the activation); the Einsums reading the
last contraction (the weighted combine) are outside it.

**The rewrite.** The block's rows are permuted so that each expert's rows are contiguous: its
Einsums run over sorted rows ``p``, its first operand is gathered into that order (``XS``), its
weights are read by the sorted expert ids (``SE``), and the readers outside read row ``r`` where
it went (``P[r]``). Rows within a block are independent, so the permuted block computes the same
values at permuted places: dropless mode is exact. Before/after (top-2)::

    H[r,n] = W1[IDX[r//2,r%2],n,d] * X[r//2,d]      EX[r]   = IDX[r//2,r%2]
    A[r,f] = silu(H[r,f]) * H[r,F+f]                K[r]    = EX[r] * R + idx(r%2) * T + idx(r//2)
    Z[r,o] = W2[IDX[r//2,r%2],o,f] * A[r,f]         P[r]    = K[r2] < K[r]
                                                    SRC[p]  = (idx(r) + 1) * (P[r] == idx(p))
    Y[t,o] = Z[t*2+j,o] * G[t,j]                    SE[p]   = EX[SRC[p]]
                                                    XS[p,d] = X[SRC[p]//2,d]
                                                    H[p,n]  = W1[SE[p],n,d] * XS[p,d]
                                                    A[p,f]  = silu(H[p,f]) * H[p,F+f]
                                                    Z[p,o]  = W2[SE[p],o,f] * A[p,f]
                                                    Y[t,o]  = Z[P[t*2+j],o] * G[t,j]

The key ``K`` orders rows by expert, then by Tutel's priority: every token's first choice
before any second choice, tokens in order within a slot. **Capacity mode** (``moe{mode=capacity,factor=1.25}``, Tutel's
``capacity_factor``): each expert has ``C = k * int(factor * ceil(T / E))`` rows, ``p = e*C + c``
(so ``SE[p] = p // C``); a row whose place in its expert's queue
(``Q[r]``: the rows before it, ``K[r2] < K[r]``, less those of lower experts,
``EX[r2] < EX[r]``) is ``C`` or more is dropped: its readers read row ``E*C``, out of range, which reads
as 0 (the IR's rule), so a dropped (token, slot) adds nothing, as in Tutel.

**Few rows** (fewer than ``sort_from``: decoding's one token) are not sorted: ``SE = EX``, each
row reads only its own expert's weights (MLC's ``moe_gemv``), and the bytes read are the active
experts' alone.

The sort is Einsums over row pairs (``(T k)^2`` comparisons: 0.26 M at 256 tokens, top-2).
Blocks it cannot rewrite are left as they are (they compile as gathers) and counted with the
reason (``moe:not rewritten: ...``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import sympy

from ..errors import CompileError
from ..ir import Access, Call, Cascade, Const, Coord, Einsum, IAccess, IBin, IConst, Index, ISym, IVar, Rank
from ..ir.nodes import Expr, IndexExpr, TensorDecl, TensorRank
from ..ir.scope import declarations, fresh_name, reads, reduced_vars, var_ranks
from ..ir.views import rename_index
from .manager import Pass, PassContext, register

MODES = ("dropless", "capacity")
PREFIX = "moe"   # a rewritten block's tensors: moe<i>_expert (each row's expert), moe<i>_place (where it went), ...
#: The routing tensors, outputs of the cascade (the last, after the model's own: a compiled model
#: returns them only to ``routing()``, for its report's experts section)
ROUTING = re.compile(rf"{PREFIX}\d+_(expert|place)")


@register
@dataclass(frozen=True)
class Moe(Pass):
    """Sort each mixture-of-experts block's rows by expert (module docstring)."""

    name = "moe"
    mode: str = "dropless"
    factor: float = 1.25     # capacity mode: Tutel's capacity factor
    sort_from: int = 16      # rows from which a block is sorted (fewer read their experts' weights row by row)

    def run(self, c: Cascade, ctx: PassContext) -> Cascade:
        if self.mode not in MODES:
            raise CompileError(f"moe: unknown mode '{self.mode}'; known: {', '.join(MODES)}")
        left: set[IndexExpr] = set()   # (the gathers of blocks left as they are)
        while (block := next((b for b in blocks(c) if b.gather not in left), None)) is not None:
            problem = block.problem(c)
            if problem:
                ctx.stats[f"moe:not rewritten: {problem}"] += 1
                left.add(block.gather)
                continue
            rows = block.rows(c)
            sort = not isinstance(rows, int) or rows >= self.sort_from
            mode = self.mode if sort else "unsorted"
            c = Rewrite(c, block, mode, self.factor).cascade()
            ctx.stats[f"moe:{mode}"] += 1
        return c


@dataclass(frozen=True)
class Block:
    """One MoE block: its row variable, the gather naming each row's expert, its Einsums (stmt
    indices, in order) and which of them are expert contractions."""

    row: str
    gather: IndexExpr
    members: tuple[int, ...]
    contractions: tuple[int, ...]

    def rows(self, c: Cascade) -> sympy.Expr | int:
        size = c.rank(var_ranks(c)[self.row]).size
        return int(size) if isinstance(size, int) or getattr(size, "is_Integer", False) else size

    def problem(self, c: Cascade) -> str | None:
        """Why the block cannot be rewritten (None: it can): its gather reading more than the row,
        an expert weight read past the expert by more than variables, or a member reading a
        tensor outside the block by its row other than an expert contraction's operand."""
        if _index_vars(self.gather) != {self.row}:
            return f"its expert gather reads more than the row {self.row}"
        for i in self.contractions:
            w = next(a for a in c.stmts[i].rhs.args if isinstance(a, Access) and a.indices[0].expr == self.gather)  # type: ignore[union-attr]
            if not all(isinstance(ix.expr, IVar) for ix in w.indices[1:]):
                return f"{w.tensor} is read past its expert by more than variables"
        inside = {c.stmts[i].lhs.tensor for i in self.members}   # type: ignore[union-attr]
        for i in self.members:
            e = c.stmts[i]
            if i in self.contractions:
                continue
            for a in reads(e):   # type: ignore[arg-type]
                if a.tensor not in inside and self.row in _vars(a):
                    return f"{e.lhs.tensor} reads {a.tensor} by the row"   # type: ignore[union-attr]
        return None


def blocks(c: Cascade) -> list[Block]:
    """The MoE blocks of ``c``, in order."""
    found: dict[tuple, list[int]] = {}
    for i, s in enumerate(c.stmts):
        key = _expert_key(c, s)
        if key is not None:
            found.setdefault(key, []).append(i)
    out = []
    for (row, gather), contractions in found.items():
        if re.fullmatch(rf"{PREFIX}\d+_(sorted_)?expert", gather.access.tensor):   # type: ignore[union-attr]
            continue   # (rewritten already)
        members = _members(c, row, contractions)
        if members is not None:
            out.append(Block(row, gather, members, tuple(contractions)))
    return out


def _expert_key(c: Cascade, s: object) -> tuple[str, IndexExpr] | None:
    """(row variable, gather) if ``s`` is an expert contraction."""
    if not isinstance(s, Einsum) or s.reduce is not None or s.populate or len(reduced_vars(s)) != 1 \
            or not isinstance(s.rhs, Call) or s.rhs.op != "mul" or not s.lhs.indices \
            or not isinstance(s.lhs.indices[0].expr, IVar):
        return None
    row = s.lhs.indices[0].expr.name
    decls = declarations(c)
    for a in s.rhs.args:
        if isinstance(a, Access) and decls[a.tensor].role == "param" and len(a.indices) >= 3:
            g = a.indices[0].expr
            if isinstance(g, IAccess) and row in _index_vars(g):
                return row, g
    return None


def _members(c: Cascade, row: str, contractions: list[int]) -> tuple[int, ...] | None:
    """The block's Einsums from its first contraction to its last: those reading the block's
    tensors and written over the row (element-wise in it); None if one reads them otherwise."""
    inside = {c.stmts[contractions[0]].lhs.tensor}   # type: ignore[union-attr]
    members = [contractions[0]]
    for i in range(contractions[0] + 1, contractions[-1] + 1):
        e = c.stmts[i]
        if not isinstance(e, Einsum) or not ({a.tensor for a in reads(e)} & inside or i in contractions):
            continue
        if e.lhs.indices[0].expr != IVar(row) or row in reduced_vars(e):
            return None
        inside.add(e.lhs.tensor)
        members.append(i)
    return tuple(members)


def _vars(a: Access) -> set[str]:
    return {v for ix in a.indices for v in _index_vars(ix.expr)}


def _index_vars(e: IndexExpr) -> set[str]:
    if isinstance(e, IVar):
        return {e.name}
    if isinstance(e, IBin):
        return _index_vars(e.a) | _index_vars(e.b)
    if isinstance(e, IAccess):
        return _vars(e.access)
    return set()


class Rewrite:
    """One block rewritten in ``mode`` (``dropless``, ``capacity`` or ``unsorted``)."""

    def __init__(self, c: Cascade, block: Block, mode: str, factor: float) -> None:
        self.c, self.block, self.mode, self.factor = c, block, mode, factor
        self.decls = declarations(c)
        self.taken = set(self.decls) | {r.name for r in c.ranks}
        self.ranks, self.tensors = list(c.ranks), list(c.tensors)
        self.row_rank = var_ranks(c)[block.row]
        self.new: list[Einsum] = []
        self.prefix = next(f"{PREFIX}{i}" for i in range(len(self.taken) + 1) if f"{PREFIX}{i}_expert" not in self.taken)
        self.provenance = c.stmts[block.contractions[0]].provenance   # type: ignore[union-attr]

    # ---- declarations ----------------------------------------------------------------------

    def rank(self, hint: str, size: object) -> str:
        name = fresh_name(hint, self.taken)
        self.taken.add(name)
        self.ranks.append(Rank(name, size))   # type: ignore[arg-type]
        return name

    def tensor(self, hint: str, ranks: list[str], dtype: str) -> str:
        """A new tensor ``<prefix>_<hint>`` (the block's tensors share the prefix: :data:`PREFIX`),
        a temp but for the routing's (:data:`ROUTING`)."""
        name = fresh_name(f"{self.prefix}_{hint}", self.taken)
        self.taken.add(name)
        role = "output" if ROUTING.fullmatch(name) else "temp"
        self.tensors.append(TensorDecl(name, tuple(TensorRank(r) for r in ranks), role, dtype))
        return name

    def emit(self, tensor: str, index: list[str], rhs: Expr) -> None:
        lhs = Access(tensor, tuple(Index(IVar(v)) for v in index))
        self.new.append(Einsum(lhs, rhs, None, None, self.provenance))

    # ---- the rewrite -----------------------------------------------------------------------

    def cascade(self) -> Cascade:
        r = self.block.row
        experts = self.tensor("expert", [self.row_rank], "i64")
        self.emit(experts, [r], _as_value(self.block.gather))
        first = self.block.members[0]
        if self.mode == "unsorted":
            out_rank, src, sorted_experts, place = self.row_rank, None, experts, None
        else:
            out_rank, src, sorted_experts, place = self.sorted_rows(experts)
        p = out_rank.lower() if out_rank != self.row_rank else r
        members = [self.member(i, p, src, sorted_experts, out_rank) for i in self.block.members]
        stmts = list(self.c.stmts)
        inside = {stmts[i].lhs.tensor for i in self.block.members}   # type: ignore[union-attr]
        for i, m in zip(self.block.members, members):
            stmts[i] = m
        stmts[first:first] = self.new
        if place is not None:
            stmts = [s if s in members or s in self.new else _read_at(s, inside, place) for s in stmts]
        tensors = [self._moved(t, inside, out_rank) for t in self.tensors]
        return replace(self.c, ranks=tuple(self.ranks), tensors=tuple(tensors), stmts=tuple(stmts))

    def sorted_rows(self, experts: str) -> tuple[str, str, str, IndexExpr]:
        """The sort: (the sorted rows' rank, the source row of each, the expert of each, where a
        row ``r`` went (an index expression of ``r``))."""
        r, n_rows = self.block.row, self.c.rank(self.row_rank).size
        r2 = self.rank("MOE_R", n_rows).lower()
        ex, ex2 = _at(experts, IVar(r)), _at(experts, IVar(r2))
        k, tokens = self.slots()
        key = self.tensor("key", [self.row_rank], "i64")   # (expert, then Tutel's priority: slot, token)
        self.emit(key, [r], _priority_key(ex, IVar(r), k, self.number(tokens), self.number(self.row_rank)))
        before = Call("lt", (_at(key, IVar(r2)), _at(key, IVar(r))))
        if self.mode == "dropless":
            rank = self.tensor("place", [self.row_rank], "i64")
            self.emit(rank, [r], before)
            place: IndexExpr = IAccess(_at(rank, IVar(r)))
            rows = self.rank("MOE_P", n_rows)
        else:
            n_experts = self.experts_count()
            cap = k * int(self.factor * math.ceil(int(self.c.rank(tokens).size) / n_experts))
            rank, lower, queue = (self.tensor(hint, [self.row_rank], "i64") for hint in ("rank", "lower", "queue"))
            self.emit(rank, [r], before)
            self.emit(lower, [r], Call("lt", (ex2, ex)))
            self.emit(queue, [r], Call("sub", (_at(rank, IVar(r)), _at(lower, IVar(r)))))
            q = _at(queue, IVar(r))
            rows = self.rank("MOE_P", n_experts * cap)
            where = self.tensor("place", [self.row_rank], "i64")
            self.emit(where, [r], Call("where", (Call("lt", (q, Const(cap))), Call("add", (Call("mul", (ex, Const(cap))), q)),
                                                 Const(n_experts * cap))))
            place = IAccess(_at(where, IVar(r)))
        p = rows.lower()
        src = self.tensor("source", [rows], "i64")   # (the source row + 1; 0 for an empty row)
        found = Call("eq", (_as_value(place), Coord(IVar(p))))
        self.emit(src, [p], Call("mul", (Call("add", (Coord(IVar(r)), Const(1))), found)))
        sorted_experts = self.tensor("sorted_expert", [rows], "i64")
        if self.mode == "dropless":
            self.emit(sorted_experts, [p], _at(experts, _source(src, p)))
        else:
            self.emit(sorted_experts, [p], Coord(IBin("//", IVar(p), IConst(cap))))
        return rows, src, sorted_experts, place

    def number(self, rank: str) -> Expr:
        """The size of ``rank`` as a value."""
        size = self.c.rank(rank).size
        return Const(float(size)) if isinstance(size, int) or getattr(size, "is_Integer", False) else Coord(ISym(rank))

    def slots(self) -> tuple[int, str]:
        """(k, the tokens' rank) when the gather is ``IDX[r//k, r%k]`` (transformers' batched
        form); else (1, the rows' rank): the priority is the rows' order."""
        g = self.block.gather.access   # type: ignore[union-attr]
        r = IVar(self.block.row)
        if len(g.indices) == 2:
            a, b = (ix.expr for ix in g.indices)
            if isinstance(a, IBin) and a.op == "//" and a.a == r and isinstance(a.b, IConst) \
                    and b == IBin("%", r, a.b):
                return a.b.value, self.decls[g.tensor].ranks[0].rank
        return 1, self.row_rank

    def experts_count(self) -> int:
        e = self.c.stmts[self.block.contractions[0]]
        w = next(a for a in e.rhs.args if isinstance(a, Access) and a.indices[0].expr == self.block.gather)  # type: ignore[union-attr]
        size = self.c.rank(self.decls[w.tensor].ranks[0].rank).size
        tokens = self.c.rank(self.slots()[1]).size
        if not isinstance(size, int) or not isinstance(tokens, int):
            raise CompileError(f"moe{{mode=capacity}}: the capacity needs static sizes; {w.tensor} has "
                               f"{size} experts over {tokens} tokens (use mode=dropless)")
        return size

    def member(self, i: int, p: str, src: str | None, experts: str, out_rank: str) -> Einsum:
        """Block Einsum ``i`` over sorted rows ``p``: the gather read as the sorted experts, an
        expert contraction's outside operand gathered into sorted order first."""
        e = self.c.stmts[i]
        assert isinstance(e, Einsum)
        rename = {self.block.row: IVar(p)}
        g = rename_index(self.block.gather, rename)
        lhs = Access(e.lhs.tensor, tuple(replace(ix, expr=rename_index(ix.expr, rename)) for ix in e.lhs.indices))
        rhs = _map_reads(e.rhs, lambda a: _replace_gather(_rename_access(a, rename), g, IAccess(_at(experts, IVar(p)))))
        if i in self.block.contractions:
            rhs = self.operand_rows(rhs, p, src, out_rank)
        return replace(e, lhs=lhs, rhs=rhs)

    def operand_rows(self, rhs: Expr, p: str, src: str | None, out_rank: str) -> Expr:
        """``rhs`` with its operand other than the weight read as ``XS[p, d]``, a copy in sorted
        order (plain already when it is the block's own tensor of two dimensions)."""
        inside = {self.c.stmts[i].lhs.tensor for i in self.block.members}   # type: ignore[union-attr]
        args = []
        for a in rhs.args:   # type: ignore[union-attr]
            weight = isinstance(a, Access) and isinstance(a.indices[0].expr, IAccess) and self.decls[a.tensor].role == "param"
            if weight or a.tensor in inside:   # type: ignore[union-attr]
                args.append(a)
                continue
            d = next(v for v in _vars(a) if v != p)   # type: ignore[arg-type]
            copy = self.tensor(a.tensor, [out_rank, var_ranks(self.c)[d]], self.decls[a.tensor].dtype)   # type: ignore[union-attr]
            source = a if src is None else _rename_access(a, {p: _source(src, p)})   # type: ignore[arg-type]
            self.emit(copy, [p, d], source)
            args.append(_at(copy, IVar(p), IVar(d)))
        return replace(rhs, args=tuple(args))   # type: ignore[arg-type]

    def _moved(self, t: TensorDecl, inside: set[str], out_rank: str) -> TensorDecl:
        """A block tensor declared over the sorted rows."""
        if t.name not in inside or out_rank == self.row_rank:
            return t
        return replace(t, ranks=(TensorRank(out_rank),) + t.ranks[1:])


def _priority_key(expert: Expr, r: IVar, k: int, tokens: Expr, rows: Expr) -> Expr:
    """Row ``r``'s place in the sort, as one integer: its expert, then (within an expert) every
    token's first choice before any second choice, tokens in order (Tutel's priority; rows are
    ``token * k + slot``)."""
    slot_first = Coord(r) if k == 1 else Call("add", (Call("mul", (Coord(IBin("%", r, IConst(k))), tokens)),
                                                      Coord(IBin("//", r, IConst(k)))))
    return Call("add", (Call("mul", (expert, rows)), slot_first))


def _source(src: str, p: str) -> IndexExpr:
    """The source row of sorted row ``p`` (-1 for an empty one: out of range, read as 0)."""
    return IBin("-", IAccess(_at(src, IVar(p))), IConst(1))


def _at(tensor: str, *index: IndexExpr) -> Access:
    return Access(tensor, tuple(Index(i) for i in index))


def _as_value(g: IndexExpr) -> Expr:
    """A gather index as a value (its access), any other index expression as its coordinate."""
    return g.access if isinstance(g, IAccess) else Coord(g)


def _rename_access(a: Access, binding: dict[str, IndexExpr]) -> Access:
    return replace(a, indices=tuple(replace(ix, expr=rename_index(ix.expr, binding)) for ix in a.indices))


def _replace_gather(a: Access, gather: IndexExpr, by: IndexExpr) -> Access:
    return replace(a, indices=tuple(replace(ix, expr=by) if ix.expr == gather else ix for ix in a.indices))


def _map_reads(x: Expr, fn: object) -> Expr:
    if isinstance(x, Access):
        return fn(x)   # type: ignore[operator]
    if isinstance(x, Call):
        return replace(x, args=tuple(_map_reads(a, fn) for a in x.args))
    return x


def _read_at(s: object, inside: set[str], place: IndexExpr) -> object:
    """Statement ``s`` with its reads of the block's tensors at row ``r`` read where ``r`` went."""
    if not isinstance(s, Einsum) or not any(a.tensor in inside for a in reads(s)):
        return s

    def moved(a: Access) -> Access:
        if a.tensor not in inside:
            return a
        row = a.indices[0].expr
        return replace(a, indices=(replace(a.indices[0], expr=rename_index(place, {_place_var(place): row})),) + a.indices[1:])
    return replace(s, rhs=_map_reads(s.rhs, moved))


def _place_var(place: IndexExpr) -> str:
    """The row variable ``place`` (``P[r]``) is written in."""
    return place.access.indices[0].expr.name   # type: ignore[union-attr]
