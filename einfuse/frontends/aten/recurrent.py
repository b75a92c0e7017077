"""LSTM and GRU layers (``einfuse::lstm``/``gru``: see ..recurrent_ops; ``aten.lstm.input``,
``aten.gru.input``) as a ``for`` loop over time.

What: each layer and direction becomes one GEMM over every step's input, the initial state, a
loop over the time rank ``T`` carrying the state (iterative ranks, EINSUM_CASCADES.md §1), and
one Einsum storing every step's state (an LSTM's, with ``G`` = 4 gates of ``H`` units):

    XG[t,b,g,h] = X[t,b,i] * W_ih[g*H+h,i]                  (a reverse direction reads X[T-1-t])
    HS[0,b,h] = h0[l,b,h];  CS[0,b,h] = c0[l,b,h]
    for t in T {
      HG[t,b,g,h] = HS[t,b,j] * W_hh[g*H+h,j]
      GA[t,b,g,h] = XG[t,b,g,h] + HG[t,b,g,h] + b_ih[g*H+h] + b_hh[g*H+h]
      CS[t+1,b,h] = sigmoid(GA[t,b,1,h]) * CS[t,b,h] + sigmoid(GA[t,b,0,h]) * tanh(GA[t,b,2,h])
      HS[t+1,b,h] = sigmoid(GA[t,b,3,h]) * tanh(CS[t+1,b,h])
    }
    Y[t,b,s,h] = where(s < 1, HS[t+1,b,h], CS[t+1,b,h])     (h and c of every step)

A GRU's step is ``HB = HG + b_hh`` and ``HS[t+1] = (1 - z) n + z HS[t]`` with ``r``, ``z`` and
``n = tanh(XG_n + b_ih_n + r HB_n)`` inlined. The output sequence, ``h_n`` and ``c_n`` are views
of ``Y`` (the last step's row); two directions are concatenated, and the next layer reads that.

Why: unrolled by ``torch.export``'s decomposition, an LSTM of 32 steps was 839 Einsums, 319
kernels and 22 s of compile; as a loop the cascade, its kernels (a GEMM and one loop kernel per
layer and direction: :mod:`einfuse.codegen.loop`) and the compile time do not grow with the
sequence length, which may be symbolic.

Not translated (the rule says so): dropout between layers in training mode, an LSTM's
``proj_size``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import sympy

from ...ir import Access, Call, Const, Coord, Einsum, IConst, Index, IVar, Loop, TensorDecl, TensorRank
from ...ir.nodes import Expr, IndexExpr
from ..builder import Builder, Ref, ibin, placeholder
from .base import Ctx, RuleError, rule
from .views import concatenate

GATES = {"lstm": 4, "gru": 3}


@dataclass
class _Layer:
    """One recurrent layer's shared shape: its ranks by role (``t b g h j i s``) and sizes."""

    b: Builder
    cell: str
    ranks: dict[str, str]
    hidden: int
    steps: sympy.Expr
    dtype: str
    hint: str

    def v(self, role: str) -> IVar:
        return IVar(self.ranks[role].lower())

    def declare(self, suffix: str, roles: str, iterative: str = "") -> str:
        """A temp over the ranks of ``roles`` (those in ``iterative`` carried by the loop)."""
        name = self.b.name(f"{self.hint}_{suffix}")
        ranks = tuple(TensorRank(self.ranks[r], r in iterative) for r in roles)
        self.b.tensors.append(TensorDecl(name, ranks, "temp", self.dtype))
        return name

    def einsum(self, name: str, index: list[IndexExpr], rhs: Expr) -> Einsum:
        return Einsum(Access(name, tuple(Index(x) for x in index)), rhs, None, None, self.b.provenance)

    def at(self, name: str, *index: IndexExpr) -> Access:
        return Access(name, tuple(Index(x) for x in index))

    def unit(self, w: Ref, gate: IndexExpr, *rest: IndexExpr) -> Expr:
        """A weight or bias read at gate ``gate``'s unit ``h`` (its rows are the gates' units in turn)."""
        return w.at([ibin("+", ibin("*", gate, IConst(self.hidden)), self.v("h")), *rest])


