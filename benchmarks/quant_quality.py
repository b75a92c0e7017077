"""What quantization costs in quality, on a real model: the tiny LM trained here (issue 19).

    python -m benchmarks.quant_quality [--bytes 16384] [--variants q4_0,q4_0:awq,...]

For float32 and each quantization variant, einfuse compiles the tiny LM (``benchmarks.tinylm``,
trained on the standard library's sources; context 1024) and runs it over the held-out files in
windows of 1024 bytes, one after another (each window's first bytes see a short context, the same
for every variant). Per variant, as llama.cpp's ``perplexity --kl-divergence`` reports: the
perplexity per byte and its change against float32, the mean KL divergence of the next-byte
distributions from float32's, and how often the most likely next byte is float32's (top-1
agreement). AWQ variants (``F:awq``) calibrate on one window of the training files. The targets
of issue 19: ``int8`` and ``q8_0`` within 0.5 % of float32's perplexity, ``q4_0`` and
``int4-g128`` within 5 %, AWQ at most round-to-nearest's; ``b1`` has none.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import einfuse
from benchmarks.tinylm import heldout_tokens, load_tinylm, training_tokens

VARIANTS = ("int8", "q8_0", "q4_0", "q4_0:awq", "int4-g128", "int4-g128:awq", "b1")
TARGETS = {"int8": 0.005, "q8_0": 0.005, "q4_0": 0.05, "int4-g128": 0.05}   # (perplexity change at most)


def option(variant: str) -> str:
    """``quantize=`` of a variant: ``q4_0`` or ``q4_0:awq``."""
    fmt, _, method = variant.partition(":")
    return f"format={fmt},method={method}" if method else fmt


def log_probs(compiled: object, windows: list[torch.Tensor]) -> torch.Tensor:
    """The next-byte log-probabilities ``[windows, context - 1, vocab]`` of each window."""
    return torch.stack([F.log_softmax(compiled(w)[0, :-1].double(), dim=-1) for w in windows])


def quality(reference: torch.Tensor, got: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Perplexity of ``got`` on ``targets``, KL(reference || got) and top-1 agreement."""
    nll = -got.gather(-1, targets[..., None]).mean()
    kl = (reference.exp() * (reference - got)).sum(-1).mean()
    top1 = (reference.argmax(-1) == got.argmax(-1)).double().mean()
    return {"ppl": math.exp(float(nll)), "kl": float(kl), "top1": float(top1)}


def run(variants: list[str], n_bytes: int) -> list[dict]:
    torch.set_num_threads(2)
    model, config = load_tinylm(train_if_missing=True)
    tokens = heldout_tokens(n_bytes)
    windows = [tokens[None, i:i + config.context] for i in range(0, tokens.numel() - config.context + 1, config.context)]
    targets = torch.stack([w[0, 1:] for w in windows])
    calibration = (training_tokens(config.context, start=1 << 20)[None],)
    start = time.perf_counter()
    reference = log_probs(einfuse.compile(model, calibration), windows)
    rows = [{"variant": "f32", **quality(reference, reference, targets), "seconds": time.perf_counter() - start}]
    for variant in variants:
        start = time.perf_counter()
        compiled = einfuse.compile(model, calibration, quantize=option(variant))
        rows.append({"variant": variant, **quality(reference, log_probs(compiled, windows), targets),
                     "seconds": time.perf_counter() - start, "weights": compiled.report().splitlines()[-1]})
    return rows


def verdict(row: dict, rows: list[dict]) -> str:
    """Whether ``row`` meets issue 19's target for it."""
    base = rows[0]["ppl"]
    fmt, _, method = row["variant"].partition(":")
    if method:
        rtn = next((r for r in rows if r["variant"] == fmt), None)
        return "-" if rtn is None else "yes" if row["ppl"] <= rtn["ppl"] else "NO (worse than rtn)"
    if fmt not in TARGETS:
        return "-"
    return "yes" if row["ppl"] / base - 1 <= TARGETS[fmt] else f"NO (> {TARGETS[fmt]:.1%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=16384, help="held-out bytes to score (windows of 1024)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    opts = parser.parse_args()
    rows = run(opts.variants.split(","), opts.bytes)
    base = rows[0]["ppl"]
    print(f"tiny LM, {opts.bytes} held-out bytes in windows of 1024, einfuse compiled (cpu)")
    print(f"{'variant':<15} {'perplexity':>10} {'change':>8} {'KL':>9} {'top-1':>7}  target met")
    for r in rows:
        print(f"{r['variant']:<15} {r['ppl']:>10.4f} {r['ppl'] / base - 1:>+8.2%} {r['kl']:>9.2e} {r['top1']:>7.2%}  "
              f"{verdict(r, rows) if r is not rows[0] else ''}")
    for r in rows[1:]:
        print(f"{r['variant']}: {r['weights']}")


if __name__ == "__main__":
    main()
