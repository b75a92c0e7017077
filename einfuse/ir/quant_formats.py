"""Weight-only quantization formats: how a weight ``W[n, k]`` (``n`` an output channel, ``k`` the
reduction) is stored, and the Einsum that gives it back (the interpreter's exact reference).

| format | stored (per output channel ``n``) | dequantized ``W'[n, k]`` |
|---|---|---|
| ``int8`` | ``Q[n,k]`` i8, ``S[n]`` f32 = max abs / 127 | ``Q * S[n]`` |
| ``q8_0`` | ``Q[n,k]`` i8, ``D[n,b]`` f16 per block of 32 along k = max abs / 127 | ``Q * D[n,k//32]`` |
| ``q4_0`` | ``P[n,j]`` u8, two 4-bit values a byte, ``D[n,b]`` f16 per block of 32 | ``(q - 8) * D[n,k//32]`` |
| ``int4-gG`` | ``P[n,j]`` u8, elements ``k`` and ``k + 1`` a byte, ``Z[n,g]`` u8, ``S[n,g]`` f32 per group of G | ``(q - Z) * S`` |
| ``b1`` | ``P[n,j]`` u8, eight sign bits a byte, ``A[n]`` f32 = mean abs | ``(2 bit - 1) * A[n]`` |

Bit layouts: ``q4_0`` follows llama.cpp's ``Q4_0`` within a block of 32: byte ``j`` of a block
holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble, ``q = round(w / d)
+ 8`` clamped to 0..15 with ``d = m / -8`` (``m`` the block's value of largest magnitude).
``int4-gG`` (GPTQ / AWQ / ONNX Runtime ``MatMulNBits``): element ``k`` in byte ``k // 2``, the low
nibble first; ``s = (max - min) / 15``, ``z = round(-min / s)`` clamped to 0..15, with the group's
``min`` at most 0 and ``max`` at least 0 (zero representable, as GPTQ and ONNX Runtime do). ``b1``: element
``k`` is bit ``k % 8`` of byte ``k // 8``, 1 for a positive weight. A ``k`` extent the block (or
group, or byte) does not divide is padded with zeros to a whole one; the padding is stored, never
read.

Each format but ``b1`` has a constructor from integers already quantized (``int8_stored``,
``q8_0_stored``, ``q4_0_stored``, ``int4_stored``): the quantizers here and the imports of
pre-quantized weights (torchao, GGUF: ``frontends/prequantized.py``) share it, so an import's
IR is the one the ``quantize`` pass writes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping

import numpy as np

from ..errors import EinfuseError


PACKED = ("i8", "u8", "i4", "u4")   # (the dtypes a quantized weight is stored in: canonicalize never unpacks them)


@dataclass(frozen=True)
class Stored:
    """A quantized weight: its arrays (suffix -> (data, IR dtype)) and the
    dequantization's right-hand side, IR text with the fields ``{W}`` (the weight's name: each
    array is ``{W}_<suffix>``), ``{n}`` and ``{k}`` (the output channel's and the reduction's
    variables), for ``str.format``."""

    arrays: dict[str, tuple[np.ndarray, str]]
    rhs: str
    k: int = 0                              # (the reduction's length, before padding)
    along_k: frozenset[str] = frozenset()   # (the one-dimensional arrays indexed by k, not n: awq's)

    def nbytes(self) -> int:
        """The bytes the weight takes stored."""
        return sum(a.nbytes for a, _ in self.arrays.values())

    def text(self, name: str, variables: tuple[str, str], ranks: Mapping[str, str], sizes: Mapping[str, int | str]) -> str:
        """A cascade computing the dequantized weight ``<name>_dq[k,n]`` (reduction-major) as its
        output from the arrays (params ``<name>_<suffix>``), with ``variables`` (n's and k's)
        over the ranks ``ranks["n"]`` and ``ranks["k"]``; a two-dimensional array's first
        dimension is rank ``ranks[suffix]`` (sized by the array). ``sizes`` sizes n's and k's."""
        lines, extra = [], {}
        for suffix, (array, dtype) in self.arrays.items():
            dims = [ranks["k" if suffix in self.along_k else "n"]]
            if array.ndim == 2:   # ([k-ish, n])
                dims.insert(0, ranks[suffix])
                extra[ranks[suffix]] = array.shape[0]
            lines.append(f"tensor {name}_{suffix}[{','.join(dims)}] param {dtype}")
        n, k = ranks["n"], ranks["k"]
        all_ranks = {n: sizes[n], k: sizes[k], **extra}
        return "\n".join([f"cascade {name}_dq", "rank " + ", ".join(f"{r}={v}" for r, v in all_ranks.items()), *lines,
                          f"tensor {name}_dq[{k},{n}] output f32",
                          f"{name}_dq[{variables[1]},{variables[0]}] = "
                          + self.rhs.format(W=name, n=variables[0], k=variables[1]), ""])


def _padded(w: np.ndarray, multiple: int) -> np.ndarray:
    k = w.shape[1]
    return np.pad(w, ((0, 0), (0, -k % multiple)))


def _stored(arrays: dict[str, tuple[np.ndarray, str]], rhs: str, k: int) -> Stored:
    """A :class:`Stored` of ``arrays`` given per output channel (``[n, k-ish]``), each
    two-dimensional one made reduction-major (``[k-ish, n]``: a vector of output channels
    contiguous, as the kernels read them), for a reduction of ``k``."""
    return Stored({name: (np.ascontiguousarray(a.T) if a.ndim == 2 else a, dtype)
                   for name, (a, dtype) in arrays.items()}, rhs, k)


def int8_stored(q: np.ndarray, s: np.ndarray) -> Stored:
    """``int8`` from its integers ``q`` (``[n, k]``) and per-channel scales ``s`` (``[n]``)."""
    return _stored({"q": (q.astype(np.int8), "i8"), "s": (s.astype(np.float32), "f32")},
                   "f32({W}_q[{k},{n}]) * {W}_s[{n}]", q.shape[1])


def q8_0_stored(q: np.ndarray, d: np.ndarray) -> Stored:
    """``q8_0`` from its integers ``q`` (``[n, k]``, ``k`` whole blocks) and block scales ``d`` (``[n, k/32]``)."""
    return _stored({"q": (q.astype(np.int8), "i8"), "d": (d.astype(np.float16), "f16")},
                   "f32({W}_q[{k},{n}]) * f32({W}_d[{k}//32,{n}])", q.shape[1])


def q4_0_stored(p: np.ndarray, d: np.ndarray) -> Stored:
    """``q4_0`` from its bytes ``p`` (``[n, k/2]``, llama.cpp's layout) and block scales ``d`` (``[n, k/32]``)."""
    return _stored({"p": (p.astype(np.uint8), "u8"), "d": (d.astype(np.float16), "f16")},
                   "(bitand(shr({W}_p[{k}//32*16+{k}%16,{n}], 4 * idx({k}%32//16)), 15) - 8) * f32({W}_d[{k}//32,{n}])", 2 * p.shape[1])


def int4_stored(q: np.ndarray, z: np.ndarray, s: np.ndarray, group: int) -> Stored:
    """``int4-g<group>`` from its integers ``q`` (``[n, k]``, 0..15, ``k`` whole groups), zero
    points ``z`` (0..15) and scales ``s`` (both ``[n, k/group]``)."""
    q = q.astype(np.uint8)
    return _stored({"p": (q[:, 0::2] | (q[:, 1::2] << 4), "u8"), "z": (z.astype(np.uint8), "u8"),
                    "s": (s.astype(np.float32), "f32")},
                   "(bitand(shr({W}_p[{k}//2,{n}], 4 * idx({k}%2)), 15) - f32({W}_z[{k}//" + str(group)
                   + ",{n}])) * {W}_s[{k}//" + str(group) + ",{n}]", q.shape[1])


def _int8(w: np.ndarray) -> Stored:
    s = np.abs(w).max(axis=1) / 127
    s = np.where(s == 0, 1.0, s).astype(np.float32)
    return int8_stored(np.clip(np.rint(w / s[:, None]), -127, 127), s)


def _q8_0(w: np.ndarray) -> Stored:
    blocks = _padded(w, 32).reshape(w.shape[0], -1, 32)
    d = (np.abs(blocks).max(axis=2) / 127).astype(np.float16)
    safe = np.where(d == 0, 1.0, d.astype(np.float64))
    return q8_0_stored(np.clip(np.rint(blocks / safe[:, :, None]), -127, 127).reshape(w.shape[0], -1), d)


def _q4_0(w: np.ndarray) -> Stored:
    blocks = _padded(w, 32).reshape(w.shape[0], -1, 32)
    biggest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    d = (biggest / -8).astype(np.float16)
    safe = np.where(d == 0, 1.0, d.astype(np.float64))
    q = np.clip(np.rint(blocks / safe[:, :, None]) + 8, 0, 15).astype(np.uint8)
    return q4_0_stored((q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(w.shape[0], -1), d)


def _int4(group: int) -> Callable[[np.ndarray], Stored]:
    def quantize(w: np.ndarray) -> Stored:
        groups = _padded(w, group).reshape(w.shape[0], -1, group)
        low, high = np.minimum(groups.min(axis=2), 0), np.maximum(groups.max(axis=2), 0)   # (zero representable)
        s = ((high - low) / 15).astype(np.float32)
        safe = np.where(s == 0, 1.0, s.astype(np.float64))
        z = np.clip(np.rint(-low / safe), 0, 15)
        q = np.clip(np.rint(groups / safe[:, :, None]) + z[:, :, None], 0, 15).reshape(w.shape[0], -1)
        return int4_stored(q, z, s, group)
    return quantize


def _b1(w: np.ndarray) -> Stored:
    a = np.abs(w).mean(axis=1).astype(np.float32)
    bits = (_padded(w, 8) > 0).astype(np.uint8).reshape(w.shape[0], -1, 8)
    packed = (bits << np.arange(8, dtype=np.uint8)).sum(axis=2).astype(np.uint8)
    bit = "bitand(shr({W}_p[{k}//8,{n}], idx({k}%8)), 1)"
    return _stored({"p": (packed, "u8"), "a": (a, "f32")}, "(2 * " + bit + " - 1) * {W}_a[{n}]", 8 * packed.shape[1])


#: Each format: (the block of k it quantizes together (1: per channel), its quantizer).
FORMATS: dict[str, tuple[int, Callable[[np.ndarray], Stored]]] = {
    "int8": (1, _int8), "q8_0": (32, _q8_0), "q4_0": (32, _q4_0),
    "int4-g32": (32, _int4(32)), "int4-g64": (64, _int4(64)), "int4-g128": (128, _int4(128)), "b1": (1, _b1),
}


def dequantize(stored: Stored) -> np.ndarray:
    """The weight ``[n, k]`` that ``stored`` gives back, by the interpreter (the reference)."""
    from .interpret import interpret
    from .parser import parse
    n = next(a.shape[-1] for name, (a, _) in stored.arrays.items() if name not in stored.along_k)
    ranks = {"n": "N", "k": "K", **{suffix: suffix.upper() + "_" for suffix in stored.arrays}}
    c = parse(stored.text("W", ("n", "k"), ranks, {"N": n, "K": stored.k}))
    params = {f"W_{suffix}": a for suffix, (a, _) in stored.arrays.items()}
    return interpret(replace(c, params=params), {})["W_dq"].T


def quantize_weight(w: np.ndarray, fmt: str) -> Stored:
    """``w`` (``[n, k]``) stored in format ``fmt``, each two-dimensional array reduction-major
    (``[k-ish, n]``: a vector of output channels contiguous, as the kernels read them)."""
    if fmt not in FORMATS:
        raise EinfuseError(f"unknown quantization format '{fmt}'; known: {', '.join(FORMATS)}")
    return replace(FORMATS[fmt][1](np.asarray(w, dtype=np.float64)), k=w.shape[1])