@rule("aten.lstm.input", "aten.gru.input", "einfuse.lstm.default", "einfuse.gru.default")
def recurrent(ctx: Ctx) -> tuple[Ref, ...]:
    """A stacked, possibly bidirectional LSTM or GRU (see the module docstring)."""
    cell = "lstm" if ".lstm." in ctx.op else "gru"
    x, hx, params, biased, layers, dropout, train, bidirectional, batch_first = (ctx.arg(i) for i in range(9))
    h0, c0 = (hx if cell == "lstm" else (hx, None))
    directions = 2 if bidirectional else 1
    per = 4 if biased else 2
    if train and dropout:
        raise RuleError("dropout between layers in training mode")
    if len(params) != layers * directions * per:
        raise RuleError(f"{len(params)} weights for {layers} layers x {directions} directions: an LSTM with proj_size")
    unbatched = len(x.shape) == 2
    time_dim = 1 if batch_first and not unbatched else 0
    steps, batch, hidden = x.shape[time_dim], sympy.Integer(1) if unbatched else x.shape[1 - time_dim], int(h0.shape[-1])
    if unbatched:
        seq = x.reindex([steps, batch, x.shape[1]], [placeholder(0), placeholder(2)])
    else:
        seq = x if time_dim == 0 else x.reindex([steps, batch, x.shape[2]], [placeholder(1), placeholder(0), placeholder(2)])
    finals, dtype = [], x.dtype
    for layer in range(layers):
        outs = []
        for d in range(directions):
            k = layer * directions + d
            weights = params[k * per:(k + 1) * per]
            state = [_initial(s, k, unbatched) for s in (h0, c0) if s is not None]
            shape = _Layer(ctx.b, cell, _ranks(ctx.b, steps, batch, hidden, seq.shape[2], cell), hidden, steps,
                           dtype, f"{ctx.name}_l{layer}{'_reverse' if d else ''}")
            y = _direction(shape, seq, weights, state, reverse=d == 1)
            finals.append(y)
            outs.append(_sequence(ctx.b, y, steps, reverse=d == 1))
        seq = outs[0] if directions == 1 else concatenate(
            ctx.b, f"{ctx.name}_l{layer}_out", outs, 2, (steps, batch, directions * hidden), dtype)
    return _outputs(ctx.b, ctx.name, cell, seq, finals, batch_first, unbatched)


def _ranks(b: Builder, steps: Any, batch: Any, hidden: int, inputs: Any, cell: str) -> dict[str, str]:
    """Distinct ranks for the roles of one layer's Einsums (an Einsum's variables must differ)."""
    taken: set[str] = set()
    out = {}
    for role, size in (("t", steps), ("b", batch), ("g", GATES[cell]), ("h", hidden), ("j", hidden),
                       ("i", inputs), ("s", 2)):
        out[role] = b.rank_for(sympy.sympify(size), taken)
        taken.add(out[role])
    return out


def _initial(state: Ref, k: int, unbatched: bool) -> Callable[[IVar, IVar], Expr]:
    """Layer-direction ``k``'s initial state at ``(b, h)``."""
    return lambda b, h: state.at([IConst(k), h] if unbatched else [IConst(k), b, h])


def _direction(L: _Layer, seq: Ref, weights: list[Ref], state: list[Callable], reverse: bool) -> str:
    """One layer in one direction: the input GEMM, the loop, the stored states; returns ``Y``."""
    t, b, g, h, j, i = (L.v(r) for r in "tbghji")
    w_ih, w_hh, *bias = weights
    last = ibin("-", L.b.size_index(L.steps), IConst(1))
    xg = L.declare("xg", "tbgh")
    L.b.stmts.append(L.einsum(xg, [t, b, g, h], Call("mul", (seq.at([ibin("-", last, t) if reverse else t, b, i]),
                                                                L.unit(w_ih, g, i)))))
    hs = L.declare("h", "tbh", iterative="t")
    cs = L.declare("c", "tbh", iterative="t") if L.cell == "lstm" else None
    for name, init in zip([hs, cs], state):
        L.b.stmts.append(L.einsum(name, [IConst(0), b, h], init(b, h)))
    hg = L.declare("hg", "tbgh")
    body = [L.einsum(hg, [t, b, g, h], Call("mul", (L.at(hs, t, b, j), L.unit(w_hh, g, j))))]
    body += _lstm_step(L, xg, hg, hs, cs, bias) if L.cell == "lstm" else _gru_step(L, xg, hg, hs, bias)
    L.b.stmts.append(Loop(L.ranks["t"], tuple(body)))
    nxt = ibin("+", t, IConst(1))
    if cs is None:
        y = L.declare("y", "tbh")
        L.b.stmts.append(L.einsum(y, [t, b, h], L.at(hs, nxt, b, h)))
    else:
        y = L.declare("y", "tbsh")
        first = Call("lt", (Coord(L.v("s")), Const(1.0)))
        L.b.stmts.append(L.einsum(y, [t, b, L.v("s"), h], Call("where", (first, L.at(hs, nxt, b, h), L.at(cs, nxt, b, h)))))
    return y


