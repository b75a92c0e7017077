"""``einfuse report MODEL --plot roofline.png``: each kernel on the host's roofline.

x: the kernel's FLOPs per DRAM byte as the cost model counts them (its tiling's traffic); y: the
FLOP/s it reached, measured alone. The ceilings are the measured peaks: the GEMM rate, and the
memory and cache bandwidths times x. A kernel's distance below its ceiling is what its schedule
leaves on the table; its colour is what the estimate says bounds it. Needs matplotlib
(``pip install "einfuse[plot]"``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .errors import EinfuseError

COLOURS = {"compute": "tab:red", "memory": "tab:blue", "cache": "tab:green", "launch": "tab:gray"}


def roofline_plot(table: list[dict[str, Any]], machine: Any, path: str | Path, title: str = "") -> Path:
    """Draw ``CompiledModel.kernel_times(args)`` rows on ``machine``'s roofline into ``path``."""
    if importlib.util.find_spec("matplotlib") is None:
        raise EinfuseError('--plot needs matplotlib, which is not installed: pip install "einfuse[plot]"')
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    rows = [r for r in table if r["measured_s"] and r["intensity"] not in (None, float("inf"))]
    if not rows:
        raise EinfuseError("--plot: no kernel was measured with a finite intensity")
    x = np.array([r["intensity"] for r in rows])
    y = np.array([float(r["flops"]) / r["measured_s"] for r in rows])
    span = np.logspace(np.log10(x.min() / 4), np.log10(x.max() * 4), 200)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.loglog(span, np.minimum(machine.flops, machine.dram * span), "k-", label="GEMM peak / memory")
    ax.loglog(span, np.minimum(machine.flops, machine.cache * span), "k:", label="cache")
    for bound, colour in COLOURS.items():
        pick = [n for n, r in enumerate(rows) if r["bound"] == bound]
        if pick:
            ax.scatter(x[pick], y[pick], c=colour, s=22, label=f"estimate: {bound}-bound")
    for n in np.argsort(-np.array([r["measured_s"] for r in rows]))[:5]:   # (the five slowest, named)
        ax.annotate(rows[n]["kernel"], (x[n], y[n]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("FLOPs per DRAM byte (the tiling's traffic)")
    ax.set_ylabel("FLOP/s measured (kernel alone)")
    ax.set_title(title or "kernels on the roofline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
