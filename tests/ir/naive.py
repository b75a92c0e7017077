"""A point-by-point evaluator of loop-free, gather-free cascades: slow, obviously faithful to the
semantics in docs/ir.md, and independent of the vectorized interpreter it checks."""
from __future__ import annotations

import itertools
import math
import operator

import numpy as np

from einfuse.ir import Access, Cascade, Const, Coord, IBin, IConst, ISym, IVar
from einfuse.ir import ops
from einfuse.ir.scope import declarations, iteration_vars, lhs_vars

_CMP = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
        "!=": operator.ne}
_IOP = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv, "%": operator.mod}


def naive_interpret(c: Cascade, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    decls = declarations(c)
    sizes = {r.name: r.size for r in c.ranks}
    store = {k: {idx: float(v) for idx, v in np.ndenumerate(np.asarray(a, dtype=float))} for k, a in inputs.items()}
    for e, _ in c.einsums():
        point_vars = iteration_vars(e)
        groups: dict[tuple, list[tuple[float, bool]]] = {}
        for point in itertools.product(*[range(sizes[v.upper()]) for v in point_vars]):
            env = dict(zip(point_vars, point))
            out = _index(e.lhs, env, sizes)
            if out is None:
                continue
            groups.setdefault(out, []).append(_eval(e.rhs, env, store, decls, sizes))
        results = {k: _reduce(e, v) for k, v in groups.items()}
        if e.populate is not None:
            results = _populate(e, results)
        target = store.setdefault(e.lhs.tensor, {})
        shape = [sizes[r.rank] for r in decls[e.lhs.tensor].ranks]
        for idx, (value, present) in results.items():
            if all(0 <= i < n for i, n in zip(idx, shape)):
                if present and value != decls[e.lhs.tensor].empty:  # None (dense) never equals
                    target[idx] = value
                else:
                    target.pop(idx, None)
    outs = {}
    for t in c.tensors:
        if t.role == "output":
            arr = np.full([sizes[r.rank] for r in t.ranks], t.fill)
            for idx, v in store.get(t.name, {}).items():
                arr[idx] = v
            outs[t.name] = arr
    return outs


def _ival(e, env, sizes) -> int:
    if isinstance(e, IVar):
        return env[e.name]
    if isinstance(e, IConst):
        return e.value
    if isinstance(e, ISym):
        return sizes[e.rank]
    assert isinstance(e, IBin)
    return _IOP[e.op](_ival(e.a, env, sizes), _ival(e.b, env, sizes))


def _index(a: Access, env, sizes) -> tuple | None:
    """The point an access names, or None where a filter is false."""
    for ix in a.indices:
        if not all(_CMP[c.cmp](_ival(c.lhs, env, sizes), _ival(c.rhs, env, sizes)) for c in ix.filter):
            return None
    return tuple(_ival(ix.expr, env, sizes) for ix in a.indices)


def _eval(x, env, store, decls, sizes) -> tuple[float, bool]:
    if isinstance(x, Const):
        return x.value, True
    if isinstance(x, Coord):
        return float(_ival(x.expr, env, sizes)), True
    if isinstance(x, Access):
        idx = _index(x, env, sizes)
        data = store.get(x.tensor, {})
        if idx is not None and idx in data:
            return data[idx], True
        return decls[x.tensor].fill, False
    op = ops.OPS[x.op]
    args = [_eval(a, env, store, decls, sizes) for a in x.args]
    present = _merge(x.merge or op.merge, [p for _, p in args])
    with np.errstate(all="ignore"):
        value = float(op.fn(*[np.float64(v) for v, _ in args]))
    return (value if present else 0.0), present


def _merge(merge: str, p: list[bool]) -> bool:
    return {"cap": all(p), "cup": any(p), "all": True, "lhs": p[0], "rhs": p[-1],
            "lhs_only": p[0] and not p[-1], "rhs_only": p[-1] and not p[0]}[merge]


def _reduce(e, items: list[tuple[float, bool]]) -> tuple[float, bool]:
    if e.reduce is None and len(items) == 1 and not _has_reduced(e):
        return items[0]
    r = ops.REDUCE_OPS[e.reduce.op if e.reduce else "+"]
    present = [v for v, p in items if p]
    ok = all(p for _, p in items) if e.reduce is not None and e.reduce.merge == "cap" else bool(present)
    if not ok:
        return 0.0, False
    with np.errstate(all="ignore"):
        return float(r.fn(np.array(present + [r.identity]))), True


def _has_reduced(e) -> bool:
    return bool(set(iteration_vars(e)) - set(lhs_vars(e)))


def _populate(e, results: dict[tuple, tuple[float, bool]]) -> dict[tuple, tuple[float, bool]]:
    p = e.populate
    axis = [ix.expr.name for ix in e.lhs.indices].index(p.var)
    largest, _ = ops.POPULATE_OPS[p.op]
    fibers: dict[tuple, list[tuple]] = {}
    for idx in results:
        fibers.setdefault(idx[:axis] + idx[axis + 1:], []).append(idx)
    kept = dict(results)
    for members in fibers.values():
        present = [i for i in sorted(members, key=lambda i: i[axis]) if results[i][1]]
        nan = lambda i: math.isnan(results[i][0])  # noqa: E731  (NaN ranks above +inf, as in torch.topk)
        present.sort(key=lambda i: (nan(i) != largest, 0.0 if nan(i) else -results[i][0] if largest else results[i][0]))
        for i in members:
            if i not in present[:p.k]:
                kept[i] = (0.0, False)
    return kept
