"""The ``int8-dot`` kernel: a 4-bit weight's contraction on integer dot products, as TIR (issue 19).

The kernel of ``quantize{compute=int8}``'s Einsums (:mod:`einfuse.ir.int8_dot`: the activations'
per-block max, their int8 values, the two-level contraction), what llama.cpp's
``ggml_vec_dot_q4_0_q8_0`` and ONNX Runtime's ``MatMulNBits accuracy_level=4`` compute. One
PrimFunc, ``(x, packed, scale, [zero,] y)`` in the kernel's input order, in two parts:

1. the activations quantized, a loop over (row, block) (parallel from 2^17 elements on; one
   thread is faster below, a parallel launch costs more than the work): ``max |x|`` over 16-lane
   vectors as int32 bits (``|x|`` orders as its bits do, an integer max reduces as a tree, and a
   NaN's bits are above every number's: a NaN makes its block's scale NaN, so its row's outputs,
   as in the interpreter), ``xq = nearbyint(x * (127 / max))`` stored as int8, ``xd = max / 127``,
   ``xs = sum(xq)``;
2. the dot: parallel over tiles of ``NV`` vectors of ``L`` output channels, ``MR`` rows at a time
   (the last tile's overhang recomputes the last row), per block each packed weight vector split
   into its low and high nibbles and multiplied into every row's int32 accumulators four bytes a
   lane (``vpdpbusd``: the weights unsigned, four activation bytes broadcast signed), then
   ``f32 += float(dot - z * xs) * (scale * xd)``.

ISAs (:func:`einfuse.targets.int8_isa`): ``avx512`` (``llvm.x86.avx512.vpdpbusd.512``, 16 lanes;
LLVM 22 declares it on byte vectors, so TVM's own int32-operand VNNI intrinsic fails its
verifier), ``avxvnni`` (the ``.256`` form, VEX-encoded on an AVX-VNNI target, 8 lanes), ``avx2``
(no VNNI: ``vpmaddubsw`` to int16, exact since 2 * 15 * 128 < 2^15, then ``vpmaddwd`` by ones).
Accumulators are ``"global"`` buffers under 1 KB (stack slots LLVM keeps in registers; a
``"local"`` one is a workspace call on an llvm target). Measurements: docs/vnni_prototype.md.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..errors import CompileError
from ..ir import Access, Call, Cascade, Const, Einsum
from ..ir.nodes import Expr
from ..ir.dtypes import DTYPES
from ..ir.int8_dot import Int8Dot, parts
from ..ir.kernels import Kernel
from ..ir.scope import declarations, reads
from ..targets import Target, int8_isa
from .lower import SizeVars
from .op_lowering import lower_op

MAX_ROWS = {"avx512": 8, "avxvnni": 4, "avx2": 4}   # rows a register tile (8 f32 + 8 int32 accumulators of 32 zmm)
PARALLEL_QUANTIZE = 1 << 17   # activations quantized by one thread below this many


@dataclass(frozen=True)
class Spec:
    """One int8 contraction and its tiling: ``rows x k`` activations, ``n x k`` weights."""

    rows: Any                  # an int, or a TIR expression of size variables (symbolic rows)
    n: int
    k: int
    block: int                 # the weight's block (= the activations') along k
    zero: int | None           # the constant zero point (q4_0: 8), None for one per (n, block)
    isa: str
    lanes: int
    mr: int                    # rows a register tile
    nv: int                    # vectors of L output channels a tile

    @property
    def tile(self) -> int:
        return self.nv * self.lanes

    @property
    def blocks(self) -> int:
        return self.k // self.block


def tiling(rows: int, n: int, lanes: int, isa: str) -> tuple[int, int]:
    """(MR, NV) for ``rows``: one row takes four vectors of channels (four independent
    accumulator chains), more rows share each unpacked weight vector (up to MAX_ROWS); NV divides
    the channels' vectors."""
    mr = min(rows, MAX_ROWS[isa])
    nv = 4 if mr == 1 else (2 if mr <= 4 else 1)
    while (n // lanes) % nv:
        nv //= 2
    return mr, nv


def _branch(cond: Any, then: Callable[[], None], otherwise: Callable[[], None]) -> None:
    """``then()`` where ``cond`` holds, else ``otherwise()``: chosen here for a Python bool (static
    sizes), at run time for a TIR condition (symbolic rows)."""
    if isinstance(cond, bool):
        (then if cond else otherwise)()
        return
    with T.If(cond):
        with T.Then():
            then()
        with T.Else():
            otherwise()


def int8_function(c: Cascade, k: Kernel, sizes: SizeVars, target: Target) -> tirx.PrimFunc:
    """Kernel ``k`` (of kind ``int8-dot``) as a PrimFunc for ``target``."""
    dot = next((e for e in k.einsums(c) if parts(c, e) is not None), None)
    isa = int8_isa(target)
    if dot is None or isa is None:
        raise CompileError(f"kernel {k.name}: not an int8 contraction for {target.name}")
    found = parts(c, dot)
    shape = sizes.shapes(c, k)
    n, k_len = shape[k.output][-1], shape[found.x][-1]
    blocks, lanes = shape[found.packed][1], shape[found.packed][3] // 4
    rows = prod(shape[found.x][:-1])
    spec = lambda r: Spec(rows, n, k_len, k_len // blocks, None if found.zero else 8, isa, lanes,   # noqa: E731
                          *tiling(r, n, lanes, isa))
    s = spec(rows if isinstance(rows, int) else MAX_ROWS[isa])
    with IRBuilder() as ib, T.prim_func():
        args = sizes.arguments(c, k, shape)
        x = T.decl_buffer((rows, s.k), "float32", data=args[found.x].data)
        xq = T.decl_buffer((rows, s.k), "int8", scope="global")
        xd = T.decl_buffer((rows, s.blocks), "float32", scope="global")
        xs = T.decl_buffer((rows, s.blocks), "int32", scope="global")
        _quantize(s, x, xq, xd, xs)
        weights = [args[found.packed], args[found.scale], args[found.zero] if found.zero else None]
        store = Epilogue(c, k, dot, found, args, s)
        if isinstance(rows, int):
            _dot(s, xq, xd, xs, *weights, store)
        else:   # (symbolic rows: one row, a decoder's step, has its own tiling)
            _branch(tirx.EQ(rows, tirx.const(1, "int64")), lambda: _dot(spec(1), xq, xd, xs, *weights, store),
                    lambda: _dot(s, xq, xd, xs, *weights, store))
    return ib.get()


class Epilogue:
    """The store of the accumulators: the kernel's element-wise Einsums after the contraction
    (grouping's ``_int8_epilogue``: a bias, an activation, a residual), on each vector of
    ``L`` outputs, reading their other operands as ``[rows, n]`` or ``[n]``, in float32."""

    def __init__(self, c: Cascade, k: Kernel, dot: Einsum, found: Int8Dot, args: dict[str, Any], s: Spec) -> None:
        decls = declarations(c)
        self.spec, self.dot = s, dot.lhs.tensor
        inside = {self.dot, found.amax, found.xq}
        self.writers = {e.lhs.tensor: e for e in k.einsums(c) if e.lhs.tensor not in inside}   # (the epilogue's)
        self.flat = {t: T.decl_buffer((s.rows, s.n) if len(decls[t].ranks) > 1 else (s.n,), DTYPES[decls[t].dtype].tvm,
                                      data=buf.data) for t, buf in args.items() if t in self._plain(c, k)}
        self.output = k.output

    def _plain(self, c: Cascade, k: Kernel) -> set[str]:
        """The tensors the store reads or writes (the output and the epilogue's operands)."""
        return {k.output} | {a.tensor for e in self.writers.values() for a in reads(e)} - set(self.writers) - {self.dot}

    def __call__(self, acc: Any, r: int, v: int, row: Any, n0: Any) -> None:
        """Store accumulator vector ``acc[r, v]`` as outputs ``(row, n0 .. n0 + L)``: a vectorized
        loop of scalar expressions (the op lowerings are scalar; TVM vectorizes them)."""
        out = self.flat[self.output]
        with T.vectorized(0, self.spec.lanes) as lane:
            value = acc[r, v, lane]
            if self.output != self.dot:
                value = self.value(self.writers[self.output].rhs, value, row, n0 + lane)
            T.buffer_store(out, tirx.Cast(out.dtype, value), [row, n0 + lane])

    def value(self, x: Expr, acc: Any, row: Any, n: Any) -> Any:
        """``x`` at output ``(row, n)``, float32 (``acc``: the contraction's value there)."""
        if isinstance(x, Const):
            return _f32(float(x.value))
        if isinstance(x, Access):
            if x.tensor == self.dot:
                return acc
            if x.tensor in self.writers:
                return self.value(self.writers[x.tensor].rhs, acc, row, n)
            buf = self.flat[x.tensor]
            return tirx.Cast("float32", buf[row, n] if len(buf.shape) == 2 else buf[n])
        if isinstance(x, Call):
            return lower_op(x.op, [self.value(a, acc, row, n) for a in x.args], "float32")
        raise CompileError(f"int8-dot epilogue: cannot generate {type(x).__name__}")


def _vec(buf: Any, index: list[Any], lanes: int) -> Any:
    """``lanes`` consecutive elements of ``buf`` along its last axis from ``index``."""
    return buf[tuple(index[:-1]) + (tirx.Ramp(index[-1], 1, lanes),)]


def _splat(value: Any, lanes: int) -> Any:
    return tirx.Broadcast(value, lanes)


def _f32(value: float) -> Any:
    return tirx.const(value, "float32")


def _dot4(s: Spec, acc: Any, w: Any, x4: Any) -> Any:
    """``acc[i] + sum_c w[4i + c] * x4[4i + c]`` (u8 x s8, int32 lanes)."""
    if s.isa in ("avx512", "avxvnni"):
        name = "llvm.x86.avx512.vpdpbusd.512" if s.lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"
        return tirx.call_llvm_pure_intrin(f"int32x{s.lanes}", name, acc, w, x4)
    pairs = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", w, x4)
    return acc + tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs,
                                            _splat(tirx.const(1, "int16"), 16))


