"""The 1-pass attention's key tile: the cost model's estimate per tile against the measured time.

    python -m benchmarks.attention_tile [--shapes 1x8x1024x64,2x4x785x16,...] [--tiles 8,16,...]
                                        [--repeat 10] [--rounds 5]

For each attention shape (batch x heads x length x head width; torch's SDPA captured, B, H, N, D)
and each key tile, the attention compiled with ``fuse-attention{tile=T}``, timed alone (the
median of ``rounds`` rounds, every tile in turn, ``repeat`` calls each) beside the estimate
:func:`einfuse.targets.cost.attention` gives it on the host's measured peaks. Then the tile
``compile`` takes (``Target.attention_tile``: the estimate's choice on the target's nominal
numbers), the fastest measured, and how much slower than the fastest the chosen one ran
(issue 7: tiles chosen by minimising the estimate); last, the Spearman rank correlation of
estimate and measurement over every shape and tile. Threads: 2.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import warnings

from benchmarks.costmodel import spearman

SHAPES = "1x8x1024x64,2x4x785x16,1x4x1024x128,1x8x4096x64,1x4x1024x256"


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--tiles", default="8,16,32,64,128,256")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    import torch
    torch.set_num_threads(2)
    tiles = [int(t) for t in opts.tiles.split(",")]
    print(f"{'shape':16} {'tile':>5} {'predicted ms':>12} {'measured ms':>11}")
    losses, pairs = [], []
    for shape in opts.shapes.split(","):
        batch, heads, length, width = (int(x) for x in shape.split("x"))
        measured = measure(batch, heads, length, width, tiles, opts.repeat, opts.rounds)
        losses.append(report(shape, batch * heads, length, width, measured, pairs))
    print(f"chosen tile within {max(losses):.3f}x of the fastest measured on every shape; "
          f"within 1.05x on {sum(x <= 1.05 for x in losses)} of {len(losses)}; "
          f"Spearman (estimate, measured) over {len(pairs)} points: {spearman(*zip(*pairs)):.2f}")
    return losses


def measure(batch: int, heads: int, length: int, width: int, tiles: list[int], repeat: int,
            rounds: int) -> dict[int, float]:
    """Seconds per call of the attention compiled with each key tile (alternating rounds)."""
    import einfuse
    from benchmarks.run import _attention, median_seconds
    model, args = _attention(length, False, (batch, heads, width))()
    runs = {}
    for tile in tiles:
        compiled = einfuse.compile(model, args, pipeline=f"canonicalize,fuse-attention{{tile={tile}}},defer,canonicalize",
                                   cache_dir=tempfile.mkdtemp(), tuning_db=False)
        runs[tile] = (compiled, compiled.to_tvm(args))
    samples: dict[int, list[float]] = {tile: [] for tile in tiles}
    for _ in range(rounds):
        for tile, (compiled, tvm_args) in runs.items():
            samples[tile].append(median_seconds(lambda: compiled._run(tvm_args), repeat))
    return {tile: statistics.median(s) for tile, s in samples.items()}


def report(shape: str, heads: int, length: int, width: int, measured: dict[int, float],
           pairs: list[tuple[float, float]]) -> float:
    """Print the estimate and the measurement per tile (adding them to ``pairs``) and the chosen
    tile; return the chosen tile's time over the fastest's."""
    from einfuse.targets import cost, host_cpu, host_peaks
    machine = cost.measured(host_cpu(), host_peaks())
    for tile, seconds in measured.items():
        predicted = cost.attention(machine, heads, length, length, width, width, tile)
        print(f"{shape:16} {tile:5} {predicted * 1e3:12.3f} {seconds * 1e3:11.3f}")
        pairs.append((predicted, seconds))
    chosen = host_cpu().attention_tile(width, width, length)
    fastest = min(measured, key=measured.__getitem__)
    if chosen not in measured:
        raise SystemExit(f"{shape}: the chosen tile {chosen} is not among --tiles")
    loss = measured[chosen] / measured[fastest]
    print(f"{shape:16} chosen {chosen}, fastest {fastest}: chosen at {loss:.3f}x the fastest's time")
    return loss


if __name__ == "__main__":
    main()
