"""Activation-aware weight quantization (``quantize{method=awq}``): a scale per input channel,
searched on calibration activations, so that the channels that see large activations lose less
to rounding (Lin et al., "AWQ", MLSys 2024).

What: for a weight ``W[n, k]`` read as ``Y = X W^T`` with calibration activations ``X[rows, k]``,
try ``s = xbar^alpha`` (``xbar[k]`` the mean magnitude of ``X[:, k]``, normalized so that
``max(s) * min(s) = 1``) for ``alpha`` on a grid over [0, 1), quantize ``W * s`` in the format and
keep the ``alpha`` whose dequantization divided by ``s`` gives the smallest output error
``|X W^T - X W'^T|``. ``alpha = 0`` is round-to-nearest, so on the calibration rows AWQ's error is
at most RTN's. The ``1 / s`` is folded into the dequantization (AWQ folds it into the previous
layer; here it is one more factor of the Einsum that never reaches memory)::

    W_dq[k,n] = (bitand(shr(W_p[..], ..), 15) - 8) * f32(W_d[k//32,n])
    W_dq[k,n] = (bitand(shr(W_p[..], ..), 15) - 8) * f32(W_d[k//32,n]) * W_a[k]      (awq)

The search reads at most ``SAMPLE`` output channels of a large weight (the scale is shared by
every channel; its error is estimated on evenly spaced ones).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..ir.quant_formats import Stored, dequantize, quantize_weight

GRID = 20      # (alpha in 0, 1/20, ..., 19/20, as AWQ's search)
SAMPLE = 256   # (output channels the search reads)


@dataclass(frozen=True)
class Searched:
    """AWQ's choice for one weight: the stored weight, its ``alpha`` and the relative output
    errors on the calibration rows of round-to-nearest and of AWQ."""

    stored: Stored
    alpha: float
    rtn_error: float
    awq_error: float


def output_error(w: np.ndarray, approx: np.ndarray, x: np.ndarray) -> float:
    """``|X W^T - X W'^T| / |X W^T|`` (Frobenius)."""
    exact = x @ w.T
    return float(np.linalg.norm(exact - x @ approx.T) / max(np.linalg.norm(exact), np.finfo(np.float64).tiny))


def _scales(x: np.ndarray, alpha: float) -> np.ndarray:
    mean = np.maximum(np.abs(x).mean(axis=0), 1e-8) ** alpha
    return mean / np.sqrt(mean.max() * mean.min())


def _scaled(w: np.ndarray, s: np.ndarray, fmt: str) -> np.ndarray:
    """``W`` quantized as ``W * s`` and given back divided by ``s``."""
    return dequantize(quantize_weight(w * s, fmt)) / s


def search(w: np.ndarray, x: np.ndarray, fmt: str) -> Searched:
    """AWQ's scales for weight ``w`` (``[n, k]``) on activations ``x`` (``[rows, k]``) in ``fmt``."""
    rows = np.linspace(0, w.shape[0] - 1, min(SAMPLE, w.shape[0])).round().astype(int)
    part = w[rows]
    errors = [output_error(part, _scaled(part, _scales(x, a / GRID), fmt), x) for a in range(GRID)]
    best = int(np.argmin(errors))
    s = _scales(x, best / GRID)
    stored = quantize_weight(w * s, fmt)
    inverse = (1 / s).astype(np.float32)
    stored = replace(stored, arrays={**stored.arrays, "a": (inverse, "f32")}, rhs=f"({stored.rhs}) * {{W}}_a[{{k}}]",
                     along_k=stored.along_k | {"a"})
    return Searched(stored, best / GRID, errors[0], errors[best])
