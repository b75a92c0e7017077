"""How well the roofline estimate ranks kernels: predicted against measured time per kernel.

    python -m benchmarks.costmodel [--models mlp,gpt2,llama,bert,vit]

For every kernel of the zoo models (at the sizes of ``benchmarks.run``), the roofline prediction
``CompiledModel.report`` prints (FLOPs and the bytes of the kernel's inputs and output on the
host's measured peaks) beside the kernel's measured time alone, and the Spearman rank correlation
of the two per model and over all kernels (issue 7's target: >= 0.8).
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np

from benchmarks.run import WORKLOADS


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x: list[float]) -> np.ndarray:
        values = np.asarray(x, dtype=float)
        order = values.argsort(kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=float)
        for v in np.unique(values):   # (ties share their mean rank)
            r[values == v] = r[values == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    import einfuse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,gpt2,llama,bert,vit")
    opts = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    pooled: tuple[list[float], list[float]] = ([], [])
    out = {}
    print(f"{'model':8} {'kernels':>7} {'spearman':>8}  worst-predicted kernels (measured / predicted)")
    for name in opts.models.split(","):
        model, args = WORKLOADS[name]()
        table = einfuse.compile(model, args).kernel_times(args)
        predicted = [r["predicted_s"] for r in table]
        measured = [r["measured_s"] for r in table]
        pooled[0].extend(predicted)
        pooled[1].extend(measured)
        out[name] = spearman(predicted, measured)
        worst = sorted(table, key=lambda r: -r["measured_s"] / r["predicted_s"])[:3]
        print(f"{name:8} {len(table):7} {out[name]:8.2f}  " +
              ", ".join(f"{r['kernel']} {r['measured_s'] / r['predicted_s']:.1f}x" for r in worst))
    out["all"] = spearman(*pooled)
    print(f"{'all':8} {len(pooled[0]):7} {out['all']:8.2f}")
    return out


if __name__ == "__main__":
    main()
