"""The reference interpreter: evaluates any cascade at float64 with EDGE occupancy semantics.

It is the oracle every pass and kernel is checked against, so it favours plain semantics over
speed, but it is vectorized per Einsum (numpy broadcasting, and ``numpy.einsum`` for sum-of-product
contractions) so transformer-sized cascades run in seconds.

Semantics (docs/ir.md has the long form):
* every point of a tensor is present or absent; an absent point reads as the tensor's ``empty``
  (0 for a dense tensor, one without ``empty``);
* a map op touches the points its merge selects (``*`` cap, ``+ - max min`` cup, ``/`` rhs, ...);
  the value of an absent intermediate is 0;
* a reduce combines the present points of each fiber (identity where none); the output point is
  present if any input point was (cup) or all were (cap);
* a write of a value equal to the output's ``empty`` is not stored (dense outputs store all);
* out-of-range indices (convolution padding) and false filters read as absent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import InterpretError
from . import ops
from .dtypes import DTYPES
from .nodes import (Access, Call, Cascade, Const, Coord, Einsum, Expr, IAccess, IConst, IndexExpr,
                    ISym, IVar, Loop, Stmt, TensorDecl)
from .scope import declarations, expr_vars, iteration_vars, reduced_vars, var_ranks
from .sizes import bind_sizes
from .verify import describe, verify

_CMP = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
        "==": np.equal, "!=": np.not_equal}
_IBIN = {"+": np.add, "-": np.subtract, "*": np.multiply, "//": np.floor_divide, "%": np.mod}


def interpret(c: Cascade, inputs: Mapping[str, Any], sizes: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Evaluate ``c`` on ``inputs`` (numpy arrays or torch tensors, by tensor name) at float64.

    ``param`` tensors come from ``c.params`` unless given in ``inputs``. ``sizes`` binds size
    symbols that no input shape determines. Returns every ``output`` tensor by name: float dtypes
    as float64, integer dtypes as int64, bool as bool; absent points hold the tensor's empty value
    (0 for dense tensors).
    """
    verify(c)
    decls = declarations(c)
    arrays = _collect_inputs(c, decls, inputs)
    rank_sizes = bind_sizes(c, decls, {k: v.shape for k, v in arrays.items()}, sizes)
    env = _Env(decls, rank_sizes, var_ranks(c))
    for name, arr in arrays.items():
        env.values[name], env.masks[name] = arr, np.ones(arr.shape, dtype=bool)
    with np.errstate(all="ignore"):
        env.run(c.stmts, {})
    return {t.name: _as_dtype(env.values[t.name], t.dtype) for t in c.tensors if t.role == "output"}


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; the IR does not import torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _collect_inputs(c: Cascade, decls: Mapping[str, TensorDecl], inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    unknown = [k for k in inputs if k not in decls or decls[k].role not in ("input", "param")]
    if unknown:
        raise InterpretError(f"'{unknown[0]}' is not an input or param of cascade '{c.name}'")
    arrays = {}
    for t in c.tensors:
        if t.role not in ("input", "param"):
            continue
        source = inputs.get(t.name, c.params.get(t.name))
        if source is None:
            raise InterpretError(f"missing {t.role} '{t.name}' of cascade '{c.name}'")
        arrays[t.name] = _to_numpy(source)
    return arrays


def _as_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bool":
        return values != 0
    if DTYPES[dtype].is_float:
        return values.astype(np.float64)
    return values.astype(np.int64)


@dataclass
class _Value:
    """A map expression's value and occupancy, broadcastable over the iteration grid."""

    value: np.ndarray
    mask: np.ndarray


class _Env:
    def __init__(self, decls: Mapping[str, TensorDecl], sizes: dict[str, int], ranks: dict[str, str]) -> None:
        self.decls, self.sizes, self.ranks = decls, sizes, ranks
        self.values: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = {}

    def run(self, stmts: tuple[Stmt, ...], bound: dict[str, int]) -> None:
        for s in stmts:
            if isinstance(s, Loop):
                for i in range(self.sizes[s.rank]):
                    self.run(s.body, {**bound, s.var: i})
            else:
                try:
                    _EinsumEval(self, s, bound).run()
                except (ArithmeticError, ValueError, MemoryError) as exc:   # (a tensor too large, ...)
                    raise InterpretError(f"{describe(s)}: cannot evaluate: {exc}") from exc

    def storage(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.values:
            d = self.decls[name]
            shape = tuple(self.sizes[r.rank] + int(r.iterative) for r in d.ranks)
            self.values[name] = np.full(shape, d.fill, dtype=np.float64)
            self.masks[name] = np.zeros(shape, dtype=bool)
        return self.values[name], self.masks[name]


class _EinsumEval:
    """Evaluates one Einsum over a broadcast grid with one axis per iteration variable."""

    def __init__(self, env: _Env, e: Einsum, bound: dict[str, int]) -> None:
        self.env, self.e, self.bound = env, e, bound
        self.vars = iteration_vars(e, frozenset(bound))
        self.reduced = reduced_vars(e, frozenset(bound))
        n = len(self.vars)
        self.grid: dict[str, Any] = dict(bound)
        for axis, v in enumerate(self.vars):
            shape = [1] * n
            shape[axis] = env.sizes[env.ranks[v]]
            self.grid[v] = np.arange(shape[axis]).reshape(shape)

    def run(self) -> None:
        axes = tuple(self.vars.index(v) for v in self.reduced)
        result = self.contract(axes) if self.reduced else None
        if result is None:
            result = self.reduce(self.expr(self.e.rhs), axes)
        if self.e.populate is not None:
            result = self.populate(result)
        self.write(result)

    # ---- map expressions ----------------------------------------------------------------------

    def expr(self, x: Expr) -> _Value:
        if isinstance(x, Access):
            return self.read(x)
        if isinstance(x, Const):
            return _Value(np.float64(x.value), np.True_)
        if isinstance(x, Coord):
            i, ok = self.index(x.expr)
            return _Value(np.where(ok, i, 0).astype(np.float64), ok)
        op = ops.OPS[x.op]
        args = [self.expr(a) for a in x.args]
        mask = _merge(x.merge or op.merge, [a.mask for a in args])
        value = op.fn(*[a.value for a in args])
        return _Value(np.where(mask, value, 0.0), mask)

    def read(self, a: Access) -> _Value:
        decl = self.env.decls[a.tensor]
        values, masks = self.env.storage(a.tensor)
        idx, ok = self.indices(a)
        for d, i in enumerate(idx):
            ok = ok & (i >= 0) & (i < values.shape[d])
        clipped = tuple(np.clip(i, 0, values.shape[d] - 1) for d, i in enumerate(idx))
        mask = masks[clipped] & ok
        return _Value(np.where(mask, values[clipped], decl.fill), mask)

    def indices(self, a: Access) -> tuple[list[Any], Any]:
        """Integer index arrays per dimension of ``a`` and the points where its filters hold."""
        ok: Any = np.True_
        idx = []
        for ix in a.indices:
            i, valid = self.index(ix.expr)
            idx.append(i)
            ok = ok & valid
            for cond in ix.filter:
                (lhs, lok), (rhs, rok) = self.index(cond.lhs), self.index(cond.rhs)
                ok = ok & lok & rok & _CMP[cond.cmp](lhs, rhs)
        return idx, ok

    def index(self, e: IndexExpr) -> tuple[Any, Any]:
        if isinstance(e, IVar):
            return self.grid[e.name], np.True_
        if isinstance(e, IConst):
            return np.int64(e.value), np.True_
        if isinstance(e, ISym):
            return np.int64(self.env.sizes[e.rank]), np.True_
        if isinstance(e, IAccess):
            got = self.read(e.access)
            return np.where(got.mask, got.value, -1).astype(np.int64), got.mask
        (a, aok), (b, bok) = self.index(e.a), self.index(e.b)
        return _IBIN[e.op](a, b), aok & bok

    # ---- reduce, contraction, populate, write -----------------------------------------------

    def reduce(self, x: _Value, axes: tuple[int, ...]) -> _Value:
        shape = tuple(self.env.sizes[self.env.ranks[v]] for v in self.vars)
        value, mask = np.broadcast_to(x.value, shape), np.broadcast_to(x.mask, shape)
        if not axes:
            return _Value(value, mask)
        r = self.e.reduce
        rop = ops.REDUCE_OPS[r.op if r else "+"]
        merged = mask.all(axis=axes, keepdims=True) if r and r.merge == "cap" else mask.any(axis=axes, keepdims=True)
        out = rop.fn(np.where(mask, value, rop.identity), axis=axes, keepdims=True)
        return _Value(np.where(merged, out, 0.0), merged)

    def contract(self, axes: tuple[int, ...]) -> _Value | None:
        """Sum-of-products fast path through numpy.einsum; None when the Einsum is not one."""
        r = self.e.reduce
        if (r is not None and (r.op != "+" or r.merge == "cap")):
            return None
        rhs, divisor = self.e.rhs, None
        if isinstance(rhs, Call) and rhs.op == "div" and rhs.merge is None \
                and not set(expr_vars(rhs.args[1])) & set(self.reduced):
            rhs, divisor = rhs.args
        factors = _product_factors(rhs)
        vals = [self.expr(f) for f in factors]
        grid = tuple(self.env.sizes[self.env.ranks[v]] for v in self.vars)
        total = _einsum([np.where(v.mask, v.value, 0.0) for v in vals], grid, axes)
        if all(bool(np.all(v.mask)) for v in vals):
            mask = np.ones(total.shape, dtype=bool)
        else:
            mask = _einsum([np.asarray(v.mask, dtype=np.float64) for v in vals], grid, axes) > 0
        if divisor is not None:
            d = self.expr(divisor)
            total, mask, divide_by = np.broadcast_arrays(total, d.mask, d.value)
            total = total / divide_by
        return _Value(np.where(mask, total, 0.0), mask)

    def populate(self, x: _Value) -> _Value:
        p = self.e.populate
        axis = self.vars.index(p.var)
        largest, _ = ops.POPULATE_OPS[p.op]
        x = _Value(np.broadcast_to(x.value, self.out_shape()), np.broadcast_to(x.mask, self.out_shape()))
        nan = np.isnan(x.value)   # (NaN ranks above +inf, as in torch.topk; absent points last)
        rank_class = np.where(~x.mask, 2, np.where(nan == largest, 0, 1))
        key = np.where(x.mask & ~nan, -x.value if largest else x.value, 0.0)
        order = np.lexsort((key, rank_class), axis=axis)   # (stable: ties go to the lower coordinate)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(key.shape[axis]).reshape(
            [-1 if d == axis else 1 for d in range(key.ndim)]), axis=axis)
        mask = x.mask & (rank < p.k)
        return _Value(np.where(mask, x.value, 0.0), mask)

    def out_shape(self) -> tuple[int, ...]:
        """The grid with reduced axes collapsed to 1: one point per output coordinate."""
        return tuple(1 if v in self.reduced else self.env.sizes[self.env.ranks[v]] for v in self.vars)

    def write(self, x: _Value) -> None:
        values, masks = self.env.storage(self.e.lhs.tensor)
        decl = self.env.decls[self.e.lhs.tensor]
        idx, ok = self.indices(self.e.lhs)
        shape = self.out_shape()
        for d, i in enumerate(idx):
            ok = ok & (i >= 0) & (i < values.shape[d])
        ok = np.broadcast_to(ok, shape)
        if not idx:  # a 0-d output: every grid axis was reduced to size 1
            value = float(x.value.item())
            stored = bool(x.mask.item()) and value != decl.empty
            values[()], masks[()] = (value if stored else decl.fill), stored
            return
        where = tuple(np.broadcast_to(i, shape)[ok] for i in idx)
        value = np.broadcast_to(x.value, shape)[ok]
        stored = np.broadcast_to(x.mask, shape)[ok]
        if decl.empty is not None:
            stored = stored & (value != decl.empty)
        values[where] = np.where(stored, value, decl.fill)
        masks[where] = stored


