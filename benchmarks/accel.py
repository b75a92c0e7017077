"""BERT-Base attention on ``accel:fusemax``: the unfused 3-pass cascade against the 1-pass cascade,
modelled at N = 1K ... 1M, beside FuseMax's own numbers.

    python -m benchmarks.accel [--check 512]

The attention (batch 64, 12 heads, head width 64, as torch's SDPA) is captured once with a
symbolic length N and compiled for ``accel:fusemax`` twice: ``-p unfused`` (QK, softmax and AV as
separate kernels through DRAM) and the default pipeline (the 1-pass cascade as one kernel). The
modelled cycles come from :mod:`einfuse.targets.accel` with N bound. The unfused cascade runs on
FuseMax's baseline configuration (the artifact's: a 1D array with exp and divide units,
``vector_exp=1``, a 32 MiB buffer); ``--also-plain`` adds it on ``accel:fusemax`` itself.

``--check N`` first emits both cascades as C at length N for one batch and two heads, runs them on
this CPU, compares them with torch and prints what the runtime counted next to the model.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from einfuse.api import laid_out, optimized
from einfuse.targets import Target
from einfuse.targets.accel import Timing, cascade_timing

from .run import Attention

LENGTHS = (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20)
FUSEMAX = "accel:fusemax"
BASELINE = "accel:fusemax{vector_exp=1,buffer_bytes=33554432}"
# FPSG-UIUC/micro24-fusemax-artifact, workspace/outputs/pregenerated/results/attn-unfused.csv and
# attn-binding.csv, BERT rows: latency in seconds (unfused, FuseMax), FuseMax's 2D utilisation.
PAPER = {1 << 10: (0.0218236, 0.00201314, 0.8896), 1 << 12: (0.337927, 0.0297004, 0.9648),
         1 << 14: (5.36184, 0.465166, 0.9856), 1 << 16: (85.6094, 7.40250, 0.9910),
         1 << 18: (1369.87, 118.279, 0.9923), 1 << 20: (21904.96, 1891.83, 0.9926)}


def captured(batch: int = 64, heads: int = 12, width: int = 64) -> tuple:
    """BERT-Base's attention as a model, example inputs and a symbolic length."""
    n = torch.export.Dim("n", min=2, max=1 << 21)
    args = tuple(torch.randn(batch, heads, 256, width) for _ in range(3))
    return Attention(False).eval(), args, {"q": {2: n}, "k": {2: n}, "v": {2: n}}


def cascades(model: torch.nn.Module, args: tuple, dynamic: dict | None) -> dict[str, tuple]:
    """(grouped cascade, target) of the unfused and the 1-pass attention."""
    out = {}
    for label, pipeline, target in (("unfused", "unfused", BASELINE), ("1-pass", "default", FUSEMAX),
                                    ("unfused (plain)", "unfused", FUSEMAX)):
        t = Target.parse(target)
        out[label] = laid_out(optimized(model, args, pipeline=pipeline, dynamic_shapes=dynamic, target=t.name), t), t
    return out


def total(c: object, target: Target, length: int) -> Timing:
    """The cascade's modelled timing with its length bound."""
    return sum((t for _, t in cascade_timing(c, target.device, {s: length for s in _symbols(c)})), Timing(0, 0, 0, 0))


def loop_kernel(c: object, target: Target, length: int) -> Timing:
    """The 1-pass attention kernel's own timing (without the cascade's layout phases)."""
    (name,) = [k.name for k in c.groups if k.kind == "loop"]
    return dict(cascade_timing(c, target.device, {s: length for s in _symbols(c)}))[name]


def _symbols(c: object) -> set[str]:
    return {str(s) for r in c.ranks for s in getattr(r.size, "free_symbols", ())}


def table(built: dict, plain: bool) -> list[str]:
    """The comparison, one row per length."""
    mhz = built["1-pass"][1].device.mhz * 1e6
    head = ("| N | unfused ms | 1-pass ms | (its attention kernel) | speedup | 2D util | 1D util | paper: unfused ms | "
            "1-pass ms | speedup | 2D util |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    speedups, papers = [], []
    for n in LENGTHS:
        unfused, fused = total(*built["unfused"], n), total(*built["1-pass"], n)
        kernel = loop_kernel(*built["1-pass"], n)
        u2, u1 = fused.utilisation()
        ours = unfused.latency / fused.latency
        pu, pf, putil = PAPER[n]
        speedups.append(ours)
        papers.append(pu / pf)
        extra = f" (plain {total(*built['unfused (plain)'], n).latency / fused.latency:.1f}x)" if plain else ""
        lines.append(f"| {n >> 10}K | {unfused.latency / mhz * 1e3:.4g} | {fused.latency / mhz * 1e3:.4g} | "
                     f"{kernel.latency / mhz * 1e3:.4g} | "
                     f"{ours:.2f}x{extra} | {u2:.3f} | {u1:.3f} | {pu * 1e3:.4g} | {pf * 1e3:.4g} | {pu / pf:.2f}x | "
                     f"{putil:.3f} |")
    lines.append(f"\nmean speedup: ours {np.mean(speedups):.2f}x, paper {np.mean(papers):.2f}x")
    return lines


def check(length: int) -> None:
    """Emit, run and compare both cascades at ``length`` (batch 1, two heads)."""
    from einfuse.codegen.accel import simulate
    torch.manual_seed(0)
    model, args = Attention(False).eval(), tuple(torch.randn(1, 2, length, 64) for _ in range(3))
    expected = model(*args).numpy()
    for label, (c, target) in cascades(model, args, None).items():
        sim = simulate(c, target, {n: a.numpy() for n, a in zip(("q", "k", "v"), args)})
        (out,) = sim.outputs.values()
        error = float(np.abs(out - expected).max() / np.abs(expected).max())
        modelled = sum((t for _, t in cascade_timing(c, target.device)), Timing(0, 0, 0, 0))
        calls = sum(n for _, _, n, _ in sim.kernels)
        print(f"{label:16s} N={length}: rel. error vs torch {error:.1e}; counted {sim.total.latency:.0f} cycles "
              f"({calls} intrinsic calls), modelled {modelled.latency:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=int, metavar="N", help="also emit, run and count both cascades at length N")
    parser.add_argument("--also-plain", action="store_true", help="the unfused cascade on accel:fusemax itself too")
    opts = parser.parse_args()
    if opts.check:
        check(opts.check)
    print("\n".join(table(cascades(*captured()), opts.also_plain)))


if __name__ == "__main__":
    main()
