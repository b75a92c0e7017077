"""Per-call overhead (issue 24): a chain of ``k`` tiny Linears (8 x 8, one row: each a kernel of
about 100 ns) called end to end from Python, torch tensors in and out, beside torch eager and
ONNX Runtime on the same model; then where einfuse's time goes, each step timed alone: the
input checks and DLPack hand-over (``to_tvm``), the Relax VM's run of the kernels (``_run``),
the outputs back to torch (``_to_torch``, DLPack).

    python -m benchmarks.overhead [--kernels 1,4,16] [--repeat 3000] [--rounds 5]

Prints microseconds per call for each ``k`` and the cost per kernel (the slope between the
smallest and the largest ``k``). Each peer is timed in blocks of ``repeat`` calls after an
untimed call, the peers alternating block by block (``rounds`` blocks each, the median taken).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any, Callable

import torch

from benchmarks.run import peer_ort


class Chain(torch.nn.Module):
    """``k`` Linears of 8 x 8 in a row."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(k)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def per_call_us(fn: Callable[[], Any], repeat: int) -> float:
    """Microseconds per call over ``repeat`` calls, after an untimed one."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def measure(runs: dict[str, Callable[[], Any]], repeat: int, rounds: int) -> dict[str, float]:
    """The median over ``rounds`` of each run's block of ``repeat`` calls, blocks alternating."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            samples[name].append(per_call_us(fn, repeat))
    return {name: statistics.median(s) for name, s in samples.items()}


def runs_for(k: int) -> tuple[dict[str, Callable[[], Any]], int]:
    """Each peer and each step of einfuse's call on the chain of ``k``; einfuse's kernel count."""
    import einfuse
    torch.manual_seed(0)
    model, x = Chain(k).eval(), torch.randn(1, 8)
    compiled = einfuse.compile(model, (x,), cache_dir=tempfile.mkdtemp())
    handed = compiled.to_tvm((x,))
    values = compiled._run(handed)
    ort, _ = peer_ort(model, (x,))
    return {
        "eager": lambda: model(x),
        "ort": ort,
        "einfuse": lambda: compiled(x),
        "  to_tvm": lambda: compiled.to_tvm((x,)),
        "  _run": lambda: compiled._run(handed),
        "  to_torch": lambda: [compiled._to_torch(v) for v in values],
    }, len(compiled.kernels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="1,4,16")
    parser.add_argument("--repeat", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    print(f"threads={opts.threads} repeat={opts.repeat} rounds={opts.rounds} torch={torch.__version__}")
    print(f"{'chain':6} {'kernels':>7} " + " ".join(f"{n.strip():>12}" for n in
                                                     ("eager", "ort", "einfuse", "to_tvm", "_run", "to_torch")) + "   (us per call)")
    einfuse_us = {}
    with torch.no_grad():
        for k in [int(n) for n in opts.kernels.split(",")]:
            runs, kernels = runs_for(k)
            us = measure(runs, opts.repeat, opts.rounds)
            einfuse_us[kernels] = us["einfuse"]
            print(f"{k:6} {kernels:7} " + " ".join(f"{us[n]:12.1f}" for n in runs))
    (k0, t0), (k1, t1) = min(einfuse_us.items()), max(einfuse_us.items())
    if k1 > k0:
        print(f"einfuse: {(t1 - t0) / (k1 - k0):.2f} us per kernel, {t0 - k0 * (t1 - t0) / (k1 - k0):.1f} us per call besides")


if __name__ == "__main__":
    main()
