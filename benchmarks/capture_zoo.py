"""Capture every zoo model, interpret it at float64 and compare with torch eager.

    python -m benchmarks.capture_zoo [NAME ...]

Prints, per model: Einsums in the captured cascade, capture and interpretation time, and the
relative error max|einfuse - eager| / max|eager| on fresh random inputs.
"""
from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch

from einfuse import capture, zoo
from einfuse.ir import interpret


def fresh(name: str, example: tuple, rng: np.random.Generator) -> tuple:
    """Random inputs shaped like the example (token ids below 96, a BERT mask keeping token 0)."""
    out = []
    for i, x in enumerate(example):
        if x.is_floating_point():
            out.append(torch.from_numpy(rng.standard_normal(tuple(x.shape)).astype(np.float32)))
        elif name == "bert" and i > 0:
            bits = rng.integers(0, 2, tuple(x.shape))
            bits[:, 0] = 1
            out.append(torch.from_numpy(bits))
        else:
            out.append(torch.from_numpy(rng.integers(0, 96, tuple(x.shape))))
    return tuple(out)


def main(names: list[str]) -> None:
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng()
    print(f"{'model':8}  {'einsums':>7}  {'capture s':>9}  {'interpret s':>11}  {'rel. error':>10}")
    for name in names or list(zoo.BUILDERS):
        model, example = zoo.build(name)
        start = time.perf_counter()
        cascade = capture(model, example)
        captured = time.perf_counter()
        args = fresh(name, example, rng)
        inputs = dict(zip([t.name for t in cascade.tensors if t.role == "input"], args))
        got = interpret(cascade, inputs)["out0"]
        done = time.perf_counter()
        with torch.no_grad():
            want = model(*args).double().numpy()
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"{name:8}  {len(cascade.stmts):7d}  {captured - start:9.2f}  {done - captured:11.2f}  {err:10.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
