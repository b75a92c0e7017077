"""The integer dot-product contraction of ``quantize{compute=int8}`` (issue 19): its weight layout
and how a layer above recognises it.

``passes/quantize_int8.py`` writes, for ``Y[r,n] = X[r,k] * W[n,k]`` with ``W`` 4-bit per block of
``B`` along ``k`` (``q4_0``: ``B = 32``, ``z = 8``; ``int4-gG``: ``B = G``, ``z[n,b]``)::

    X_amax[r,b] = abs(X[r,b*B+i]) :: reduce[i] max
    X_q[r,k] = i8(round(f32(X[r,k] * f32(where(X_amax[r,k//B] > 0, 127 / X_amax[r,k//B], 0)))))
    Y[r,n] = X_q[r,b*B+i] * (q(W_p, n, b, i) - z) * f32(W_d[n//L,b,n%L]) * f32(X_amax[r,b] / 127)

the activations quantized to int8 per block (llama.cpp's ``q8_0``), each block an integer dot
product of those and the weight's 4-bit values, scaled by both scales. The interpreter runs it in
float64: the integer dots are exact, so it differs from the kernel (``codegen/int8_dot.py``) by the
float32 rounding of the per-block scaling and sum alone.

The weight is stored as the kernel reads it (:func:`pack`): ``W_p[n//L, b, j, 4L]`` (uint8),
byte ``4 * (n % L) + c`` of vector ``(n//L, b, j)`` holding element ``k = b*B + 4j + c`` in its
low nibble and ``k + B/2`` in its high one, ``L`` the int32 lanes of the target's vector; scales
and zero points ``[n//L, b, L]``. ``q(W_p, n, b, i)`` is
``bitand(shr(W_p[n//L, b, i%(B/2)//4, 4*(n%L) + i%4], 4*idx(i//(B/2))), 15)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .nodes import Call, Cascade, Einsum
from .scope import declarations, reads, reduced_vars


@dataclass(frozen=True)
class Int8Dot:
    """The tensors of one int8 contraction ``Y`` (names), as :func:`parts` finds them."""

    x: str               # the float activations, [rows..., K]
    amax: str            # their per-block max |x|, [rows..., K/B] (temp)
    xq: str              # their int8 values, [rows..., K] (temp)
    packed: str          # the weight's nibbles, [N/L, K/B, B/8, 4L] u8
    scale: str           # [N/L, K/B, L] (f16 or f32)
    zero: str | None     # [N/L, K/B, L] u8, or None for the constant 8 (q4_0)


def factors(x: object) -> list:
    """The factors of a product (nested ``mul`` calls flattened)."""
    if isinstance(x, Call) and x.op == "mul":
        return [f for a in x.args for f in factors(a)]
    return [x]


def parts(c: Cascade, e: Einsum) -> Int8Dot | None:
    """The tensors of ``e`` if it is an int8 contraction (it reads an int8 temp: only
    ``quantize{compute=int8}`` writes one), else None."""
    decls = declarations(c)
    read = [a.tensor for a in reads(e)]
    xq = next((t for t in read if decls[t].dtype == "i8" and decls[t].role == "temp"), None)
    if xq is None or e.populate or not reduced_vars(e):
        return None
    writers = {s.lhs.tensor: s for s, _ in c.einsums()}   # (each written once)
    params = [t for t in dict.fromkeys(read) if decls[t].role == "param"]
    packed = next(t for t in params if len(decls[t].ranks) == 4)
    rest = [t for t in params if t != packed]
    zero = next((t for t in rest if decls[t].dtype == "u8"), None)
    scale = next(t for t in rest if t != zero)
    amax = next(t for t in read if t != xq and decls[t].role == "temp")
    x = next(a.tensor for a in reads(writers[amax]))
    return Int8Dot(x, amax, xq, packed, scale, zero)


def written(c: Cascade) -> set[str]:
    """The tensors the int8 contractions of ``c`` and their activations' quantization write (the
    layout passes leave their reads as they are: the kernel reads them so)."""
    out: set[str] = set()
    for e, _ in c.einsums():
        found = parts(c, e)
        if found is not None:
            out |= {found.amax, found.xq, e.lhs.tensor}
    return out


def pack(q: np.ndarray, per_block: list[np.ndarray], block: int, lanes: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``q`` (``[n, k]``, 0..15, ``k`` whole blocks) and the per-block arrays (``[n, k/block]``:
    scales, zero points) in the kernel's layout (module docstring)."""
    n, k = q.shape
    half = block // 8
    q7 = q.astype(np.uint8).reshape(n // lanes, lanes, k // block, 2, half, 4)   # k = b*B + h*B/2 + 4j + c
    byte = q7[:, :, :, 0] | (q7[:, :, :, 1] << 4)                                 # [t, lane, b, j, c]
    packed = np.ascontiguousarray(byte.transpose(0, 2, 3, 1, 4).reshape(n // lanes, k // block, half, 4 * lanes))
    return packed, [np.ascontiguousarray(a.reshape(n // lanes, lanes, -1).transpose(0, 2, 1)) for a in per_block]

