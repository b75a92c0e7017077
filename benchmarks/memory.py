"""Peak memory of attention alone (B=1, H=8, D=64), each length in a fresh process.

    python -m benchmarks.memory [--lengths 1024,4096,16384] [--pipeline default]

For each length, a child process compiles the attention with einfuse, runs it once, and reports
its peak resident memory (``ru_maxrss``), the memory before the run, and the bytes of the
attention kernel's largest buffer a 3-pass cascade would hold (the N x N scores, per head): the
1-pass kernel keeps one block x tile of scores, so its peak grows with N (the inputs and the
output), not with N^2.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, tempfile, torch
import einfuse
from benchmarks.run import WORKLOADS
n, pipeline = int(sys.argv[1]), sys.argv[2]
model, args = WORKLOADS[f"attn{n}"]()
compiled = einfuse.compile(model, args, pipeline=pipeline, cache_dir=tempfile.mkdtemp())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = compiled(*args)
ref = model(*args) if n <= 4096 else None   # (torch's own SDPA; skipped where it is slow)
err = float((out - ref).abs().max() / ref.abs().max()) if ref is not None else None
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": n, "peak_mib": peak / 1024, "before_run_mib": before / 1024, "rel_err": err,
                  "kernels": [k.kind or "plain" for k in compiled.kernels]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--pipeline", default="default")
    opts = parser.parse_args()
    print(f"{'N':>6} {'peak RSS MiB':>12} {'before run':>10} {'N x N scores, 8 heads, MiB':>26}  kernels")
    for n in (int(x) for x in opts.lengths.split(",")):
        run = subprocess.run([sys.executable, "-c", CHILD, str(n), opts.pipeline], capture_output=True, text=True)
        if run.returncode:
            print(f"{n:>6} failed: {run.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{n:>6} {r['peak_mib']:12.0f} {r['before_run_mib']:10.0f} {8 * n * n * 4 / 2**20:26.0f}  "
              f"{','.join(r['kernels'])}" + (f"  (rel err vs SDPA {r['rel_err']:.1e})" if r["rel_err"] is not None else ""))


if __name__ == "__main__":
    main()
