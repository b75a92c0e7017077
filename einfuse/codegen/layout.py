"""Weight layouts chosen at compile time: a contraction vectorizes along its innermost output
dimension, so a weight read there should have that dimension innermost. PyTorch's ``Linear``
stores ``W[out, in]``; the GEMM ``Y[m,n] = X[m,k] * W[n,k]`` wants ``W[k,n]``. Weights are
constants, so the transposed copy is made once, at compile time, and the Einsum reads it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..ir import Access, Call, Cascade, Einsum, Index, IVar, TensorDecl
from ..ir.nodes import Expr
from ..ir.scope import declarations, reduced_vars


def transpose_weights(c: Cascade) -> Cascade:
    """``c`` with each contraction's weight reads moved to weights whose innermost dimension is
    the contraction's innermost output dimension."""
    decls = declarations(c)
    tensors, params, made = list(c.tensors), dict(c.params), {}
    stmts = []
    for s in c.stmts:
        if isinstance(s, Einsum) and reduced_vars(s) and s.lhs.indices and isinstance(s.lhs.indices[-1].expr, IVar):
            inner = s.lhs.indices[-1].expr.name
            s = replace(s, rhs=_rewrite(s.rhs, inner, decls, tensors, params, made))
        stmts.append(s)
    return replace(c, tensors=tuple(tensors), stmts=tuple(stmts), params=params)


def _rewrite(x: Expr, inner: str, decls: dict, tensors: list, params: dict, made: dict) -> Expr:
    if isinstance(x, Call):
        return replace(x, args=tuple(_rewrite(a, inner, decls, tensors, params, made) for a in x.args))
    if not isinstance(x, Access) or decls[x.tensor].role != "param" or x.tensor not in params:
        return x
    exprs = [ix.expr for ix in x.indices]
    if any(ix.filter for ix in x.indices) or not all(isinstance(e, IVar) for e in exprs):
        return x
    names = [e.name for e in exprs]
    if inner not in names or names[-1] == inner:
        return x
    d = names.index(inner)
    order = [i for i in range(len(names)) if i != d] + [d]
    key = (x.tensor, tuple(order))
    if key not in made:
        decl = decls[x.tensor]
        name = f"{x.tensor}_t"
        tensors.append(TensorDecl(name, tuple(decl.ranks[i] for i in order), "param", decl.dtype, decl.empty))
        params[name] = np.ascontiguousarray(np.transpose(params[x.tensor], order))
        made[key] = name
    return Access(made[key], tuple(Index(exprs[i]) for i in order))
