"""The first kernel grouping: which Einsums become one kernel.

A tensor is *inlined* into its reader when it is a temp written once by an element-wise Einsum
(no reduction, no filter, plain output indices), read by exactly one Einsum, and every variable
that reader iterates indexes the tensor (so inlining recomputes nothing). Every other tensor
is a kernel's output; a kernel computes it from its writes and the Einsums inlined into them.
So a bias add and the GELU after it are one kernel, the square inside a variance's sum is computed
inside the reduction, and a GEMM keeps its own kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import CompileError
from ..ir import Cascade, Einsum, IAccess, IVar, Loop
from ..ir.scope import access_vars, declarations, index_atoms, iteration_vars, reads


@dataclass(frozen=True)
class Kernel:
    """One generated function: the Einsums writing ``output`` (in order) and the tensors it reads."""

    name: str
    output: str
    writes: tuple[Einsum, ...]
    inlined: tuple[str, ...]
    inputs: tuple[str, ...]
    gathers: bool = False


def group_kernels(c: Cascade) -> list[Kernel]:
    """Kernels in execution order."""
    if any(isinstance(s, Loop) for s in c.stmts):
        raise CompileError("the CPU code generator does not handle 'for' loops yet")
    decls = declarations(c)
    writes: dict[str, list[Einsum]] = {}
    readers: dict[str, set[int]] = {}
    for i, (e, _) in enumerate(c.einsums()):
        writes.setdefault(e.lhs.tensor, []).append(e)
        for a in reads(e):
            readers.setdefault(a.tensor, set()).add(i)
    einsums = [e for e, _ in c.einsums()]
    inline = {t for t, ws in writes.items()
              if decls[t].role == "temp" and len(ws) == 1 and _elementwise(ws[0])
              and len(readers.get(t, ())) == 1 and _reads_each_once(einsums[next(iter(readers[t]))], t)}
    kernels, done = [], set()
    for e in einsums:
        t = e.lhs.tensor
        if t in inline or t in done:
            continue
        done.add(t)
        members = _inlined_into(writes[t], writes, inline)
        external, gathers = [], False
        for w in list(writes[t]) + [writes[m][0] for m in members]:
            for a in reads(w):
                gathers = gathers or any(isinstance(atom, IAccess) for ix in a.indices for atom in index_atoms(ix.expr))
                if a.tensor not in inline and a.tensor != t and a.tensor not in external:
                    external.append(a.tensor)
        kernels.append(Kernel(f"k{len(kernels)}_{t}", t, tuple(writes[t]), tuple(members), tuple(external), gathers))
    return kernels


def _reads_each_once(reader: Einsum, tensor: str) -> bool:
    """Whether every iteration variable of ``reader`` indexes its reads of ``tensor`` (so inlining
    the tensor's computation into the reader recomputes nothing; a GEMM operand fails this)."""
    used = {v for a in reads(reader) if a.tensor == tensor for v in access_vars(a)}
    return set(iteration_vars(reader)) <= used


def _elementwise(e: Einsum) -> bool:
    lhs = [ix.expr for ix in e.lhs.indices]
    return (not e.reduce and not e.populate and all(isinstance(x, IVar) for x in lhs)
            and len({x.name for x in lhs}) == len(lhs) and not any(ix.filter for ix in e.lhs.indices)
            and len(iteration_vars(e)) == len(lhs))


def _inlined_into(ws: list[Einsum], writes: dict[str, list[Einsum]], inline: set[str]) -> list[str]:
    """Inlined tensors a kernel needs, producers before consumers."""
    out: list[str] = []

    def visit(e: Einsum) -> None:
        for a in reads(e):
            if a.tensor in inline and a.tensor not in out:
                visit(writes[a.tensor][0])
                out.append(a.tensor)
    for w in ws:
        visit(w)
    return out
