"""Generation with a KV cache against its peers, side by side in one process (issue 20).

    python -m benchmarks.generate [--model llama-1024] [--batch 1] [--cached 128,2048] [--prefill 512]
                                  [--quantize q4_0 [--quantize SPEC ...]] [--rss-tokens 512]
                                  [--repeat 5] [--rounds 3]

One decode step (one token a row after ``cached`` tokens, ``--batch`` rows, fp32, the host's threads) of the zoo's
``llama-1024`` (width 1024, 8 layers, GQA 16/4, vocabulary 32000: 0.4 GB of weights read per
token) by ``einfuse.compile_lm``, by transformers in eager mode (``DynamicCache``, the cache of
``generate``) and by transformers' static cache with the step ``torch.compile``d (as gpt-fast
does: the PyTorch-recommended compiled path), beside the bandwidth floor: the bytes a step must
read (every weight but the embedding table, and the K and V cached) over the host's measured
copy bandwidth (``einfuse.targets.host_peaks``). Then the prefill of ``--prefill`` tokens by
``compile_lm`` against einfuse's plain forward of the model at that length; the decode step with
each ``--quantize`` (``q4_0``, ``"format=q4_0,head=true,compute=int8"``: its logits' error against
float32 printed beside; ``--quantize ""`` for none); and the process's resident
memory after the first and the last of ``--rss-tokens`` generated tokens. Times are medians over
alternating rounds (``benchmarks.run.measure``); each peer's cache is cropped back after every step.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch

import einfuse
from benchmarks.run import measure
from einfuse.kv.pages import update_bounds
from einfuse.targets import host_peaks
from einfuse.zoo import causal_lm


def rss_bytes() -> int:
    """The process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def fill(lm: Any, cached: int) -> None:
    """``lm``'s cache holding ``cached`` random tokens' keys and values."""
    lm.reset()
    lm.prefill(torch.randint(0, lm.shape.vocab, (lm.batch, 2)))
    for c in lm.cache:
        c[:cached].normal_()
    lm.valid[:, :cached] = True
    lm.slot_pos[:cached] = torch.arange(cached)
    lm.length, lm.next_pos[:] = cached, cached
    for i in range(len(lm.bounds) // 2):   # (kv-pages: each page's bounds)
        update_bounds(lm.bounds[2 * i], lm.bounds[2 * i + 1], lm.cache[2 * i], 0, cached, lm.policy.page)


def einfuse_step(lm: Any, cached: int) -> Callable[[], Any]:
    fill(lm, cached)
    token = torch.full((lm.batch,), 7)

    def step() -> Any:
        out = lm.decode(token)
        lm.crop(cached)
        return out
    return step


def eager_step(model: torch.nn.Module, cached: int, batch: int) -> Callable[[], Any]:
    """transformers' eager forward of one token over a ``DynamicCache`` of ``cached`` tokens."""
    from transformers import DynamicCache
    cfg = model.config
    cache = DynamicCache(config=cfg)
    d = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        cache.update(*(torch.randn(batch, cfg.num_key_value_heads, cached, d) for _ in "kv"), i)
    ids, pos = torch.full((batch, 1), 7), torch.full((batch, 1), cached)

    def step() -> Any:
        with torch.no_grad():
            out = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits
        cache.crop(-1)   # (remove the step's token)
        return out
    return step


def compiled_static_step(model: torch.nn.Module, cached: int, max_len: int, batch: int) -> tuple[Callable[[], Any], float]:
    """transformers' ``StaticCache`` with the decode step ``torch.compile``d (gpt-fast's way); and its compile seconds."""
    from transformers import StaticCache
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    ids, pos, where = torch.full((batch, 1), 7), torch.full((batch, 1), cached), torch.tensor([cached])

    def step() -> Any:
        with torch.no_grad():
            return forward(input_ids=ids, position_ids=pos, cache_position=where, past_key_values=cache,
                           use_cache=True).logits
    start = time.perf_counter()
    step()
    return step, time.perf_counter() - start


def floor_seconds(model: torch.nn.Module, lm: Any, cached: int) -> float:
    """The bytes one decode step must read over the host's copy bandwidth."""
    embed = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    kv = 2 * lm.shape.layers * lm.batch * cached * lm.shape.kv_heads * lm.shape.head_dim * lm.shape.dtype.itemsize
    return (weights + kv) / host_peaks().bandwidth


class LastLogits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits[:, -1]


def decode_table(model: torch.nn.Module, lm: Any, lengths: list[int], max_len: int, repeat: int, rounds: int) -> None:
    print(f"decode step, batch {lm.batch}, fp32, {torch.get_num_threads()} threads (ms per step):")
    print(f"{'cached':>7} {'floor':>8} {'einfuse':>8} {'x floor':>8} {'hf eager':>9} {'hf static+compile':>18} "
          f"{'eager/einfuse':>14} {'compiled/einfuse':>17}")
    for cached in lengths:
        static, seconds = compiled_static_step(model, cached, max_len, lm.batch)
        runs = {"einfuse": einfuse_step(lm, cached), "eager": eager_step(model, cached, lm.batch), "static": static}
        t = measure(runs, repeat, rounds)
        floor = floor_seconds(model, lm, cached)
        print(f"{cached:>7} {floor * 1e3:>8.2f} {t['einfuse'] * 1e3:>8.2f} {t['einfuse'] / floor:>8.2f} "
              f"{t['eager'] * 1e3:>9.2f} {t['static'] * 1e3:>18.2f} {t['eager'] / t['einfuse']:>14.2f} "
              f"{t['static'] / t['einfuse']:>17.2f}   (torch.compile took {seconds:.0f} s)", flush=True)


def prefill_table(model: torch.nn.Module, lm: Any, tokens: int, repeat: int, rounds: int) -> None:
    ids = torch.randint(0, lm.shape.vocab, (lm.batch, tokens))
    plain = einfuse.compile(LastLogits(model), (ids,))
    t = measure({"compile_lm prefill": lambda: lm.prefill(ids), "plain forward": lambda: plain(ids)},
                max(1, repeat // 3), rounds)
    print(f"prefill of {tokens} tokens: compile_lm {t['compile_lm prefill'] * 1e3:.1f} ms, einfuse's plain forward "
          f"{t['plain forward'] * 1e3:.1f} ms (ratio {t['plain forward'] / t['compile_lm prefill']:.2f})", flush=True)


def quantized_row(model: torch.nn.Module, lm: Any, fmt: str, max_len: int, cached: int, repeat: int, rounds: int) -> None:
    q = einfuse.compile_lm(model, max_len=max_len, batch=lm.batch, quantize=fmt)
    prompt = torch.randint(0, lm.shape.vocab, (lm.batch, 32))
    with torch.no_grad():
        want = model(prompt).logits[:, -1]
    err = float((q.prefill(prompt) - want).norm() / want.norm())
    t = measure({"fp32": einfuse_step(lm, cached), fmt: einfuse_step(q, cached)}, repeat, rounds)
    print(f"decode step after {cached} tokens with {fmt}: {t[fmt] * 1e3:.2f} ms vs fp32 {t['fp32'] * 1e3:.2f} ms "
          f"({t['fp32'] / t[fmt]:.2f}x faster); logits' relative error vs fp32 eager {err:.2e}", flush=True)


def rss_row(lm: Any, tokens: int) -> None:
    seen: list[int] = []

    class Watch:
        def put(self, _: torch.Tensor) -> None:
            seen.append(rss_bytes())

        def end(self) -> None:
            pass
    lm.generate(torch.randint(0, lm.shape.vocab, (lm.batch, 8)), tokens, eos_token_id=None, streamer=Watch())
    first, last = seen[2], seen[-1]   # (seen[0]: the prompt; seen[1]: after prefill, before any decode)
    print(f"RSS after the first decoded token {first / 2**20:.1f} MiB, after {tokens}: {last / 2**20:.1f} MiB "
          f"({(last - first) / first:+.2%})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1024")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded at once (each its own sequence)")
    parser.add_argument("--cached", default="128,2048")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--quantize", action="append", help="a quantize spec (repeatable; default q4_0)")
    parser.add_argument("--rss-tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    lengths = [int(n) for n in opts.cached.split(",")]
    max_len = max(max(lengths) + 2, opts.prefill, opts.rss_tokens + 8)
    model = causal_lm(opts.model)
    start = time.perf_counter()
    lm = einfuse.compile_lm(model, max_len=max_len, batch=opts.batch)
    print(f"{opts.model}: compile_lm in {time.perf_counter() - start:.0f} s; KV cache {lm.kv_bytes / 2**20:.0f} MiB "
          f"(max_len {max_len}); host copy bandwidth {host_peaks().bandwidth / 1e9:.1f} GB/s", flush=True)
    decode_table(model, lm, lengths, max_len, opts.repeat, opts.rounds)
    if opts.prefill:
        prefill_table(model, lm, opts.prefill, opts.repeat, opts.rounds)
    for fmt in opts.quantize or ["q4_0"]:
        if fmt:
            quantized_row(model, lm, fmt, max_len, lengths[0], opts.repeat, opts.rounds)
    if opts.rss_tokens:
        rss_row(lm, opts.rss_tokens)


if __name__ == "__main__":
    main()
