"""Lower a kernel (a group of Einsums) to a TIR PrimFunc through TE.

Each Einsum becomes a ``te.compute``: its map expression is the body, its reduce a top-level
``te.sum``/``te.max``/``te.min`` (or a product ``comm_reducer``), affine and gather indices pass
through. Sizes stay symbolic (``te.var``), so one kernel serves every length.

Generated code computes values only: an absent point reads as its tensor's fill (empty value, or
0 for dense tensors). Reads that may fall outside a tensor (padding, slabs of a concatenation,
gathers) and filtered reads are guarded; for ``max``/``min`` reductions over a product of reads
the guard also removes the point from the reduction, as the interpreter's occupancy rule does.
Partial writes (filtered or constant output indices, a tensor written by several Einsums)
select between the new value and what the tensor held.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import sympy
from tvm import te, tirx

from ..errors import CompileError
from ..ir import Access, Cascade, Const, Coord, Einsum, IAccess, IConst, ISym, IVar, TensorDecl
from ..ir.dtypes import DTYPES
from ..ir.nodes import Expr, IndexExpr, rewrite
from ..ir.scope import declarations, expr_accesses, reduced_vars, var_ranks
from ..ir.sizes import in_range
from ..ir.kernels import Kernel
from .op_lowering import NAN_REDUCERS, cast, const, dtype_of, fold, lower_op


class SizeVars:
    """Size symbols as TIR variables, shared by every kernel and the Relax graph."""

    def __init__(self) -> None:
        self.vars: dict[str, tirx.Var] = {}

    def loose(self, c: Cascade, kernel: Kernel) -> list[tirx.Var]:
        """The size symbols ``kernel`` uses that no dimension of its tensors is alone (a kernel
        reading ``K[L + 1]``): TVM cannot bind them from the buffers, so they travel as scalar
        parameters between the inputs and the output (``call_tir`` passes primitive arguments
        after the tensors, in the PrimFunc's order)."""
        decls, rank_size = declarations(c), {r.name: r.size for r in c.ranks}
        dims = [sympy.sympify(rank_size[r.rank] + int(r.iterative)) for t in (*kernel.inputs, kernel.output)
                for r in decls[t].ranks]
        bare = {d for d in dims if d.is_Symbol}
        used = set().union(*(d.free_symbols for d in dims), *(sympy.sympify(rank_size[r]).free_symbols
                                                                for r in _sizes_read(c, kernel)))
        return [self.expr(s) for s in sorted(used - bare, key=str)]

    def expr(self, size: Any) -> Any:
        """A sympy size as a TIR int64 expression."""
        size = sympy.sympify(size)
        if size.is_Integer:
            return tirx.const(int(size), "int64")
        if size.is_Symbol:
            return self.vars.setdefault(str(size), tirx.Var(str(size), "int64"))
        if size.is_Pow and size.exp.is_Integer and size.exp > 0:   # (n**2: an N x N tensor's elements)
            return fold(lambda a, b: a * b, [self.expr(size.base)] * int(size.exp))
        if size.is_Add:
            return fold(lambda a, b: a + b, [self.expr(a) for a in size.args])
        if isinstance(size, sympy.ceiling):  # ceiling(n/d): whole tiles of a symbolic length
            num, den = sympy.fraction(sympy.together(size.args[0]))   # ((s + 1)/64, not s/64 + 1/64)
            return tirx.floordiv(self.expr(num) + self.expr(den) - 1, self.expr(den))
        if size.is_Mul:
            num, den = sympy.fraction(size)
            if den != 1:
                return tirx.floordiv(self.expr(num), self.expr(den))
            return fold(lambda a, b: a * b, [self.expr(a) for a in size.args])
        raise CompileError(f"cannot generate code for the size {size}")

    def shapes(self, c: Cascade, kernel: Kernel) -> dict[str, list[Any]]:
        """The shape of each tensor ``kernel`` reads or writes: ints, or TIR expressions."""
        decls, size = declarations(c), {r.name: r.size for r in c.ranks}
        return {t: [v if isinstance(v, int) else self.expr(v) for v in (size[r.rank] for r in decls[t].ranks)]
                for t in (*kernel.inputs, kernel.output)}

    def arguments(self, c: Cascade, kernel: Kernel, shape: dict[str, list[Any]]) -> dict[str, Any]:
        """Inside a ``T.prim_func()`` frame, the kernel's name and its parameters: its inputs' buffers,
        its loose sizes (:meth:`loose`), its output's buffer; the buffers by tensor name."""
        from tvm.script.ir_builder import tirx as T
        decls = declarations(c)
        T.func_name(kernel.name)
        T.func_attr({"tirx.noalias": True})
        args = {t: T.arg(t, T.buffer(shape[t], DTYPES[decls[t].dtype].tvm)) for t in kernel.inputs}
        for v in self.loose(c, kernel):
            T.arg(v.name, v)
        args[kernel.output] = T.arg(kernel.output, T.buffer(shape[kernel.output], DTYPES[decls[kernel.output].dtype].tvm))
        return args


def _sizes_read(c: Cascade, kernel: Kernel) -> set[str]:
    """The ranks whose sizes ``kernel``'s Einsums read as values (``idx(L)``, ``m1*M0+m0``)."""
    ranks: set[str] = set()

    def note(node: Any) -> Any:
        if isinstance(node, ISym):
            ranks.add(node.rank)
        return node
    names = {kernel.output, *kernel.internal}
    rewrite(tuple(e for e, _ in c.einsums() if e.lhs.tensor in names), note)
    return ranks


class KernelBuilder:
    """Builds the TE tensors of one kernel and turns them into a PrimFunc."""

    def __init__(self, c: Cascade, kernel: Kernel, sizes: SizeVars, nan_reductions: bool = True) -> None:
        """``nan_reductions``: float max/min reductions propagate NaN (:data:`NAN_REDUCERS`); off
        for a GPU, whose schedules (dlight's cross-thread reductions) know only TIR's own reducers."""
        self.c, self.k, self.sizes = c, kernel, sizes
        self.nan_reductions = nan_reductions
        self.decls = declarations(c)
        self.ranks = var_ranks(c)
        self.rank_size = {r.name: r.size for r in c.ranks}
        self.tensors: dict[str, te.Tensor] = {}
        self.written: dict[str, list[Einsum]] = {}

    def shape(self, d: TensorDecl) -> list[Any]:
        return [self.sizes.expr(self.rank_size[r.rank] + int(r.iterative)) for r in d.ranks]

    def prim_func(self) -> tirx.PrimFunc:
        """The kernel as a PrimFunc with parameters (inputs..., output)."""
        params = [self.placeholder(name) for name in self.k.inputs]
        for name in self.k.internal:
            (w,) = [e for e, _ in self.c.einsums() if e.lhs.tensor == name]
            self.tensors[name] = self.einsum(w, None)
        out = None
        for w in self.k.writes:
            out = self.einsum(w, out)
        self.tensors[self.k.output] = out
        loose = self.sizes.loose(self.c, self.k)
        return te.create_prim_func(params + loose + [out]).with_attr("global_symbol", self.k.name)

    def placeholder(self, name: str) -> te.Tensor:
        d = self.decls[name]
        self.tensors[name] = te.placeholder(self.shape(d), DTYPES[d.dtype].tvm, name=name)
        return self.tensors[name]

    # ---- one Einsum ----------------------------------------------------------------------------

    def einsum(self, e: Einsum, previous: te.Tensor | None) -> te.Tensor:
        if e.populate is not None:
            raise CompileError(f"kernel {self.k.name}: populate ({e.populate.op}) has no CPU code generation yet")
        d = self.decls[e.lhs.tensor]
        dtype = DTYPES[d.dtype].tvm
        work = work_dtype(d.dtype, [self.decls[a.tensor].dtype for a in expr_accesses(e.rhs)])
        red = reduced_vars(e)
        partial = previous is not None or any(ix.filter for ix in e.lhs.indices) \
            or not all(isinstance(ix.expr, IVar) for ix in e.lhs.indices)
        second = bool(red) and (partial or work != dtype)  # a reduction must stay top level
        name = e.lhs.tensor + ("_value" if second else "")

        def body(*coords: Any) -> Any:
            env, conds = self.bind_outputs(e, coords)
            axes = [te.reduce_axis((0, self.sizes.expr(self.rank_size[self.ranks[v]])), name=v) for v in red]
            env.update({v: ax.var for v, ax in zip(red, axes)})
            value = self.reduce(e, env, axes, work)
            if second:
                return value
            if partial:
                value = self.partial(d, e, value, conds, previous, coords, dtype)
            return cast(value, dtype)
        shape = self.shape(d)
        result = te.compute(shape, body, name=name)
        if second:
            def select(*coords: Any) -> Any:
                _, conds = self.bind_outputs(e, coords)
                return self.partial(d, e, result[tuple(coords)].asobject(), conds, previous, coords, dtype)
            result = te.compute(shape, select, name=e.lhs.tensor)
        return result

    def bind_outputs(self, e: Einsum, coords: tuple) -> tuple[dict[str, Any], list[Any]]:
        """Output variables bound to coordinates, and the conditions for this point to be written."""
        env: dict[str, Any] = {}
        conds = []
        for ix, coord in zip(e.lhs.indices, coords):
            if isinstance(ix.expr, IVar) and ix.expr.name not in env:
                env[ix.expr.name] = coord
            else:
                conds.append(tirx.EQ(coord, self.index(ix.expr, env)[0]))
        for ix in e.lhs.indices:
            conds += [self.cond(c, env) for c in ix.filter]
        return env, conds

    def partial(self, d: TensorDecl, e: Einsum, value: Any, conds: list[Any], previous: te.Tensor | None,
                coords: tuple, dtype: str) -> Any:
        if not conds:
            return cast(value, dtype)
        other = previous[tuple(coords)].asobject() if previous is not None else const(d.fill, dtype)
        return tirx.Select(fold(tirx.And, conds), cast(value, dtype), cast(other, dtype))

    def reduce(self, e: Einsum, env: dict[str, Any], axes: list[Any], work: str) -> Any:
        value, valid = self.expr(e.rhs, env, work)
        if not axes:
            return value
        op = e.reduce.op if e.reduce else "+"
        identity = {"+": 0.0, "*": 1.0, "max": -math.inf, "min": math.inf}[op]
        if valid is not None and op in ("max", "min"):
            value = tirx.Select(valid, value, const(identity, work))
        if op == "+":
            return te.sum(value, axis=axes)
        if op in ("max", "min") and work.startswith("float") and self.nan_reductions:
            return NAN_REDUCERS[op](value, axis=axes)
        if op == "max":
            return te.max(value, axis=axes)
        if op == "min":
            return te.min(value, axis=axes)
        product = te.comm_reducer(lambda x, y: x * y, lambda t: tirx.const(1, t), name="product")
        return product(value, axis=axes)

    # ---- expressions ----------------------------------------------------------------------------

    def expr(self, x: Expr, env: dict[str, Any], work: str) -> tuple[Any, Any]:
        """The value of ``x`` in ``work`` dtype, and when it is a product of reads, where all are valid."""
        if isinstance(x, Const):
            return const(x.value, work), None
        if isinstance(x, Coord):
            return cast(self.index(x.expr, env)[0], work), None
        if isinstance(x, Access):
            return self.read(x, env, work)
        args = [self.expr(a, env, work) for a in x.args]
        value = lower_op(x.op, [a for a, _ in args], work)
        if x.op == "sub" and all(self.absent_is_minus_inf(a) for a in x.args):
            value = _absent_difference(args[0][0], args[1][0], value)
        valid = None
        if x.op == "mul":
            conds = [v for _, v in args if v is not None]
            valid = fold(tirx.And, conds) if conds else None
        return value, valid

    def absent_is_minus_inf(self, x: Expr) -> bool:
        """Whether ``x`` reads a computed tensor whose absent points are ``-inf`` (``empty=-inf``:
        masked scores, their maxima), where a ``-inf`` value is an absent point."""
        if not isinstance(x, Access):
            return False
        d = self.decls[x.tensor]
        return d.empty == -math.inf and d.role not in ("input", "param")

    def read(self, a: Access, env: dict[str, Any], work: str) -> tuple[Any, Any]:
        d = self.decls[a.tensor]
        idx, checks = [], []
        for ix, tr, extent in zip(a.indices, d.ranks, self.extents(a.tensor)):
            i, ok = self.index(ix.expr, env)
            if ok is not None:
                checks.append(ok)
            if not self.in_range(ix.expr, self.rank_size[tr.rank] + int(tr.iterative)):
                checks.append(tirx.And(i >= 0, i < extent))
                i = tirx.max(tirx.min(i, extent - 1), tirx.const(0, "int64"))
            idx.append(i)
            checks += [self.cond(c, env) for c in ix.filter]
        value = cast(self.load(a.tensor, idx), work)
        if not checks:
            return value, None
        valid = fold(tirx.And, checks)
        return tirx.Select(valid, value, const(d.fill, work)), valid

    def extents(self, name: str) -> list[Any]:
        """The shape of the tensor ``name`` as this kernel sees it."""
        return list(self.tensors[name].shape)

    def load(self, name: str, idx: list[Any]) -> Any:
        """The element of ``name`` at ``idx`` (in range)."""
        return self.tensors[name][tuple(idx)].asobject()

    def index(self, e: IndexExpr, env: dict[str, Any]) -> tuple[Any, Any]:
        """An index expression as int64, and (for gathers) when the gathered value is valid."""
        if isinstance(e, IVar):
            return tirx.Cast("int64", env[e.name]), None
        if isinstance(e, IConst):
            return tirx.const(e.value, "int64"), None
        if isinstance(e, ISym):
            return self.sizes.expr(self.rank_size[e.rank]), None
        if isinstance(e, IAccess):
            value, valid = self.read(e.access, env, "int64")
            return value, valid
        (a, av), (b, bv) = self.index(e.a, env), self.index(e.b, env)
        value = _INDEX_OPS[e.op](a, b)
        valid = tirx.And(av, bv) if av is not None and bv is not None else av if av is not None else bv
        return value, valid

    def cond(self, c: Any, env: dict[str, Any]) -> Any:
        a, b = self.index(c.lhs, env)[0], self.index(c.rhs, env)[0]
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": tirx.EQ(a, b), "!=": tirx.NE(a, b)}[c.cmp]

    def in_range(self, e: IndexExpr, extent: Any) -> bool:
        """True when ``e`` provably stays within ``[0, extent)`` for every value of its variables."""
        return in_range(e, extent, self.rank_size, self.ranks)


_INDEX_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "//": tirx.floordiv, "%": tirx.floormod,
}


def _absent_difference(a: Any, b: Any, difference: Any) -> Any:
    """``a - b`` of two points of ``empty=-inf`` tensors: absent (``-inf``) where both are, as the
    interpreter has it, not IEEE's ``nan`` (a fully masked row's ``exp(score - max)`` is 0)."""
    minus_inf = const(-math.inf, dtype_of(a))
    return tirx.Select(tirx.And(tirx.EQ(a, minus_inf), tirx.EQ(b, minus_inf)), minus_inf, difference)


def work_dtype(out: str, operands: list[str]) -> str:
    """The dtype an Einsum computes in: its output's if float, else float32 when it reads floats."""
    if DTYPES[out].is_float:
        return DTYPES[out].tvm
    return "float32" if any(DTYPES[o].is_float for o in operands) else "int64"
