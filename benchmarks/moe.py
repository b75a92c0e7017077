"""Mixture of experts against its peers, side by side in one process (issue 22).

    python -m benchmarks.moe [--tokens 256] [--threads 2] [--repeat 10] [--rounds 3] [--parts model,layer,decode]

The zoo's ``mixtral-512`` (width 512, 2 layers, 8 experts of 1792, top-2, GQA 8/2 heads,
fp32), its last hidden state at ``--tokens`` tokens:

* ``model``: einfuse (dropless; and capacity mode, factor 1.25, with its error against eager
  beside) against torch eager and torch.compile in each of transformers' experts implementations
  (``eager``: the loop over experts; ``grouped_mm``; ``batched_mm``), ONNX Runtime and TVM's own
  Relax pipeline (on the loop, and on ``batched_mm``, which ``torch.export`` can trace), beside the roofline floor: the FLOPs of the routed tokens only (the compiled
  cascade's, whose expert GEMMs have ``tokens x k`` rows) at the host's measured peak, or the
  weights' bytes at its copy bandwidth, whichever is longer (``einfuse.targets.host_peaks``);
* ``layer``: one MoE block alone against the same eager implementations;
* ``decode``: one token through the model, another token each call (so other experts, from
  memory): its floor the bytes a step must read (every weight but the embedding table's other rows
  and the experts not routed to) at the copy bandwidth, beside the bytes of expert weights the
  compiled model's report counts as read.

Times are medians over alternating rounds (``benchmarks.run.measure``).
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Callable

import torch

import einfuse
from benchmarks.run import PEERS, compare, measure, start
from einfuse import zoo
from einfuse.api import optimized
from einfuse.ir.analysis import total_cost
from einfuse.targets import host_peaks

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def with_implementation(model: torch.nn.Module, implementation: str) -> torch.nn.Module:
    """A copy of ``model`` computing its experts with ``implementation``."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if hasattr(getattr(m, "config", None), "_experts_implementation"):
            m.config._experts_implementation = implementation
    return out


def peers(model: torch.nn.Module, inductor: bool) -> dict[str, Callable]:
    """eager and torch.compile in each experts implementation, ONNX Runtime, Relax, einfuse."""
    out: dict[str, Callable] = {}
    for impl in IMPLEMENTATIONS:
        variant = with_implementation(model, impl)
        out[f"eager-{impl}"] = lambda _m, a, v=variant: PEERS["eager"](v, a)
        if inductor:
            out[f"compile-{impl}"] = lambda _m, a, v=variant: PEERS["inductor"](v, a)
    if inductor:   # (ONNX Runtime and Relax export through torch.export: the loop fails, batched_mm exports)
        batched = with_implementation(model, "batched_mm")
        out["ort"], out["relax"] = PEERS["ort"], PEERS["relax"]
        out["ort-batched_mm"] = lambda _m, a: PEERS["ort"](batched, a)
        out["relax-batched_mm"] = lambda _m, a: PEERS["relax"](batched, a)
    out["einfuse"] = PEERS["einfuse"]
    return out


def floor_ms(model: torch.nn.Module, args: tuple) -> tuple[float, float, float]:
    """(the roofline floor in ms, GFLOP of the routed tokens, weight MB)."""
    c = optimized(model, args)
    flops = float(total_cost(c).flops)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peaks = host_peaks()
    return max(flops / peaks.flops, weights / peaks.bandwidth) * 1e3, flops / 1e9, weights / 1e6


def capacity_row(model: torch.nn.Module, args: tuple, repeat: int) -> None:
    """einfuse in capacity mode: its time and its error against eager (dropped tokens)."""
    compiled = einfuse.compile(model, args, moe="capacity")
    with torch.no_grad():
        want = model(*args)
    got = compiled(*args)
    err = float((got - want).abs().max() / want.abs().max())
    seconds = compiled.time(args, number=1, repeat=repeat)
    dropped = [line.split("dropped ")[1].split(";")[0] for line in compiled.report(args).splitlines()
               if line.startswith("experts moe")]
    print(f"{'':11} einfuse capacity factor 1.25: {seconds * 1e3:.3f} ms, rel. error vs eager {err:.3g}, "
          f"rows dropped per block {', '.join(dropped)}")


