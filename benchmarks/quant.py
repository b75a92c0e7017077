"""Quantized GEMV and GEMM against their peers, side by side in one process (issue 19).

    python -m benchmarks.quant [--rows 1,8,16,256] [--formats q4_0,int4-g128,q8_0] [--compute f32,int8] [--repeat 20]

A 4096 x 4096 weight times ``rows`` activations: torch eager and einfuse in float32, einfuse with
the weight quantized (``quantize=F``; and, for the 4-bit formats, on int8 activations,
``quantize{format=F,compute=int8}``, the rows ``einfuse F int8``), and ONNX Runtime's ``MatMulNBits`` (4 bits, the format's
block, symmetric for ``q4_0``, with zero points for ``int4-gG``; ``accuracy_level`` 0 and 4) on
the same quantized values. Every runtime's result is compared with float32's (relative error:
an approximate rewrite reports its error beside its speed); times are medians over alternating
rounds (``benchmarks.run.measure``).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import einfuse
from benchmarks.run import MatMul, measure
from einfuse.ir.quant_formats import quantize_weight
from einfuse.passes.quantize_int8 import FORMATS_INT8

N = K = 4096


def ort_matmul_nbits(w: np.ndarray, fmt: str, rows: int, accuracy: int) -> Callable[[np.ndarray], Any]:
    """ONNX Runtime's ``MatMulNBits`` on ``w`` (``[n, k]``) quantized as ``fmt`` (repacked: ORT
    keeps element ``k`` of a block in byte ``k // 2``, low nibble first, blocks along k)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    n, k = w.shape
    block = 32 if fmt == "q4_0" else int(fmt.split("-g")[1])
    q, scale, zero = _values(w, fmt)          # ([n, k] 0..15, [n, blocks], [n, blocks] or None)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, k // block, block // 2)
    inits = [helper.make_tensor("B", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, [n * (k // block)], scale.astype(np.float32).ravel())]
    names = ["A", "B", "scales"]
    if zero is not None:
        zp = (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)
        inits.append(helper.make_tensor("zp", TensorProto.UINT8, zp.shape, zp.tobytes(), raw=True))
        names.append("zp")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=accuracy)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(),
                                   options, providers=["CPUExecutionProvider"])
    return lambda a: session.run(None, {"A": a})[0]


def _values(w: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The 4-bit values, scales and zero points (``[n, ...]``) einfuse's ``fmt`` stores for ``w``."""
    stored = {name: a.T for name, (a, _) in quantize_weight(w, fmt).arrays.items()}   # ([n, k-ish])
    ks = np.arange(w.shape[1])
    if fmt == "q4_0":
        byte = stored["p"][:, ks // 32 * 16 + ks % 16].astype(np.int64)
        q = np.where(ks % 32 < 16, byte & 15, byte >> 4)
        return q, stored["d"].astype(np.float32), None   # (ORT's default zero point is 8, as q4_0's)
    byte = stored["p"][:, ks // 2].astype(np.int64)
    return np.where(ks % 2 == 0, byte & 15, byte >> 4), stored["s"], stored["z"].astype(np.int64)


def compare(rows: int, formats: list[str], repeat: int, rounds: int, computes: tuple[str, ...] = ("f32", "int8")) -> None:
    torch.manual_seed(0)
    model = MatMul(K).eval()
    x = torch.randn(rows, K)
    w = model.w.detach().numpy().T.astype(np.float64)   # ([n, k]: y = x @ w.T)
    with torch.no_grad():
        want = model(x).numpy()
    runs: dict[str, Callable[[], Any]] = {"eager": lambda: model(x)}
    outputs: dict[str, Callable[[], np.ndarray]] = {"eager": lambda: model(x).detach().numpy()}
    variants = [(None, "f32")] + [(fmt, compute) for fmt in formats for compute in computes
                                  if compute == "f32" or fmt in FORMATS_INT8]
    for fmt, compute in variants:
        compiled = einfuse.compile(model, (x,), quantize=fmt and f"format={fmt},compute={compute}",
                                   cache_dir=tempfile.mkdtemp())
        name = f"einfuse {fmt or 'f32'}" + (" int8" if compute == "int8" else "")
        runs[name] = lambda c=compiled: c(x)
        outputs[name] = lambda c=compiled: c(x).numpy()
        if fmt in FORMATS_INT8 and compute == computes[-1]:
            for accuracy in (0, 4):
                run = ort_matmul_nbits(w, fmt, rows, accuracy)
                a = x.numpy()
                runs[f"ort {fmt} acc{accuracy}"] = lambda r=run: r(a)
                outputs[f"ort {fmt} acc{accuracy}"] = lambda r=run: r(a)
    with torch.no_grad():
        times = measure(runs, repeat, rounds)
    base = times["einfuse f32"]
    for name, seconds in times.items():
        got = outputs[name]()
        err = float(np.abs(got - want).max() / np.abs(want).max())
        print(f"{rows:5} {name:24} {seconds * 1e3:9.3f} ms  {base / seconds:6.2f}x f32   rel err {err:.1e}")


_RSS = """
import sys, torch, einfuse, einfuse.codegen.runtime
def rss():   # (resident bytes: anonymous, and file pages such as the mapped library)
    fields = dict(line.split(":") for line in open("/proc/self/status") if line.startswith("Rss"))
    return [int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")]
before = rss()
model = einfuse.load(sys.argv[1])
model(torch.randn(1, int(sys.argv[2])))
print(*[a - b for a, b in zip(rss(), before)])
"""


def memory(formats: list[str]) -> None:
    """The resident memory a compiled model adds to a fresh process that loads it (its export)
    and runs it once, beside its parameters' bytes: packed weights stay packed."""
    model = MatMul(K).eval()
    x = torch.randn(1, K)
    for fmt in [None, *formats]:
        out = Path(tempfile.mkdtemp()) / "model"
        compiled = einfuse.compile(model, (x,), quantize=fmt, cache_dir=tempfile.mkdtemp())
        compiled.export(out)
        anon, file = (int(v) for v in subprocess.run([sys.executable, "-c", _RSS, str(out), str(K)], capture_output=True,
                                                     text=True, check=True).stdout.split()[-2:])
        weights = compiled.report().splitlines()[-1]
        print(f"memory einfuse {fmt or 'f32':10} loaded and run: +{anon / 2**20:6.1f} MiB anonymous, "
              f"+{file / 2**20:6.1f} MiB of mapped files resident   ({weights})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,16,256")
    parser.add_argument("--formats", default="q4_0,int4-g128,q8_0")
    parser.add_argument("--compute", default="f32,int8", help="einfuse's quantized compute (quantize{compute=...}): "
                        "int8 for the 4-bit formats only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also each model's resident memory, loaded in a fresh process")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    print(f"{N} x {K} weight, threads={opts.threads}; 'x f32': einfuse float32's time over this one's")
    for rows in (int(r) for r in opts.rows.split(",") if r):
        compare(rows, opts.formats.split(","), opts.repeat, opts.rounds, tuple(opts.compute.split(",")))
    if opts.memory:
        memory(opts.formats.split(","))


if __name__ == "__main__":
    main()
