"""Feasibility prototype: a 4-bit weight GEMV/GEMM on integer dot products (issue 19, ``compute=int8``).

    python -m benchmarks.vnni_proto [--rows 1,8,16] [--formats q4_0,int4-g128] [--repeat 20]

``y[m, n] = sum_k x[m, k] * W[n, k]`` with ``W`` stored as 4-bit values ``q`` (0..15) per block
of ``B`` along k, ``W = (q - z) * s`` (``q4_0``: ``z = 8``, ``B = 32``, ``s`` f16; ``int4-gG``:
``z[n, g]``, ``B = G``, ``s`` f32). The activations are quantized per block of ``B`` too, as
llama.cpp's ``q8_0`` (``d = max|x| / 127``, ``xq = round(x * 127 / max|x|)``), and each block is one int32
dot product of the int8 activations and the unsigned 4-bit values, corrected for the zero point
(``dot - z * sum(xq)``) and scaled by ``s * d`` in f32: what llama.cpp's
``ggml_vec_dot_q4_0_q8_0`` and ONNX Runtime's ``MatMulNBits accuracy_level=4`` do.

Two kernels, both written with TVM's IR builder (as ``einfuse.codegen.loop`` writes its own):

* ``quantize``: per block of a row, the ``d``, the int8 values and their sum.
* ``dot``: one parallel loop over tiles of ``NV`` vectors of ``L`` output channels; in a tile,
  ``MR`` rows at a time; per block, each packed weight vector is unpacked to two (low and high
  nibbles) and multiplied into every row's int32 accumulators with ``vpdpbusd`` (u8 x s8, four
  k a lane: the weights are the unsigned operand, four activation bytes broadcast the signed one).

Packed weight layout (repacked at compile time, weights are constants): ``wp[t, b, v, j, 4L]``,
byte ``4 * lane + c`` of vector ``(t, b, v, j)`` holds, for output channel
``n = t * NT + v * L + lane`` (``NT = NV * L``), element ``k = b * B + 4 * j + c`` of block ``b``
in its low nibble and element ``k + B / 2`` in its high nibble. Scales and zero points are
``[t, b, NT]``. ``L`` is 16 int32 lanes on AVX-512 (a zmm), 8 on AVX2 (a ymm).

LLVM 22 (TVM 0.27's) declares ``llvm.x86.avx512.vpdpbusd.*`` on byte vectors (``<64 x i8>``):
TVM's own ``dot_16x4_vnni`` tensor intrinsic (int32 operands) fails LLVM's verifier, so the call
is written here with the byte vectors. The 8-lane form on an AVX2 target with ``+avxvnni``
is AVX-VNNI's VEX ``vpdpbusd``. Checked against numpy (the same arithmetic in float64) and ORT's
``accuracy_level=4`` (tests/test_benchmarks.py); notes and numbers: docs/vnni_prototype.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T
from tvm.target import Target

import einfuse
from benchmarks.quant import K, N, _values, ort_matmul_nbits
from benchmarks.run import PAUSE, MatMul

ISAS = {   # name -> (int32 lanes a vector, rows a register tile at most, the LLVM target that builds it)
    "avx512": (16, 8, {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}),           # vpdpbusd zmm
    "avxvnni": (8, 4, {"kind": "llvm", "mcpu": "x86-64-v3", "mattr": ["+avxvnni"]}),  # {vex} vpdpbusd ymm
    "avx2": (8, 4, {"kind": "llvm", "mcpu": "x86-64-v3"}),                            # vpmaddubsw + vpmaddwd
}
PARALLEL_QUANTIZE = 1 << 17   # activations quantized by one thread below this many (16 x 4096: 16 us alone,
                              # a parallel launch costs 8 us here)


@dataclass(frozen=True)
class Spec:
    """One quantized matmul and its tiling: ``rows x k`` activations, ``n x k`` weights."""
    rows: int
    n: int
    k: int
    block: int                 # weight block (= activation block) along k
    zero: int | None           # the constant zero point (q4_0: 8), None for one per (n, block)
    scale_dtype: str           # the stored weight scales' dtype
    isa: str = "avx512"
    mr: int = 1                # rows a register tile
    nv: int = 4                # vectors of L output channels a tile

    @property
    def lanes(self) -> int:
        return ISAS[self.isa][0]

    @property
    def tile(self) -> int:
        return self.nv * self.lanes

    @property
    def blocks(self) -> int:
        return self.k // self.block

    def target(self) -> Target:
        return Target(ISAS[self.isa][2])


def spec_for(fmt: str, rows: int, n: int, k: int, isa: str = "avx512") -> Spec:
    """The spec of ``fmt`` (``q4_0`` or ``int4-gG``) with a tiling for ``rows``: one row takes
    four vectors of channels (four independent accumulator chains), more rows share each
    unpacked weight vector, up to 8 (8 f32 and 8 int32 accumulators, of 32 zmm)."""
    block, zero, dtype = (32, 8, "float16") if fmt == "q4_0" else (int(fmt.split("-g")[1]), None, "float32")
    mr = min(rows, ISAS[isa][1])
    return Spec(rows, n, k, block, zero, dtype, isa, mr=mr, nv=4 if mr == 1 else (2 if mr <= 4 else 1))


# ---- weights: repack to the kernel's layout ---------------------------------------------------

def pack_weights(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, s: Spec) -> list[np.ndarray]:
    """``q`` ([n, k], 0..15), ``scale`` and ``zero`` ([n, blocks]) in the kernel's layout
    (module docstring): ``[wp, wd]``, and ``wz`` (uint8) for per-block zero points."""
    tiles, half = s.n // s.tile, s.block // 8
    q7 = q.astype(np.uint8).reshape(tiles, s.nv, s.lanes, s.blocks, 2, half, 4)  # k = b*B + h*B/2 + 4j + c
    byte = q7[:, :, :, :, 0] | (q7[:, :, :, :, 1] << 4)                      # [t, v, lane, b, j, c]
    wp = byte.transpose(0, 3, 1, 4, 2, 5).reshape(tiles, s.blocks, s.nv, half, 4 * s.lanes)

    def per_block(a: np.ndarray, dtype: str) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(tiles, s.tile, s.blocks).transpose(0, 2, 1).astype(dtype))
    out = [np.ascontiguousarray(wp), per_block(scale, s.scale_dtype)]
    return out if s.zero is not None else out + [per_block(zero, "uint8")]


# ---- the kernels --------------------------------------------------------------------------------

def _vec(buf: Any, index: list[Any], lanes: int) -> Any:
    """``lanes`` consecutive elements of ``buf`` along its last axis from ``index``."""
    return buf[tuple(index[:-1]) + (tirx.Ramp(index[-1], 1, lanes),)]


def _splat(value: Any, lanes: int) -> Any:
    return tirx.Broadcast(value, lanes)


def _dot4(s: Spec, acc: Any, w: Any, x4: Any) -> Any:
    """``acc[i] + sum_c w[4i + c] * x4[4i + c]`` (u8 x s8, int32 lanes)."""
    lanes = s.lanes
    if s.isa in ("avx512", "avxvnni"):
        name = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"
        return tirx.call_llvm_pure_intrin(f"int32x{lanes}", name, acc, w, x4)
    # AVX2 without VNNI: pairs to int16 (no saturation: 2 * 15 * 128 < 2^15), then pairs to int32
    pairs = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", w, x4)
    return acc + tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, _splat(tirx.const(1, "int16"), 16))


def quantize_kernel(s: Spec) -> tirx.PrimFunc:
    """``quantize(x, xq, xd, xs)``: per block ``b`` of row ``m``, ``xd[m, b] = max|x| / 127``,
    ``xq = round(x * (127 / max|x|))`` (int8, ties to even; 0 for a block of zeros; ORT's
    ``MlasQ80BlkQuant`` multiplies by the inverse too) and ``xs[m, b] = sum(xq)``."""
    lanes, chunks = 16, s.block // 16
    with IRBuilder() as ib, T.prim_func():
        T.func_name("quantize")
        T.func_attr({"tirx.noalias": True})
        x = T.arg("x", T.buffer((s.rows, s.k), "float32"))
        xq = T.arg("xq", T.buffer((s.rows, s.k), "int8"))
        xd = T.arg("xd", T.buffer((s.rows, s.blocks), "float32"))
        xs = T.arg("xs", T.buffer((s.rows, s.blocks), "int32"))
        loop = T.parallel if s.rows * s.k >= PARALLEL_QUANTIZE else T.serial
        with loop(0, s.rows * s.blocks) as p:
            m, b = p // s.blocks, p % s.blocks
            parts = [_vec(x, [m, b * s.block + i * lanes], lanes) for i in range(chunks)]
            amax = tirx.abs(parts[0])
            for part in parts[1:]:
                amax = tirx.max(amax, tirx.abs(part))
            # |x| >= 0 orders as its int32 bits do: an integer max reduces as a tree (a float max
            # reduction keeps NaN's order, a chain of 16 compares)
            bits = tirx.call_llvm_pure_intrin("int32", "llvm.vector.reduce.smax", tirx.reinterpret(f"int32x{lanes}", amax))
            top = T.bind(tirx.reinterpret("float32", bits))
            T.buffer_store(xd, top / tirx.const(127.0, "float32"), [m, b])
            inv = T.bind(tirx.Select(top > tirx.const(0.0, "float32"), tirx.const(127.0, "float32") / top,
                                     tirx.const(0.0, "float32")))
            total = None
            for i, part in enumerate(parts):
                T.buffer_store(xq, tirx.Cast(f"int8x{lanes}", tirx.nearbyint(part * _splat(inv, lanes))),
                               [m, tirx.Ramp(b * s.block + i * lanes, 1, lanes)])
                wide = tirx.Cast(f"int32x{lanes}", _vec(xq, [m, b * s.block + i * lanes], lanes))
                total = wide if total is None else total + wide
            T.buffer_store(xs, tirx.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", total), [m, b])
    return ib.get()


def dot_kernel(s: Spec) -> tirx.PrimFunc:
    """``dot(xq, xd, xs, wp, wd, [wz,] y)``: ``y[m, n] = sum_b (dot_b - z * xs[m, b]) * wd * xd[m, b]``
    (layouts in the module docstring)."""
    L, half, tiles = s.lanes, s.block // 8, s.n // s.tile
    with IRBuilder() as ib, T.prim_func():
        T.func_name("dot")
        T.func_attr({"tirx.noalias": True})
        xq = T.arg("xq", T.buffer((s.rows, s.k), "int8"))
        xd = T.arg("xd", T.buffer((s.rows, s.blocks), "float32"))
        xs = T.arg("xs", T.buffer((s.rows, s.blocks), "int32"))
        wp = T.arg("wp", T.buffer((tiles, s.blocks, s.nv, half, 4 * L), "uint8"))
        wd = T.arg("wd", T.buffer((tiles, s.blocks, s.tile), s.scale_dtype))
        wz = None if s.zero is not None else T.arg("wz", T.buffer((tiles, s.blocks, s.tile), "uint8"))
        y = T.arg("y", T.buffer((s.rows, s.n), "float32"))
        with T.parallel(0, tiles) as t, T.serial(0, (s.rows + s.mr - 1) // s.mr) as m0:
            rows = [tirx.min(m0 * s.mr + r, s.rows - 1) for r in range(s.mr)]  # the overhang repeats the last row
            # (scope "global": on an llvm target a "local" buffer is a TVMBackendAllocWorkspace call,
            # a global one under 1 KB a stack slot, which LLVM then keeps in registers)
            acc = T.decl_buffer((s.mr, s.nv, L), "float32", scope="global")
            dots = T.decl_buffer((s.mr, s.nv, L), "int32", scope="global")
            for r in range(s.mr):
                for v in range(s.nv):
                    T.buffer_store(acc, _splat(tirx.const(0.0, "float32"), L), [r, v, tirx.Ramp(0, 1, L)])
            with T.serial(0, s.blocks) as b:
                for r in range(s.mr):
                    for v in range(s.nv):
                        T.buffer_store(dots, _splat(tirx.const(0, "int32"), L), [r, v, tirx.Ramp(0, 1, L)])
                with T.unroll(0, half) as j:
                    _block_step(s, xq, wp, dots, rows, t, b, j)
                _block_end(s, xd, xs, wd, wz, acc, dots, rows, t, b)
            for r in range(s.mr):
                for v in range(s.nv):
                    T.buffer_store(y, _vec(acc, [r, v, 0], L), [rows[r], tirx.Ramp(t * s.tile + v * L, 1, L)])
    return ib.get()


def _block_step(s: Spec, xq: Any, wp: Any, dots: Any, rows: list[Any], t: Any, b: Any, j: Any) -> None:
    """Packed vector ``j`` of block ``b``: each of its nibble halves into every row's chain."""
    L, nibble = s.lanes, _splat(tirx.const(15, "uint8"), 4 * s.lanes)
    for v in range(s.nv):
        packed = T.bind(_vec(wp, [t, b, v, j, 0], 4 * L))
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
        scale = T.bind(tirx.Cast(f"float32x{L}", _vec(wd, [t, b, v * L], L)))
        zero = None if wz is None else T.bind(tirx.Cast(f"int32x{L}", _vec(wz, [t, b, v * L], L)))
        for r, m in enumerate(rows):
            shift = _splat(xs[m, b] * s.zero, L) if zero is None else zero * _splat(xs[m, b], L)
            dot = _vec(dots, [r, v, 0], L) - shift
            total = _vec(acc, [r, v, 0], L) + tirx.Cast(f"float32x{L}", dot) * (scale * _splat(xd[m, b], L))
            T.buffer_store(acc, total, [r, v, tirx.Ramp(0, 1, L)])