def model_part(model: torch.nn.Module, tokens: int, repeat: int, rounds: int) -> None:
    args = (torch.randint(0, 1000, (1, tokens)),)
    floor, gflop, mb = floor_ms(model, args)
    print(f"mixtral-512 at {tokens} tokens: {gflop:.2f} GFLOP routed, {mb:.0f} MB of weights, "
          f"roofline floor {floor:.2f} ms")
    results = compare(f"model{tokens}", model, args, peers(model, inductor=True), repeat, rounds)
    ours = results["einfuse"]
    if isinstance(ours, tuple):
        print(f"{'':11} einfuse / floor: {ours[0] * 1e3 / floor:.2f}x")
    capacity_row(model, args, repeat)


def layer_part(model: torch.nn.Module, tokens: int, repeat: int, rounds: int) -> None:
    block = model.model.layers[0].mlp
    args = (torch.randn(1, tokens, 512),)
    compare(f"layer{tokens}", block, args, peers(block, inductor=False), repeat, rounds)


def decode_part(model: torch.nn.Module, repeat: int, rounds: int) -> None:
    """One token a call, a different one each call (so that each routes to other experts, whose
    weights come from memory, as in generation), by einfuse and eager in each implementation."""
    config = model.model.config
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    embed = model.model.embed_tokens.weight
    dense = sum(p.numel() * p.element_size() for p in model.parameters()) - expert_bytes - embed.numel() * 4
    active = dense + expert_bytes * config.num_experts_per_tok / config.num_local_experts + embed.shape[1] * 4
    floor = active / host_peaks().bandwidth * 1e3
    tokens = [(torch.tensor([[t]]),) for t in range(0, 1000, 7)]
    compiled = einfuse.compile(model, tokens[0])
    read = [line.split("read ")[1].split(" bytes")[0] for line in compiled.report(tokens[0]).splitlines()
            if line.startswith("experts moe")]
    print(f"decode step: active parameters {active / 1e6:.1f} MB (2 of 8 experts), floor {floor:.3f} ms; "
          f"expert weights the grouped kernels read per block: {', '.join(read)} bytes")
    handed = [compiled.to_tvm(t) for t in tokens]
    variants = {impl: with_implementation(model, impl) for impl in IMPLEMENTATIONS}
    runs = {f"eager-{impl}": _rotating(lambda a, v=v: v(*a), tokens) for impl, v in variants.items()}
    runs["einfuse"] = _rotating(compiled._run, handed)
    times = measure(runs, repeat, rounds)
    for peer, seconds in times.items():
        print(f"{'decode':11} {peer:9} {seconds * 1e3:10.3f} {seconds / times['einfuse']:9.2f}x")
    print(f"{'':11} einfuse / floor: {times['einfuse'] * 1e3 / floor:.2f}x")


def _rotating(fn: Callable[[Any], Any], inputs: list) -> Callable[[], Any]:
    """``fn`` on the next of ``inputs`` at each call."""
    at = [0]

    def call() -> Any:
        at[0] = (at[0] + 1) % len(inputs)
        return fn(inputs[at[0]])
    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", default="model,layer,decode")
    opts = parser.parse_args(argv)
    start(opts)
    model: Any = zoo._LastHidden(zoo.causal_lm("mixtral-512", experts_implementation="eager").model).eval()
    parts = opts.parts.split(",")
    with torch.no_grad():
        if "model" in parts:
            model_part(model, opts.tokens, opts.repeat, opts.rounds)
        if "layer" in parts:
            layer_part(model, opts.tokens, opts.repeat, opts.rounds)
        if "decode" in parts:
            decode_part(model, opts.repeat, opts.rounds)


if __name__ == "__main__":
    main()
