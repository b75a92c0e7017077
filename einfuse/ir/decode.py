"""Decode attention: a few query rows against a long cache of keys, as one ``decode`` kernel.

A decode step's attention (``lm.merged_attention``: the cached keys' scores and the step's own
side by side, one max over both) is captured as

    QK[r.., l]  = Q[..] * K[..l..]                    the cached keys' scores (sum over the width)
    S[r.., l]   = f(QK[r.., l], MASK[..l..], ..)       any element-wise chain (scale, softcap, mask)
    MAX[r..]    = S[r.., l] :: reduce[l] max
    TOP[r..]    = g(MAX, the step's own scores' max)   (row-level: no ``l``)
    E[r.., l]   = exp(S[r.., l] - TOP[r..])
    DEN[r..]    = E[r.., l]                            sum over the cache
    NUM[r.., f] = E[r.., l] * V[..l..f..]              sum over the cache
    OUT[r.., f] = h(NUM, DEN, the step's own part)      (row-level)

Written as it stands that reads the cache's keys three times (the max, then ``E`` twice) and its
values once, and keeps ``L`` scores per row between them. :func:`decode_attention` finds the
whole group (every Einsum from the cached scores to ``OUT``, the step's own part included) and
``codegen/decode.py`` computes it as FlashAttention's decoding form (flash-decoding): the cache
split into chunks across the cores, each chunk read once with an online max, the chunks' partial
``(max, DEN, NUM)`` merged per row, rebased on ``TOP`` (``E = exp(S - m) * exp(m - TOP)``), then the
row-level Einsums evaluated as written.

Every access between two of the group's temps must name each dimension by its writer's own
variable (or read a dimension of size one): values then flow point to point by variable name,
so each Einsum can be evaluated for one row at a time with the row's variables bound.
"""
from __future__ import annotations

from dataclasses import dataclass

from .nodes import Access, Call, Cascade, Einsum, IConst, IVar
from .scope import declarations, index_atoms, lhs_vars, reads, reduced_vars, var_ranks


LONG = 64   # the fewest keys of a static length worth the kernel (a symbolic length always is)


@dataclass(frozen=True)
class DecodeAttention:
    """The roles of one decode attention's Einsums (tensor names; ``key`` the cache's variable)."""

    key: str
    qk: Einsum
    maximum: Einsum
    exp: Einsum
    den: Einsum
    num: Einsum
    scores: Access         # ``S[r.., l]`` as E's shift reads it
    top: Access            # ``TOP[r..]`` as E's shift reads it
    value: Access          # V's access in ``num``
    group: tuple[str, ...]  # every temp the kernel computes, in program order (``output`` last)
    output: str

    keyed: frozenset[str]   # the temps with the key among their variables (the chunk loop's: ``qk`` to ``E``)


def decode_attentions(c: Cascade) -> list[DecodeAttention]:
    """Every decode attention of ``c`` (see the module docstring)."""
    w = _Writers(c)
    found: dict[str, DecodeAttention] = {}
    for e, loops in c.einsums():
        d = None if loops else _from_num(w, e)
        if d is not None:
            found.setdefault(d.output, d)
    return list(found.values())


class _Writers:
    """Each tensor's single writer (None for none or several) and its readers' Einsums."""

    def __init__(self, c: Cascade) -> None:
        self.decls = declarations(c)
        self.order = [e for e, _ in c.einsums()]
        self.writers: dict[str, list[Einsum]] = {}
        self.readers: dict[str, list[Einsum]] = {}
        for e in self.order:
            self.writers.setdefault(e.lhs.tensor, []).append(e)
            for a in reads(e):
                self.readers.setdefault(a.tensor, []).append(e)
        self.outputs = {t for t, d in self.decls.items() if d.role == "output"}
        self.sizes = {r.name: r.size for r in c.ranks}
        self.ranks = var_ranks(c)

    def one(self, name: str) -> Einsum | None:
        ws = self.writers.get(name, [])
        ok = len(ws) == 1 and self.decls[name].role in ("temp", "output") and not ws[0].populate \
            and not any(ix.filter or not isinstance(ix.expr, IVar) for ix in ws[0].lhs.indices)
        return ws[0] if ok else None


def _from_num(w: _Writers, num: Einsum) -> DecodeAttention | None:
    """The decode attention whose ``NUM`` is ``num``, or None."""
    if len(reduced_vars(num)) != 1 or num.reduce is not None or not _call(num.rhs, "mul", 2):
        return None
    (key,) = reduced_vars(num)
    if isinstance(w.sizes[w.ranks[key]], int) and w.sizes[w.ranks[key]] < LONG:
        return None
    for e_at, value in (num.rhs.args, num.rhs.args[::-1]):
        exp = w.one(e_at.tensor) if isinstance(e_at, Access) else None
        if exp is None or not isinstance(value, Access) or w.one(value.tensor) is not None \
                or key not in lhs_vars(exp) or not _call(exp.rhs, "exp", 1):
            continue
        found = _around(w, key, exp, num, value)
        if found is not None:
            return found
    return None


