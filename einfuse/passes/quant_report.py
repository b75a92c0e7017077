"""What ``quantize{format=F}`` does to each weight, measured: ``einfuse quantize MODEL --format F``.

Per weight read by a contraction: its shape, whether it is quantized (or kept in float, and why),
its bytes in float32 and stored, the relative (Frobenius) error of its dequantized values, and
given example inputs the relative error of the contraction's output on them (round-to-nearest's,
and with ``method=awq`` AWQ's beside it). The quantization is the pass's own (:func:`.quantize.choices`,
:func:`einfuse.ir.quant_formats.quantize_weight`, :func:`.awq.search`) and the dequantization the
interpreter's (:func:`einfuse.ir.quant_formats.dequantize`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..ir import Cascade
from ..ir.analysis import format_number, format_table
from .awq import output_error, search
from .manager import PassContext
from ..ir.quant_formats import dequantize, quantize_weight
from .quantize import oriented, calibration, choices


@dataclass(frozen=True)
class LayerRow:
    """One weight: ``kept`` is why it stays in float (``""``: quantized); errors are None where
    not measured."""

    weight: str
    shape: tuple[int, ...]
    kept: str
    float_bytes: int
    stored_bytes: int
    weight_error: float | None = None
    output_error: float | None = None
    awq_output_error: float | None = None


def layer_rows(c: Cascade, fmt: str, method: str = "rtn", head: bool = False,
               inputs: Mapping[str, Any] | None = None) -> list[LayerRow]:
    """Each weight of ``c`` (the cascade the quantize pass would be given) under format ``fmt``;
    output errors on ``inputs`` (the cascade's inputs by name) where given."""
    every = choices(c, fmt, method, head)
    chosen = [ch for ch in every if not ch.kept]
    acts = calibration(c, PassContext(inputs=inputs), chosen) if inputs is not None and chosen else {}
    rows = []
    for ch in every:
        name = ch.weight.tensor
        data = c.params.get(name)
        size = 4 * int(np.prod(data.shape)) if data is not None else 0
        shape = tuple(data.shape) if data is not None else ()
        if ch.kept:
            rows.append(LayerRow(name, shape, ch.kept, size, size))
            continue
        w = oriented(c, ch.einsum, ch.weight)
        rows.append(_measured(name, w, fmt, method, acts.get(name), size))
    return rows


def _measured(name: str, w: np.ndarray, fmt: str, method: str, x: np.ndarray | None, size: int) -> LayerRow:
    rtn = quantize_weight(w, fmt)
    back = dequantize(rtn)
    stored, awq_error = rtn, None
    if method == "awq" and x is not None:
        searched = search(w, x, fmt)
        stored, awq_error = searched.stored, output_error(w, dequantize(searched.stored), x)
    return LayerRow(name, tuple(w.shape), "", size, stored.nbytes(),
                    float(np.linalg.norm(back - w) / max(np.linalg.norm(w), np.finfo(np.float64).tiny)),
                    None if x is None else output_error(w, back, x), awq_error)


def layers_table(rows: list[LayerRow], fmt: str) -> str:
    """The rows as a table, with a line of totals."""
    def err(v: float | None) -> str:
        return "-" if v is None else f"{v:.2e}"
    lines = format_table(("weight", "shape", fmt, "bytes f32", "bytes stored", "weight rel err", "output rel err", "awq output rel err"),
                         [(r.weight, "x".join(map(str, r.shape)), r.kept and f"kept: {r.kept}" or "quantized",
                           format_number(r.float_bytes), format_number(r.stored_bytes), err(r.weight_error),
                           err(r.output_error), err(r.awq_output_error)) for r in rows])
    before, after = sum(r.float_bytes for r in rows), sum(r.stored_bytes for r in rows)
    lines.append(f"{sum(not r.kept for r in rows)} of {len(rows)} weights quantized: {format_number(before)} bytes -> "
                 f"{format_number(after)} ({after / max(before, 1):.1%})")
    return "\n".join(lines)