def _merge(merge: str, masks: list[Any]) -> Any:
    if merge == "cap":
        return np.logical_and.reduce(np.broadcast_arrays(*masks)) if len(masks) > 1 else masks[0]
    if merge == "cup":
        return np.logical_or.reduce(np.broadcast_arrays(*masks)) if len(masks) > 1 else masks[0]
    if merge == "all":
        return np.True_
    if merge == "lhs":
        return masks[0]
    if merge == "rhs":
        return masks[-1]
    if merge == "lhs_only":
        return masks[0] & ~masks[-1]
    return masks[-1] & ~masks[0]


def _product_factors(x: Expr) -> list[Expr]:
    """The factors of a product chain of ``*`` with the cap merge (any other node is one factor)."""
    if isinstance(x, Call) and x.op == "mul" and x.merge in (None, "cap"):
        return _product_factors(x.args[0]) + _product_factors(x.args[1])
    return [x]


def _einsum(arrays: list[np.ndarray], grid: tuple[int, ...], reduce_axes: tuple[int, ...]) -> np.ndarray:
    """Multiply grid-broadcastable arrays and sum ``reduce_axes`` (kept as size 1) via einsum."""
    ndim = len(grid)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[:ndim]
    operands, specs, present = [], [], set()
    for arr in arrays:
        arr = np.asarray(arr)
        arr = arr.reshape((1,) * (ndim - arr.ndim) + arr.shape)
        keep = [d for d in range(ndim) if arr.shape[d] != 1]
        operands.append(arr.reshape([arr.shape[d] for d in keep]))
        specs.append("".join(letters[d] for d in keep))
        present.update(keep)
    out_axes = [d for d in range(ndim) if d not in reduce_axes and d in present]
    spec = ",".join(specs) + "->" + "".join(letters[d] for d in out_axes)
    total = np.einsum(spec, *operands, optimize=True)
    for d in reduce_axes:  # a reduced variable no operand depends on repeats every term
        if d not in present:
            total = total * grid[d]
    shape = [1] * ndim
    for d, n in zip(out_axes, total.shape):
        shape[d] = n
    return total.reshape(shape)
