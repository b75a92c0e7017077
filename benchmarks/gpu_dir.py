"""Prepare the GPU workloads as one directory that runs where only nvcc and torch are (issue 25).

    python -m benchmarks.gpu_dir DIR [--target cuda:h200] [--lengths 1024,4096,16384] [--checked 1024]

Writes, per workload, ``einfuse kernels --harness`` output (each kernel's ``.cu``, ``main.cu``,
a ``Makefile``) into ``DIR/<workload>/``: attention alone (B=1, H=8, D=64) at each length, causal
and not; a 4096 x 4096 GEMM; the zoo's GPT-2 and Llama. Workloads small enough carry their data
(inputs, weights and every kernel's float64 reference: attention at the ``--checked`` lengths,
the two models); the others make up their inputs and are only timed. Beside them
``workloads.json`` and ``gpu_run.py``, which on the GPU machine builds every workload, runs it
and prints one table: per kernel its error against the CPU reference and its time, and per
workload einfuse's time beside torch's SDPA and eager on the same GPU. Its size is printed, and
the command fails if it is over 64 MiB (what a device command carries).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.run import WORKLOADS, MatMul, _attention

LIMIT = 64 << 20


def workloads(lengths: list[int], checked: set[int]) -> list[dict[str, Any]]:
    """The workloads' specs: name, kind, what torch needs to run the same shapes, data or not."""
    out = []
    for n in lengths:
        for causal in (False, True):
            out.append({"name": f"attn{n}{'c' if causal else ''}", "kind": "attention", "shape": [1, 8, n, 64],
                        "causal": causal, "data": n in checked})
    out.append({"name": "gemm4096", "kind": "gemm", "shape": [4096, 4096, 4096], "data": False})
    out += [{"name": name, "kind": "model", "data": True} for name in ("gpt2", "llama")]
    return out


def build(spec: dict[str, Any]) -> tuple[torch.nn.Module, tuple]:
    """The torch model and example inputs of a workload."""
    if spec["kind"] == "attention":
        return _attention(spec["shape"][2], spec["causal"])()
    if spec["kind"] == "gemm":
        torch.manual_seed(0)
        return MatMul(4096).eval(), (torch.randn(4096, 4096),)
    return WORKLOADS[spec["name"]]()


def prepare(directory: Path, target: str, specs: list[dict[str, Any]]) -> int:
    """Write every workload into ``directory``; the bytes written."""
    from einfuse.api import kernels
    directory.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        start = time.perf_counter()
        model, args = build(spec)
        out = directory / spec["name"]
        kernels(model, args, target=target, output=out, harness=True, data=spec["data"])
        if spec["kind"] == "model":   # (torch eager on the GPU machine: a traced copy and its inputs)
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(model, args), str(out / "model.pt"))
            torch.save(args, out / "inputs.pt")
        print(f"{spec['name']:12} {_size(out) / 2 ** 20:6.1f} MiB  {time.perf_counter() - start:5.1f} s")
    (directory / "workloads.json").write_text(json.dumps(specs, indent=1))
    shutil.copy(Path(__file__).parent / "gpu_run.py", directory / "gpu_run.py")
    return _size(directory)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--target", default="cuda:h200")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--checked", default="1024", help="attention lengths that carry their data")
    opts = parser.parse_args(argv)
    specs = workloads([int(n) for n in opts.lengths.split(",")], {int(n) for n in opts.checked.split(",") if n})
    size = prepare(opts.directory, opts.target, specs)
    print(f"{opts.directory}: {size / 2 ** 20:.1f} MiB (limit {LIMIT >> 20} MiB); on the GPU machine: "
          f"python3 {opts.directory}/gpu_run.py")
    return 0 if size <= LIMIT else 1


if __name__ == "__main__":
    raise SystemExit(main())