def _around(w: _Writers, key: str, exp: Einsum, num: Einsum, value: Access) -> DecodeAttention | None:
    shift, chain = exp.rhs.args[0], {exp.lhs.tensor}
    if isinstance(shift, Access) and w.one(shift.tensor) is not None:
        chain.add(shift.tensor)
        shift = w.one(shift.tensor).rhs
    if not _call(shift, "sub", 2) or not all(isinstance(a, Access) for a in shift.args):
        return None
    scores, top = shift.args
    maximum = next((r for r in w.readers.get(scores.tensor, []) if r.reduce is not None and r.reduce.op == "max"
                    and list(r.reduce.vars) == [key] and isinstance(r.rhs, Access) and r.rhs.tensor == scores.tensor), None)
    den = next((r for r in w.readers.get(exp.lhs.tensor, []) if r is not num and r.reduce is None
                and reduced_vars(r) == [key] and isinstance(r.rhs, Access)), None)
    found = _contraction(w, scores, key)
    top_writer = w.one(top.tensor)
    if maximum is None or den is None or found is None or top_writer is None or key in lhs_vars(top_writer):
        return None
    qk, links = found
    group = _group(w, {qk.lhs.tensor, maximum.lhs.tensor, den.lhs.tensor, num.lhs.tensor} | chain | links)
    if group is None:
        return None
    members, output = group
    keyed = frozenset(t for t in members if key in lhs_vars(w.one(t)))
    rows = members - keyed - {maximum.lhs.tensor, den.lhs.tensor, num.lhs.tensor}
    row_vars = set(lhs_vars(maximum)) | {key} | {v for v, r in w.ranks.items() if w.sizes[r] == 1}
    if keyed != chain | links or top.tensor not in members or not _consistent(w, members) \
            or not all(_static(w, w.one(t)) for t in rows) \
            or not all(set(lhs_vars(w.one(t))) <= row_vars for t in keyed | {den.lhs.tensor}):
        return None   # (the chunk loop computes the keyed temps, MAX and DEN at a row and a key)
    return DecodeAttention(key, qk, maximum, exp, den, num, scores, top, value,
                           tuple(e.lhs.tensor for e in w.order if e.lhs.tensor in members), output, keyed)


def _static(w: _Writers, e: Einsum) -> bool:
    """Whether every variable of ``e`` has a numeric extent (a row-level Einsum: no cache in it)."""
    ranks = w.ranks
    return all(isinstance(w.sizes[ranks[v]], int) for v in lhs_vars(e) + reduced_vars(e))


def _contraction(w: _Writers, scores: Access, key: str) -> tuple[Einsum, set[str]] | None:
    """``QK`` (the contraction over one width variable reading the cache's keys at ``key``) that
    ``scores`` is an element-wise chain of, and the chain's temps (``QK``'s included)."""
    name, links = scores.tensor, set()
    for _ in range(8):
        e = w.one(name)
        if e is None:
            return None
        links.add(name)
        red = reduced_vars(e)
        if red:
            ok = len(red) == 1 and e.reduce is None and key in lhs_vars(e) and any(key in _names(a) for a in reads(e))
            return (e, links) if ok else None
        temps = [a for a in reads(e) if w.one(a.tensor) is not None and key in _names(a)]
        if len(temps) != 1:
            return None
        name = temps[0].tensor
    return None


def _group(w: _Writers, core: set[str]) -> tuple[set[str], str] | None:
    """The whole attention around ``core``: the temps reading the group whose results stay
    row-level, and the temps feeding it that nothing else reads; with its one output."""
    group = set(core)
    changed = True
    while changed:
        changed = False
        for e in w.order:
            t = e.lhs.tensor
            if t in group or w.one(t) is None:
                continue
            into = any(a.tensor in group for a in reads(e))
            readers = w.readers.get(t, [])
            feeds = bool(readers) and t not in w.outputs and all(r.lhs.tensor in group for r in readers) \
                and all(_at_own(w, a) for r in readers for a in reads(r) if a.tensor == t)
            if into and _row_level(w, group, t) or feeds:
                group.add(t)
                changed = True
    leaving = [t for t in group if t in w.outputs or any(r.lhs.tensor not in group for r in w.readers.get(t, []))]
    return (group, leaving[0]) if len(leaving) == 1 else None


def _row_level(w: _Writers, group: set[str], t: str) -> bool:
    """Whether ``t`` reads the group only at its writers' own variables (a group member then)."""
    return all(_at_own(w, a) for a in reads(w.one(t)) if a.tensor in group)


def _consistent(w: _Writers, members: set[str]) -> bool:
    """Every access between members names each dimension by its writer's variable (or is of size one)."""
    return all(_row_level(w, members, t) for t in members)


def _at_own(w: _Writers, a: Access) -> bool:
    writer = w.one(a.tensor)
    if writer is None:
        return False
    sizes = [r.rank for r in w.decls[a.tensor].ranks]
    return all(ix == own or (isinstance(ix.expr, (IConst, IVar)) and _size_one(w, rank))
               for ix, own, rank in zip(a.indices, writer.lhs.indices, sizes))


def _size_one(w: _Writers, rank: str) -> bool:
    return w.sizes.get(rank) == 1


def _names(a: Access) -> set[str]:
    """The variables ``a``'s index expressions mention (not inside gathers)."""
    return {atom.name for ix in a.indices for atom in index_atoms(ix.expr) if isinstance(atom, IVar)}


def _call(x: object, op: str, n: int) -> bool:
    return isinstance(x, Call) and x.op == op and len(x.args) == n