def _lstm_step(L: _Layer, xg: str, hg: str, hs: str, cs: str, bias: list[Ref]) -> list[Einsum]:
    t, b, g, h = (L.v(r) for r in "tbgh")
    total: Expr = Call("add", (L.at(xg, t, b, g, h), L.at(hg, t, b, g, h)))
    for w in bias:
        total = Call("add", (total, L.unit(w, g)))
    ga = L.declare("gates", "tbgh")
    gate = lambda k, op: Call(op, (L.at(ga, t, b, IConst(k), h),))  # noqa: E731
    nxt = ibin("+", t, IConst(1))
    c = Call("add", (Call("mul", (gate(1, "sigmoid"), L.at(cs, t, b, h))),
                     Call("mul", (gate(0, "sigmoid"), gate(2, "tanh")))))
    return [L.einsum(ga, [t, b, g, h], total),
            L.einsum(cs, [nxt, b, h], c),
            L.einsum(hs, [nxt, b, h], Call("mul", (gate(3, "sigmoid"), Call("tanh", (L.at(cs, nxt, b, h),)))))]


def _gru_step(L: _Layer, xg: str, hg: str, hs: str, bias: list[Ref]) -> list[Einsum]:
    t, b, g, h = (L.v(r) for r in "tbgh")
    hb = L.declare("hb", "tbgh")
    recurrent: Expr = L.at(hg, t, b, g, h)
    if bias:
        recurrent = Call("add", (recurrent, L.unit(bias[1], g)))

    def part(name: str, k: int) -> Expr:
        x = L.at(name, t, b, IConst(k), h)
        return Call("add", (x, L.unit(bias[0], IConst(k)))) if bias and name == xg else x
    r = Call("sigmoid", (Call("add", (part(xg, 0), part(hb, 0))),))
    z = Call("sigmoid", (Call("add", (part(xg, 1), part(hb, 1))),))
    n = Call("tanh", (Call("add", (part(xg, 2), Call("mul", (r, part(hb, 2))))),))
    step = Call("add", (Call("mul", (Call("sub", (Const(1.0), z)), n)), Call("mul", (z, L.at(hs, t, b, h)))))
    return [L.einsum(hb, [t, b, g, h], recurrent), L.einsum(hs, [ibin("+", t, IConst(1)), b, h], step)]


def _stored(b: Builder, y: str) -> Ref:
    """The ref reading tensor ``y`` whole."""
    decl = next(d for d in b.tensors if d.name == y)
    shape = [b.ranks[r.rank].size for r in decl.ranks]
    return Ref(Access(y, tuple(Index(placeholder(k)) for k in range(len(shape)))),
               tuple(sympy.sympify(s) for s in shape), decl.dtype)


def _sequence(b: Builder, y: str, steps: Any, reverse: bool) -> Ref:
    """Every step's ``h`` as ``[T, B, H]`` in the input's time order."""
    ref = _stored(b, y)
    time = ibin("-", ibin("-", b.size_index(steps), IConst(1)), placeholder(0)) if reverse else placeholder(0)
    index = [time, placeholder(1), *([IConst(0)] if len(ref.shape) == 4 else []), placeholder(2)]
    return ref.reindex([ref.shape[0], ref.shape[1], ref.shape[-1]], index)


def _outputs(b: Builder, name: str, cell: str, seq: Ref, finals: list[str], batch_first: bool,
             unbatched: bool) -> tuple[Ref, ...]:
    """The op's results: the last layer's sequence, then ``h_n`` (and ``c_n``) of every layer."""
    steps, batch, width = seq.shape
    if unbatched:
        out = seq.reindex([steps, width], [placeholder(0), IConst(0), placeholder(1)])
    elif batch_first:
        out = seq.reindex([batch, steps, width], [placeholder(1), placeholder(0), placeholder(2)])
    else:
        out = seq
    last = ibin("-", b.size_index(steps), IConst(1))
    results = [out]
    for s in range(2 if cell == "lstm" else 1):
        pieces = []
        for y in finals:
            ref = _stored(b, y)
            h = ref.shape[-1]
            state = [IConst(s)] if cell == "lstm" else []
            if unbatched:
                pieces.append(ref.reindex([1, h], [last, IConst(0), *state, placeholder(1)]))
            else:
                pieces.append(ref.reindex([1, batch, h], [last, placeholder(1), *state, placeholder(2)]))
        shape = (len(finals), *pieces[0].shape[1:])
        results.append(pieces[0] if len(pieces) == 1 else concatenate(b, f"{name}_{'hc'[s]}n", pieces, 0, shape, seq.dtype))
    return tuple(results)