# ---- build, reference, run ----------------------------------------------------------------------

def kernels(s: Spec) -> tvm.IRModule:
    return tvm.IRModule({"quantize": quantize_kernel(s), "dot": dot_kernel(s)})


class QuantMatmul:
    """The two kernels of ``s`` built, the weights packed, the activations' buffers allocated:
    ``qm(x)`` gives ``y`` (a ``tvm.runtime.Tensor``)."""

    def __init__(self, s: Spec, q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                 target: Target | None = None) -> None:
        self.spec = s
        self.ex = tvm.compile(kernels(s), target=target or s.target())
        self.weights = [tvm.runtime.tensor(a) for a in pack_weights(q, scale, zero, s)]
        self.xq = tvm.runtime.empty((s.rows, s.k), "int8")
        self.xd = tvm.runtime.empty((s.rows, s.blocks), "float32")
        self.xs = tvm.runtime.empty((s.rows, s.blocks), "int32")
        self.y = tvm.runtime.empty((s.rows, s.n), "float32")
        self.quantize, self.dot = self.ex["quantize"], self.ex["dot"]

    def __call__(self, x: Any) -> Any:
        self.quantize(x, self.xq, self.xd, self.xs)
        self.dot(self.xq, self.xd, self.xs, *self.weights, self.y)
        return self.y


