"""Tuned einfuse against untuned einfuse and the peers, on the 1024^3 matmul and the zoo (issue 7).

    python -m benchmarks.tune [--models matmul1024,llama] [--trials 64] [--db DIR]
                              [--cost-model xgb] [--peers eager,ort,einfuse,tuned] [--repeat 20]

Tunes each workload's kernels (``einfuse.tune``, ``--trials`` candidates per kernel, into ``--db``,
default a fresh temporary directory), prints the tuning time, then measures the peers side by
side as ``benchmarks.run`` does: ``einfuse`` is the rule-based schedules, ``tuned`` the same model
compiled with the database. Tuning measures on this machine, so nothing else should run meanwhile.
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time

import torch

from .run import PEERS, WORKLOADS, compare, peer_einfuse, start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="matmul1024,llama")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--db", help="the tuning database (default: a new temporary directory)")
    parser.add_argument("--cost-model", default="xgb", choices=("xgb", "random"))
    parser.add_argument("--peers", default="eager,ort,einfuse,tuned")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    import einfuse
    db = opts.db or tempfile.mkdtemp(prefix="einfuse-tuning-")
    peers = {p: functools.partial(peer_einfuse, tuning_db=db) if p == "tuned" else PEERS[p]
             for p in opts.peers.split(",")}
    start(opts)
    for name in opts.models.split(","):
        model, args = WORKLOADS[name]()
        began = time.perf_counter()
        with torch.no_grad():
            results = einfuse.tune(model, args, trials=opts.trials, tuning_db=db, cost_model=opts.cost_model,
                                   progress=lambda line: print(f"  {line}", flush=True))
        print(f"{name}: tuned {len(results)} task(s), {opts.trials} trials each, "
              f"in {time.perf_counter() - began:.0f} s (database {db})", flush=True)
        compare(name, model, args, peers, opts.repeat, opts.rounds)


if __name__ == "__main__":
    main()
