"""Kernels: the mapping of a cascade's Einsums onto generated functions (``Cascade.groups``).

A :class:`Kernel` is the contract between grouping (``passes/group_kernels.py``, which forms
them) and code generation (which builds one function per kernel). It lives in the IR so that
every layer above can read it: the printer shows it as ``# kernel`` comments, the cost models
estimate it, exports save it (:func:`kernel_record`, :func:`kernel_from_record`).

Every kernel has a *kind* (:data:`KINDS`), the key by which each layer picks what to do with it:
grouping's merge rules form the kinds (``passes/group_kernels.MERGES``), the CPU schedule rules
(``codegen/schedules/cpu.RULES``) and the cost model (``targets/cost.ESTIMATES``) are tables keyed
by it, and a kind's declared properties (:class:`KernelKind`) say how code generation builds it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from ..errors import CompileError
from .analysis import analyze_passes
from .nodes import Cascade, Einsum, IVar, Loop, walk
from .scope import access_vars, declarations, index_atoms, lhs_vars, reads, reduced_vars, var_ranks


@dataclass(frozen=True)
class KernelKind:
    """A kind of kernel: ``name`` is the value of :attr:`Kernel.kind` (``""`` for a single kernel)."""

    name: str
    doc: str            # one line: what a kernel of this kind computes
    loop: bool = False  # built as scheduled TIR by a loop builder (codegen/loop.py), not lowered through TE
    one_pass: bool = False  # its builder reads each fiber once, whatever pass levels its Einsums take

    @property
    def label(self) -> str:
        """The name shown to users (a single kernel's is ``single``)."""
        return self.name or "single"


KINDS: dict[str, KernelKind] = {}


def register_kind(name: str, doc: str, *, loop: bool = False, one_pass: bool = False) -> KernelKind:
    """Declare the kernel kind ``name`` (see the module docstring for the tables it needs)."""
    if name in KINDS:
        raise ValueError(f"kernel kind '{name}' is declared twice")
    KINDS[name] = KernelKind(name, doc, loop, one_pass)
    return KINDS[name]


register_kind("", "one Einsum's output, with the element-wise Einsums inlined into it")
register_kind("epilogue", "a contraction whose element-wise reader runs on the register tile as it is stored")
register_kind("rows", "a row group (softmax, LayerNorm): stages over the same rows, one row at a time")
register_kind("attention", "a row group read by a contraction over its rows' variable (P V), per block of query rows")
register_kind("dequant", "a contraction whose weight is quantized: dequantized where it is loaded (a GEMV) or "
              "a panel at a time (a GEMM), never written out in float")
register_kind("int8-dot", "a 4-bit weight's contraction on int8 activations (quantize{compute=int8}): the "
              "activations quantized per block, then integer dot products (codegen/int8_dot.py)", loop=True)
register_kind("grouped", "each row times its own expert's weights, H[p,n] = W[G[p],d,n] * X[p,d], run by run of "
              "equal G (a mixture-of-experts FFN, codegen/grouped.py)", loop=True)
register_kind("select", "the coordinates of each fiber's k largest values in order (torch.topk's indices, "
              "captured as a rank count), one pass over the fiber (codegen/select.py)", loop=True, one_pass=True)
register_kind("decode", "a decode step's attention over a long cache: its keys split into chunks across the cores, "
              "each read once with an online max, merged per row (flash-decoding, codegen/decode.py)",
              loop=True, one_pass=True)
register_kind("loop", "a `for` loop (the 1-pass attention) with its initialisations and the Einsum reading its results",
              loop=True)


@dataclass(frozen=True)
class Kernel:
    """One generated function: the Einsums writing ``output`` (in order) and the tensors it reads."""

    name: str
    output: str
    writes: tuple[Einsum, ...]
    internal: tuple[str, ...]
    inputs: tuple[str, ...]
    gathers: bool = False
    stages: tuple[str, ...] = ()   # the internal tensors kept as loop nests (the others are inlined)
    kind: str = ""                 # a key of KINDS: "epilogue", "rows" or "attention" once kernels were absorbed

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CompileError(f"kernel {self.name} has the unknown kind '{self.kind}'; "
                               f"known: {', '.join(k.label for k in KINDS.values())}")

    def comment(self, c: Cascade) -> str:
        """The kernel as a line of the side table: ``# kernel k3_attn loop along S_2T,S_2I (1 pass):
        attn_rm, ... -> attn``."""
        stream, levels = stream_levels(c, self)
        along = f" along {','.join(stream)} ({len(levels) or 1} pass)" if stream else ""
        members = ", ".join(self.internal)
        return f"# kernel {self.name} {KINDS[self.kind].label}{along}: {members + ' -> ' if members else ''}{self.output}"

    def einsums(self, c: Cascade) -> list[Einsum]:
        """Every Einsum the kernel computes, in order."""
        inside = set(self.internal)
        return [e for e, _ in c.einsums() if e.lhs.tensor in inside] + list(self.writes)


def stream_levels(c: Cascade, k: Kernel) -> tuple[tuple[str, ...], set[int]]:
    """The ranks kernel ``k`` streams and the pass levels its Einsums take along them: the loop's
    rank and the ranks its body reduces that are tiled with it (``t*T+i``) for a loop kernel, else
    the rows of its last write (the variables it runs in parallel)."""
    stmts = _kernel_stmts(c, k)
    ranks = var_ranks(c)
    loop = next((s for s in stmts if isinstance(s, Loop)), None)
    if loop is not None:
        bound = frozenset({loop.var})
        reduced = {v for e, _ in walk(loop.body) for v in reduced_vars(e, bound)}
        tiled = {v for e, _ in walk(loop.body) for a in reads(e) for ix in a.indices
                 if loop.var in _index_names(ix.expr) for v in _index_names(ix.expr) & reduced}
        stream = (loop.rank, *sorted(ranks[v] for v in tiled))
    else:   # (the rows: a map's or a GEMM's output less its innermost variable, a row reduction's output)
        last = k.writes[-1]
        row = rows(last)
        out = lhs_vars(last)
        stream = tuple(ranks[v] for v in (row[0] if row and not contraction(last) else out[:-1]) or out)
    if not stream:
        return (), set()
    report = analyze_passes(replace(c, stmts=tuple(stmts)), stream)
    return stream, {x.level for x in report.levels if x.level > 0}


def streamed_inputs(c: Cascade, k: Kernel) -> list[str]:
    """The inputs of kernel ``k`` indexed by a rank it streams (the 1-pass attention's K and V)."""
    stream, _ = stream_levels(c, k)
    decls = declarations(c)
    return [n for n in k.inputs if any(r.rank in stream for r in decls[n].ranks)]


def _kernel_stmts(c: Cascade, k: Kernel) -> list:
    """The top-level statements computing ``k``'s Einsums (a loop kernel's loop whole)."""
    inside = set(k.internal) | {k.output}
    return [s for s in c.stmts if (isinstance(s, Loop) and any(e.lhs.tensor in inside for e, _ in walk(s.body)))
            or (isinstance(s, Einsum) and s.lhs.tensor in inside)]


def _index_names(x: Any) -> set[str]:
    return {a.name for a in index_atoms(x) if isinstance(a, IVar)}


def rows(e: Einsum) -> tuple[list[str], list[str]] | None:
    """(row variables, the variable along the row) of an element-wise map or a one-variable reduction."""
    out, red = lhs_vars(e), reduced_vars(e)
    if len(out) != len(e.lhs.indices) or not out:
        return None
    if not red:
        return out[:-1], out[-1:]
    return (out, red) if len(red) == 1 else None



def contraction(e: Einsum) -> bool:
    """A reduction with a read that some output variable does not index (reused across it: a GEMM)."""
    out = set(lhs_vars(e))
    return bool(reduced_vars(e)) and any(out - set(access_vars(a)) for a in reads(e))


def kernel_record(k: Kernel) -> dict[str, Any]:
    """``k`` as JSON data (an export's ``model.json``); its writes are every Einsum writing its output."""
    return {"name": k.name, "output": k.output, "internal": list(k.internal), "inputs": list(k.inputs),
            "gathers": k.gathers, "stages": list(k.stages), "kind": k.kind}


def kernel_from_record(c: Cascade, record: Mapping[str, Any]) -> Kernel:
    """The kernel of :func:`kernel_record` over the cascade ``c`` it was grouped from."""
    writes = tuple(e for e, _ in c.einsums() if e.lhs.tensor == record["output"])
    return Kernel(str(record["name"]), str(record["output"]), writes, tuple(record["internal"]),
                  tuple(record["inputs"]), bool(record["gathers"]), tuple(record["stages"]), str(record["kind"]))


def kernels_of(c: Cascade) -> list[Kernel]:
    """The kernels of a grouped cascade; a cascade that was never grouped is an error, never
    grouped here behind the caller's back (a compile groups it in its codegen pipeline)."""
    if not c.groups and c.stmts:
        raise CompileError(f"cascade {c.name} has no kernel groups: run the 'group-kernels' pass "
                           "(the codegen pipeline of its target) before generating code")
    return list(c.groups)
