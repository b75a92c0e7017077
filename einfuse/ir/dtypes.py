"""The element types of the IR: one table that every layer reads its dtype names from.

Each :class:`DType` carries the IR's name (``f32``) and how the other worlds spell it: numpy (the
container that holds its values: ``int8``/``uint8`` for the 4-bit integers), torch (a name of
the ``torch`` module, as a string: the IR does not import torch) and TVM. The frontends map
torch dtypes through ``getattr(torch, dtype.torch)``, code generation declares buffers of
``dtype.tvm``, and the cost models count ``dtype.bytes`` per element.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DType:
    """One element type: its IR name, storage bits (a ``bool`` takes a byte) and other names."""

    name: str
    bits: int
    numpy: str
    torch: str
    tvm: str
    is_float: bool = False

    @property
    def bytes(self) -> float:
        """Bytes per element: a whole number (an ``int``) except for 4-bit types (0.5)."""
        return self.bits // 8 if self.bits % 8 == 0 else self.bits / 8


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("f16", 16, "float16", "float16", "float16", is_float=True),
    DType("bf16", 16, "bfloat16", "bfloat16", "bfloat16", is_float=True),   # (numpy: once TVM registered it)
    DType("f32", 32, "float32", "float32", "float32", is_float=True),
    DType("f64", 64, "float64", "float64", "float64", is_float=True),
    DType("i4", 4, "int8", "int4", "int4"),
    DType("u4", 4, "uint8", "uint4", "uint4"),
    DType("i8", 8, "int8", "int8", "int8"),
    DType("u8", 8, "uint8", "uint8", "uint8"),
    DType("i32", 32, "int32", "int32", "int32"),
    DType("i64", 64, "int64", "int64", "int64"),
    DType("bool", 8, "bool", "bool", "bool"),
)}
