"""Run a directory of einfuse's GPU workloads (made by ``python -m benchmarks.gpu_dir DIR``) on
the GPU at hand: needs nvcc, make and torch, not einfuse or TVM.

    python3 DIR/gpu_run.py [--arch sm_90] [--only attn1024,gpt2]

Builds each workload (``make``), runs it (``./run``: each kernel's largest relative error
against the CPU's float64 reference, or ``-1`` where the workload carries no data, and its
time by CUDA events), then times torch on the same GPU for the same shapes: attention by
``scaled_dot_product_attention`` (float32) and spelled out (eager: scores, softmax, P V), the
GEMM by ``torch.mm``, a model by its traced copy. Prints one table; exits 1 if a kernel's
error is over the harness's tolerance or a workload fails to build or run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent


def cuda_ms(fn: Callable[[], Any], repeat: int = 20) -> float:
    """Mean milliseconds of ``fn`` on the GPU, by CUDA events, after two untimed calls."""
    for _ in range(2):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeat


def torch_times(spec: dict[str, Any], directory: Path) -> dict[str, float]:
    """torch's times for the workload's shapes on the GPU (ms): ``sdpa`` and ``eager``."""
    with torch.no_grad():
        if spec["kind"] == "attention":
            q, k, v = (torch.randn(*spec["shape"], device="cuda") for _ in range(3))
            sdpa = cuda_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=spec["causal"]))
            return {"sdpa": sdpa, "eager": cuda_ms(lambda: _spelled(q, k, v, spec["causal"]))}
        if spec["kind"] == "gemm":
            m, n, depth = spec["shape"]
            a, b = torch.randn(m, depth, device="cuda"), torch.randn(depth, n, device="cuda")
            return {"eager": cuda_ms(lambda: torch.mm(a, b))}
        model = torch.jit.load(str(directory / "model.pt"), map_location="cuda")
        args = tuple(a.cuda() for a in torch.load(directory / "inputs.pt"))
        return {"eager": cuda_ms(lambda: model(*args))}


def _spelled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def run(spec: dict[str, Any], arch: str) -> tuple[list[str], bool]:
    """The workload built and run: the harness's output lines and whether it passed."""
    directory = HERE / spec["name"]
    built = subprocess.run(["make", f"ARCH={arch}"], cwd=directory, capture_output=True, text=True, timeout=1800)
    if built.returncode != 0:
        return [f"build failed: {(built.stderr.strip().splitlines() or [''])[-1]}"], False
    ran = subprocess.run(["./run"], cwd=directory, capture_output=True, text=True, timeout=600)
    lines = ran.stdout.strip().splitlines()
    if ran.returncode not in (0, 1) or not lines:
        return lines + [f"run failed ({ran.returncode}): {ran.stderr.strip()[-300:]}"], False
    return lines, ran.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
    parser.add_argument("--arch", default=f"sm_{major}{minor}")
    parser.add_argument("--only", default="", help="workload names, comma-separated (default: all)")
    opts = parser.parse_args(argv)
    specs = json.loads((HERE / "workloads.json").read_text())
    wanted = set(filter(None, opts.only.split(",")))
    print(f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}, arch {opts.arch}, "
          f"torch {torch.__version__}")
    print(f"{'workload':10} {'kernel':40} {'max rel err':>12} {'ms':>10}")
    ok = True
    for spec in (s for s in specs if not wanted or s["name"] in wanted):
        lines, passed = run(spec, opts.arch)
        ok = ok and passed
        for line in lines:
            print(f"{spec['name']:10} {line}")
        if passed or lines[-1:] and lines[-1].startswith("model"):
            try:
                times = torch_times(spec, HERE / spec["name"])
            except Exception as exc:   # (a traced model that does not run on this device: say so, go on)
                print(f"{spec['name']:10} {'torch':40} n/a ({type(exc).__name__}: {str(exc)[:80]})")
                continue
            print(f"{spec['name']:10} {'torch':40} " + "  ".join(f"{k} {v:.4f} ms" for k, v in times.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