def _quantize(s: Spec, x: Any, xq: Any, xd: Any, xs: Any) -> None:
    """Per block ``b`` of row ``m``: ``xd = max|x| / 127``, ``xq = round(x * (127 / max|x|))``
    (int8, ties to even; 0 for a block of zeros) and ``xs = sum(xq)``."""
    _branch(s.rows * s.k >= PARALLEL_QUANTIZE, lambda: _quantize_blocks(s, T.parallel, x, xq, xd, xs),
            lambda: _quantize_blocks(s, T.serial, x, xq, xd, xs))


def _quantize_blocks(s: Spec, loop: Any, x: Any, xq: Any, xd: Any, xs: Any) -> None:
    lanes, chunks = 16, s.block // 16
    with loop(0, s.rows * s.blocks) as p:
        m, b = p // s.blocks, p % s.blocks
        pieces = [_vec(x, [m, b * s.block + i * lanes], lanes) for i in range(chunks)]
        amax = None   # (|x| as int32 bits: a NaN's are above every number's, so it propagates)
        for piece in pieces:
            bits = tirx.reinterpret(f"int32x{lanes}", tirx.abs(piece))
            amax = bits if amax is None else tirx.max(amax, bits)
        bits = tirx.call_llvm_pure_intrin("int32", "llvm.vector.reduce.smax", amax)
        top = T.bind(tirx.reinterpret("float32", bits))
        T.buffer_store(xd, top / _f32(127.0), [m, b])
        inv = T.bind(tirx.Select(top > _f32(0.0), _f32(127.0) / top, _f32(0.0)))
        total = None
        for i, piece in enumerate(pieces):
            T.buffer_store(xq, tirx.Cast(f"int8x{lanes}", tirx.nearbyint(piece * _splat(inv, lanes))),
                           [m, tirx.Ramp(b * s.block + i * lanes, 1, lanes)])
            wide = tirx.Cast(f"int32x{lanes}", _vec(xq, [m, b * s.block + i * lanes], lanes))
            total = wide if total is None else total + wide
        T.buffer_store(xs, tirx.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", total), [m, b])


def _dot(s: Spec, xq: Any, xd: Any, xs: Any, wp: Any, wd: Any, wz: Any, store: Epilogue) -> None:
    """``y[m, n] = sum_b (dot_b - z * xs[m, b]) * wd * xd[m, b]`` (layouts: :mod:`einfuse.ir.int8_dot`)."""
    L, half, tiles = s.lanes, s.block // 8, s.n // s.tile
    with T.parallel(0, tiles) as t, T.serial(0, (s.rows + s.mr - 1) // s.mr) as m0:
        rows = [tirx.min(m0 * s.mr + r, s.rows - 1) for r in range(s.mr)]
        acc = T.decl_buffer((s.mr, s.nv, L), "float32", scope="global")
        dots = T.decl_buffer((s.mr, s.nv, L), "int32", scope="global")
        _fill(s, acc, _f32(0.0))
        with T.serial(0, s.blocks) as b:
            _fill(s, dots, tirx.const(0, "int32"))
            with T.unroll(0, half) as j:
                _block_step(s, xq, wp, dots, rows, t, b, j)
            _block_end(s, xd, xs, wd, wz, acc, dots, rows, t, b)
        for r in range(s.mr):
            for v in range(s.nv):
                store(acc, r, v, rows[r], t * s.tile + v * L)


def _fill(s: Spec, buf: Any, value: Any) -> None:
    for r in range(s.mr):
        for v in range(s.nv):
            T.buffer_store(buf, _splat(value, s.lanes), [r, v, tirx.Ramp(0, 1, s.lanes)])


def _block_step(s: Spec, xq: Any, wp: Any, dots: Any, rows: list[Any], t: Any, b: Any, j: Any) -> None:
    """Packed vector ``j`` of block ``b``: each of its nibble halves into every row's chain."""
    L, nibble = s.lanes, _splat(tirx.const(15, "uint8"), 4 * s.lanes)
    for v in range(s.nv):
        packed = T.bind(_vec(wp, [t * s.nv + v, b, j, 0], 4 * L))
        halves = [tirx.bitwise_and(packed, nibble), tirx.shift_right(packed, _splat(tirx.const(4, "uint8"), 4 * L))]
        for h, w in enumerate(halves):
            for r, m in enumerate(rows):
                x4 = tirx.reinterpret("int32", _vec(xq, [m, b * s.block + h * (s.block // 2) + 4 * j], 4))
                x4 = tirx.reinterpret(f"int8x{4 * L}", _splat(x4, L))
                T.buffer_store(dots, _dot4(s, _vec(dots, [r, v, 0], L), w, x4), [r, v, tirx.Ramp(0, 1, L)])


def _block_end(s: Spec, xd: Any, xs: Any, wd: Any, wz: Any, acc: Any, dots: Any, rows: list[Any], t: Any, b: Any) -> None:
    """Block ``b``'s int32 dots, less the zero point's share, scaled into the f32 accumulators."""
    L = s.lanes
    for v in range(s.nv):
        scale = T.bind(tirx.Cast(f"float32x{L}", _vec(wd, [t * s.nv + v, b, 0], L)))
        zero = None if wz is None else T.bind(tirx.Cast(f"int32x{L}", _vec(wz, [t * s.nv + v, b, 0], L)))
        for r, m in enumerate(rows):
            shift = _splat(xs[m, b] * s.zero, L) if zero is None else zero * _splat(xs[m, b], L)
            dot = _vec(dots, [r, v, 0], L) - shift
            total = _vec(acc, [r, v, 0], L) + tirx.Cast(f"float32x{L}", dot) * (scale * _splat(xd[m, b], L))
            T.buffer_store(acc, total, [r, v, tirx.Ramp(0, 1, L)])
