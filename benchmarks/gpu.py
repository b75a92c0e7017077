"""einfuse on a GPU against torch on the same GPU: results checked, then timed (issue 6's device check).

    python -m benchmarks.gpu [--target cuda:h200] [--models mlp,gpt2,llama,bert,vit,mixtral]
                             [--lengths 4096,16384] [--repeat 20] [--dry-run]

For each zoo model: compile it for the GPU, run it on fresh inputs, compare with torch eager on
the CPU (float32, relative error), and time einfuse against torch eager on the GPU. Then attention
alone (B=1, H=8, D=64, each length, causal and not) against ``scaled_dot_product_attention`` on
the GPU: float32 with torch's default backend (einfuse's precision), and float16 with the flash
backend (FlashAttention's own precision) for reference.

Where TVM is not (a lent GPU machine has only nvcc and torch), ``python -m benchmarks.gpu_dir DIR``
prepares the same workloads as CUDA kernel directories with a host harness that ``DIR/gpu_run.py``
builds and runs there (docs/targets.md, "On a GPU").

``--dry-run`` needs no GPU: every workload is compiled for the GPU target (the whole executable,
CUDA source included), then run on the CPU by einfuse's CPU build against eager, with CPU times;
the table says so. It is the script a session with a lent GPU runs as it is.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any, Callable

import torch

from benchmarks.run import WORKLOADS, _attention


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cuda:h200")
    parser.add_argument("--models", default="mlp,gpt2,llama,bert,vit,mixtral")
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="compile for the GPU, run on the CPU")
    opts = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = "cpu" if opts.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU here: run with --dry-run")
    rows = []
    print(f"target={opts.target} device={device}{' (dry run: compiled for the GPU, run on the CPU)' if opts.dry_run else ''}")
    print(f"{'workload':16} {'rel err':>9} {'torch ms':>9} {'einfuse ms':>10} {'torch/einfuse':>13} {'compile s':>9}")
    workloads = [(name, WORKLOADS.get(name) or _zoo(name)) for name in opts.models.split(",") if name]
    for n in (int(x) for x in opts.lengths.split(",") if x):
        for causal in (False, True):
            workloads.append((f"attn{n}{'c' if causal else ''}", _attention(n, causal)))
    for name, build in workloads:
        row = measure(name, build, opts.target, device, opts.repeat)
        rows.append(row)
        print(f"{name:16} {row['rel_err']:9.1e} {row['torch_ms']:9.3f} {row['einfuse_ms']:10.3f} "
              f"{row['torch_ms'] / row['einfuse_ms']:12.2f}x {row['compile_s']:9.1f}")
        if "flash_fp16_ms" in row:
            print(f"{'':16} SDPA flash backend, float16: {row['flash_fp16_ms']:.3f} ms")
    return rows


def _zoo(name: str) -> Callable[[], tuple]:
    """A zoo model at its default sizes (those ``benchmarks.run`` does not list: ``mixtral``)."""
    from einfuse import zoo
    if name not in zoo.BUILDERS:
        raise SystemExit(f"unknown workload '{name}'; workloads: {', '.join([*WORKLOADS, *zoo.BUILDERS])}")
    return lambda: zoo.build(name)


def measure(name: str, build: Callable[[], tuple], target: str, device: str, repeat: int) -> dict[str, Any]:
    """One workload: compile for ``target``, check against eager on the CPU, time both on ``device``."""
    import einfuse
    from einfuse.api import laid_out, optimized
    from einfuse.codegen.backends import backend_for
    from einfuse.targets import Target
    model, args = build()
    start = time.perf_counter()
    gpu = laid_out(optimized(model, args), Target.parse(target))
    backend_for(target).compile(gpu)   # (the GPU build, run or not)
    compiled = einfuse.compile(model, args, target=target if device == "cuda" else "cpu")
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        want = model(*args)
        on = tuple(a.to(device) for a in args)
        model = model.to(device)
        got = compiled(*on)
        err = float((got.cpu().double() - want.double()).abs().max() / want.double().abs().max())
        row = {"workload": name, "rel_err": err, "compile_s": compile_s,
               "torch_ms": _ms(lambda: model(*on), device, repeat),
               "einfuse_ms": _ms(lambda: compiled(*on), device, repeat)}
        if name.startswith("attn") and device == "cuda":
            row["flash_fp16_ms"] = _flash(model, on, repeat)
    return row


def _flash(model: Any, args: tuple, repeat: int) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    half = tuple(a.half() for a in args)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return _ms(lambda: model(*half), "cuda", repeat)


def _ms(fn: Callable[[], Any], device: str, repeat: int) -> float:
    """Median milliseconds of ``fn``, the device synchronized around each call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


if __name__ == "__main__":
    main()