def quantize_reference(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(xq, d)`` of the quantize kernel, in numpy (f32, ties to even)."""
    xb = x.astype(np.float32).reshape(x.shape[0], -1, block)
    top = np.abs(xb).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(top > 0, np.float32(127) / top, np.float32(0))
    xq = np.rint(xb * inv[..., None]).astype(np.int8)
    return xq.reshape(x.shape), top / np.float32(127)


def dot_reference(xq: np.ndarray, d: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: Any, block: int) -> np.ndarray:
    """The kernel's arithmetic in float64: exact int dots per block of ``xq`` and ``q - zero``
    (``zero`` a constant or ``[n, blocks]``), then scaled by ``scale * d`` and summed."""
    rows, k = xq.shape
    xb = xq.astype(np.int64).reshape(rows, k // block, block)
    wb = q.astype(np.int64).reshape(q.shape[0], k // block, block) - np.broadcast_to(zero, scale.shape)[..., None]
    dots = np.einsum("mbk,nbk->mnb", xb, wb)                       # exact (int64)
    return np.einsum("mnb,nb,mb->mn", dots.astype(np.float64), scale.astype(np.float64), d.astype(np.float64))


def dequantize(q: np.ndarray, scale: np.ndarray, zero: Any, block: int) -> np.ndarray:
    """The float64 weights ``(q - zero) * scale`` ([n, k])."""
    n, k = q.shape
    z = np.broadcast_to(zero, scale.shape)[..., None]
    return ((q.reshape(n, -1, block) - z) * scale[..., None].astype(np.float64)).reshape(n, k)


def check(qm: QuantMatmul, x: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> dict[str, float]:
    """The kernels against numpy: ``xq`` and ``xd`` (mismatches), ``y`` against the same
    arithmetic in float64 (relative: the int dots exact, f32 scaling) and against the float64
    matmul of the dequantized weights (the activations' quantization error)."""
    s = qm.spec
    zero = s.zero if zero is None else zero
    y = qm(tvm.runtime.tensor(x)).numpy()
    xq, d = quantize_reference(x, s.block)
    want = dot_reference(xq, d, q, scale, zero, s.block)
    exact = x.astype(np.float64) @ dequantize(q, scale, zero, s.block).T
    return {"xq_mismatch": int((qm.xq.numpy() != xq).sum()), "xd_mismatch": int((qm.xd.numpy() != d).sum()),
            "rel_err": float(np.abs(y - want).max() / np.abs(want).max()),
            "vs_float": float(np.abs(y - exact).max() / np.abs(exact).max())}


def best_of(runs: dict[str, Callable[[], Any]], repeat: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Each peer's (best, median) seconds a call: ``rounds`` rounds, in each every peer in turn
    runs, after a pause (the previous peer's spinning threads go to sleep), an untimed call then
    ``repeat`` timed ones (alternating blocks spread this VM's drift over every peer)."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            time.sleep(PAUSE)
            fn()
            for _ in range(repeat):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in samples.items()}


def compare(fmt: str, rows: int, repeat: int, rounds: int) -> None:
    """The prototype, einfuse's float-dequantizing kernel and ORT's ``MatMulNBits`` (accuracy
    levels 0 and 4) on the same 4-bit weights; errors relative to float32 torch."""
    torch.manual_seed(0)
    model = MatMul(K).eval()
    x = torch.randn(rows, K)
    w = model.w.detach().numpy().T.astype(np.float64)   # ([n, k]: y = x @ w.T)
    q, scale, zero = _values(w, fmt)
    qm = QuantMatmul(spec_for(fmt, rows, N, K), q, scale, zero)
    print(f"{rows:5} {fmt:10} check {check(qm, x.numpy(), q, scale, zero)}", end="")
    compiled = einfuse.compile(model, (x,), quantize=fmt, cache_dir=tempfile.mkdtemp())
    a, xt = x.numpy(), tvm.runtime.tensor(x.numpy())
    runs: dict[str, Callable[[], Any]] = {"einfuse": lambda: compiled(x), "vnni proto": lambda: qm(xt)}
    outputs = {"einfuse": lambda: compiled(x).numpy(), "vnni proto": lambda: qm(xt).numpy()}
    for level in (0, 4):
        session = ort_matmul_nbits(w, fmt, rows, level)
        runs[f"ort acc{level}"] = outputs[f"ort acc{level}"] = lambda r=session: r(a)
    acc4 = outputs["ort acc4"]()
    print(f", vs ORT acc4 {np.abs(outputs['vnni proto']() - acc4).max() / np.abs(acc4).max():.1e}")
    with torch.no_grad():
        want = model(x).numpy()
        times = best_of(runs, repeat, rounds)
    for name, (best, median) in times.items():
        err = float(np.abs(outputs[name]() - want).max() / np.abs(want).max())
        print(f"{rows:5} {fmt:10} {name:12} best {best * 1e3:7.3f} ms  median {median * 1e3:7.3f} ms  rel err {err:.1e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--formats", default="q4_0,int4-g128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(opts.threads)   # (read when TVM's pool starts: the first parallel call)
    torch.set_num_threads(opts.threads)
    print(f"{N} x {K} weight, threads={opts.threads}; best and median of {opts.rounds} x {opts.repeat} calls")
    for fmt in opts.formats.split(","):
        for rows in (int(r) for r in opts.rows.split(",")):
            compare(fmt, rows, opts.repeat, opts.rounds)


if __name__ == "__main__":
    main()
