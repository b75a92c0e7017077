"""KV-cache policies against dense attention: speed and the quality they cost (issue 21).

    python -m benchmarks.sparsity [--lengths 16384,32768] [--model-cached 16384] [--quality-budget 128]
                                  [--grid 56] [--repeat 10] [--rounds 3] [--skip attention,decode,quality,regions]

1. Decode attention, one layer's heads (batch 1, 16 query heads on 4 key heads of 64, fp32), at
   each cache length: einfuse's dense decode attention (the decode program's, ``lm.cached_attention``),
   ``kv-pages{budget=1024}`` and ``kv-select{k=1024}`` compiled, beside torch eager's SDPA over the
   whole cache; the recall (attention mass of the keys read) on these random inputs, the least
   favourable case for any selection (real keys cluster; see 3).
2. Decode steps of the zoo's ``llama-1024`` after ``--model-cached`` tokens: ``compile_lm``
   dense and with ``kv-pages{page=16,budget=1024}`` (the cache filled with random keys: a step's
   time does not depend on them), ms per token and tokens/s.
3. Quality on the tiny byte-level LM trained here (``benchmarks.tinylm``) at its full context
   (1024): held-out text fed token by token after a 128-token prompt; perplexity, its change, top-1
   agreement and KL against dense, the attention recall and output error, for ``kv-pages`` and
   ``kv-window`` with a budget of ``--quality-budget`` tokens (1/8 of the context).
4. ``region-route{regions=7,topk=4}`` (BiFormer) on one encoder attention over a ``--grid``
   square of tokens (56 x 56: 3136), 8 heads of 32: against einfuse's dense fused attention and
   eager SDPA, with the routed output's error against dense.
Times are medians over alternating rounds (``benchmarks.run.measure``).
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import einfuse
from benchmarks.generate import einfuse_step
from benchmarks.run import measure
from einfuse.frontends.torch_export import named_dynamic
from einfuse.kv import KVPages, KVPolicy, KVSelect, parse_kv, routed
from einfuse.kv.pages import update_bounds
from einfuse.kv.quality import agreement, attention_recall, perplexity, text_logits
from einfuse.lm import _StepCache, cached_attention
from einfuse.zoo import causal_lm

HEADS, KV_HEADS, DIM = 16, 4, 64


class DecodeAttention(torch.nn.Module):
    """One layer's decode attention as the decode program computes it (dense, or ``policy``'s)."""

    layer_idx = 0

    def __init__(self, policy: KVPages | None = None) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                *past: torch.Tensor) -> torch.Tensor:
        _StepCache.current = _StepCache(past[:2], past[2:], self.policy)
        try:
            return cached_attention(self, q, k, v, mask)[0]
        finally:
            _StepCache.current = None


def attention_inputs(n: int, page: int) -> tuple[tuple, tuple]:
    """Random ``(q, k, v, mask, k_past, v_past)`` at ``n`` cached tokens, and the page bounds."""
    q, k, v = torch.randn(1, HEADS, 1, DIM), torch.randn(1, KV_HEADS, 1, DIM), torch.randn(1, KV_HEADS, 1, DIM)
    k_past, v_past = torch.randn(n, 1, KV_HEADS, DIM), torch.randn(n, 1, KV_HEADS, DIM)
    pages = -(-n // page)
    kmin, kmax = torch.empty(pages, 1, KV_HEADS, DIM), torch.empty(pages, 1, KV_HEADS, DIM)
    update_bounds(kmin, kmax, k_past, 0, n, page)
    return (q, k, v, torch.zeros(1, 1, 1, n + 1), k_past, v_past), (kmin, kmax)


def attention_table(lengths: list[int], policies: list[KVPolicy], repeat: int, rounds: int) -> None:
    size = named_dynamic("L", 2, max(lengths))
    pages = named_dynamic("P", 2, max(lengths))
    dense_args, bounds = attention_inputs(lengths[0], 16)
    compiled = {}
    for policy in [KVPolicy(), *policies]:
        dynamic = {"q": None, "k": None, "v": None, "mask": {3: named_dynamic("L1", 3, max(lengths) + 1)},
                   "past": ({0: size}, {0: size}) + (({0: pages},) * 2 if policy.page_bounds else ())}
        args = dense_args + (bounds if policy.page_bounds else ())
        compiled[policy] = einfuse.compile(DecodeAttention(policy if policy.name != "dense" else None), args,
                                           dynamic_shapes=dynamic)
    print(f"decode attention, one layer ({HEADS} heads on {KV_HEADS} KV heads of {DIM}), fp32, "
          f"{torch.get_num_threads()} threads: ms (speedup over einfuse dense, recall on random keys); "
          f"eager SDPA over the whole cache beside")
    print(f"{'cached':>7} {'einfuse dense':>14} " + " ".join(f"{p.spelled():>40}" for p in policies) + f" {'eager SDPA':>11}")
    for n in lengths:
        args, bounds = attention_inputs(n, 16)
        q, k, v, mask, k_past, v_past = args
        keys, values = (torch.cat([x.permute(1, 2, 0, 3), y], 2) for x, y in ((k_past, k), (v_past, v)))
        runs = {p.spelled(): (lambda m=m, a=args + (bounds if p.page_bounds else ()): m.run_trusted(*a))
                for p, m in compiled.items()}
        runs["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
        with torch.no_grad():
            t = measure(runs, repeat, rounds)
        rows = q.reshape(1, KV_HEADS, HEADS // KV_HEADS, DIM)
        probs = (torch.einsum("bgrd,lbgd->bgrl", rows, k_past) * DIM ** -0.5).softmax(-1)
        cells = []
        for p in policies:
            recall = float((probs * p.seen(rows, k_past, n)[:, :, None]).sum(-1).mean())
            time_ms, speedup = t[p.spelled()] * 1e3, t["dense"] / t[p.spelled()]
            cells.append(f"{time_ms:>17.3f} ({speedup:5.2f}x, {recall:5.3f})")
        print(f"{n:>7} {t['dense'] * 1e3:>14.3f} " + " ".join(f"{c:>40}" for c in cells) + f" {t['sdpa'] * 1e3:>11.3f}",
              flush=True)


def decode_table(cached: int, policy: KVPages, repeat: int, rounds: int) -> None:
    model = causal_lm("llama-1024")
    start = time.perf_counter()
    dense = einfuse.compile_lm(model, max_len=cached + 8)
    sparse = einfuse.compile_lm(model, max_len=cached + 8, kv=policy.spelled())
    print(f"\nllama-1024 decode step after {cached} cached tokens, batch 1, fp32 (compiled in "
          f"{time.perf_counter() - start:.0f} s):")
    t = measure({"dense": einfuse_step(dense, cached), "sparse": einfuse_step(sparse, cached)}, repeat, rounds)
    for name, lm in (("dense", dense), (f"kv-pages{{page={policy.page},budget={policy.budget}}}", sparse)):
        key = "dense" if lm is dense else "sparse"
        print(f"  {name:<32} {t[key] * 1e3:8.2f} ms  {1 / t[key]:7.1f} tokens/s  KV {lm.kv_bytes / 2**20:.0f} MiB")
    print(f"  speedup {t['dense'] / t['sparse']:.2f}x")


def quality_table(budget: int, prompt: int = 128) -> None:
    from benchmarks.tinylm import as_llama, heldout_tokens, load_tinylm
    tiny, config = load_tinylm()
    model, context = as_llama(tiny, config), config.context
    text = heldout_tokens(context * 4)[:context].long()
    policies = [KVPolicy(), parse_kv(f"kv-pages{{page=16,budget={budget}}}"),
                parse_kv(f"kv-pages{{page=16,budget={budget},recent={budget // 2}}}"),
                parse_kv(f"kv-pages{{page=8,budget={budget},recent={budget // 2}}}"),
                parse_kv(f"kv-select{{k={budget - 68},sink=4,recent=64}}"),
                parse_kv(f"kv-window{{sink=4,window={budget - 4}}}")]
    print(f"\ntiny LM ({config.layers} layers, {config.heads} heads, context {context}): held-out text, "
          f"{prompt}-token prompt, then {context - prompt} tokens one decode step each; budget {budget} "
          f"tokens ({budget / context:.3f} of the context)")
    print(f"{'policy':<30} {'perplexity':>10} {'change':>8} {'top-1':>7} {'KL nats':>9} {'recall':>7} "
          f"{'attn err':>9} {'ms/step':>8}")
    dense_logits = None
    for policy in policies:
        lm = einfuse.compile_lm(model, max_len=context, kv=policy.spelled() if policy.name != "dense" else None)
        lm.prefill_program(prompt)   # (compiled before the clock starts)
        start = time.perf_counter()
        logits = text_logits(lm, text, prompt)
        per_step = (time.perf_counter() - start) / (context - prompt) * 1e3
        ppl = perplexity(logits, text, prompt)
        dense_logits = logits if dense_logits is None else dense_logits
        dense_ppl = perplexity(dense_logits, text, prompt)
        top1, kl = agreement(logits, dense_logits)
        recall, error = attention_recall(model, text[None], policy, queries=64)
        print(f"{policy.spelled():<30} {ppl:>10.4f} {100 * (ppl / dense_ppl - 1):>7.2f}% {top1:>7.3f} {kl:>9.5f} "
              f"{recall:>7.3f} {error:>9.2e} {per_step:>8.3f}", flush=True)


class GridAttention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def region_table(side: int, spec: str, repeat: int, rounds: int, width: int = 256, heads: int = 8) -> None:
    """One encoder attention over a ``side x side`` grid: einfuse's dense (fused) attention, the
    routed one, eager SDPA; the routed output's error against dense."""
    q, k, v = (torch.randn(1, heads, side * side, width // heads) for _ in range(3))
    start = time.perf_counter()
    dense = einfuse.compile(GridAttention(), (q, k, v))
    with routed(spec) as route:
        sparse = einfuse.compile(GridAttention(), (q, k, v))
    seconds = time.perf_counter() - start
    runs = {"dense": lambda: dense(q, k, v), "routed": lambda: sparse(q, k, v),
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)}
    with torch.no_grad():
        t = measure(runs, repeat, rounds)
        got, eager = sparse(q, k, v), route.attend(q, k, v)
        errors = [_error(sparse, x) for x in ((q, k, v), local_grid(side, heads, width // heads))]
    print(f"\nencoder attention over {side}x{side} tokens ({heads} heads of {width // heads}), fp32, "
          f"{torch.get_num_threads()} threads (compiled in {seconds:.0f} s):")
    print(f"  einfuse dense (fused)  {t['dense'] * 1e3:9.2f} ms")
    print(f"  {route.name}{{regions={route.regions},topk={route.topk}}} {t['routed'] * 1e3:9.2f} ms  "
          f"{t['dense'] / t['routed']:.2f}x; vs its eager run {float((got - eager).norm() / eager.norm()):.1e}")
    print(f"  eager SDPA             {t['sdpa'] * 1e3:9.2f} ms")
    print(f"  routed output's relative error vs dense: random q, k (diffuse attention) {errors[0]:.3f}; "
          f"local q, k (attention decaying with distance) {errors[1]:.3f}")


def local_grid(side: int, heads: int, dim: int, sharpness: float = 60.0) -> tuple:
    """``q = k``: random Fourier features of each token's place on the grid, so that ``q . k``
    falls with the distance between two tokens (attention local, as in vision features: a token's
    logit with itself ``sharpness / 2``); v random."""
    gen = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    place = torch.stack([y, x], -1).reshape(-1, 2).float() / side
    freq = torch.randn(heads, 2, dim // 2, generator=gen) * 6.0
    angle = place[None] @ freq                                                  # [H, N, dim / 2]
    q = torch.cat([angle.cos(), angle.sin()], -1)[None] * (sharpness * dim ** 0.5 / dim) ** 0.5
    return q, q, torch.randn(1, heads, side * side, dim, generator=gen)


def _error(compiled: Any, qkv: tuple) -> float:
    """The relative error of ``compiled`` (routed) against dense SDPA on ``qkv``."""
    want = torch.nn.functional.scaled_dot_product_attention(*qkv)
    return float((compiled(*qkv) - want).norm() / want.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="16384,32768")
    p.add_argument("--model-cached", type=int, default=16384)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--quality-budget", type=int, default=128)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--grid", type=int, default=56, help="region-route's grid side (tokens: its square)")
    p.add_argument("--skip", default="", help="comma-separated: attention, decode, quality, regions")
    a = p.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    policy = KVPages(page=16, budget=a.budget)
    if "attention" not in skip:
        attention_table([int(n) for n in a.lengths.split(",")], [policy, KVSelect(k=a.budget)], a.repeat, a.rounds)
    if "decode" not in skip:
        decode_table(a.model_cached, policy, a.repeat, a.rounds)
    if "quality" not in skip:
        quality_table(a.quality_budget)
    if "regions" not in skip:
        region_table(a.grid, "region-route{regions=7,topk=4}", a.repeat, a.rounds)


if __name__ == "__main__":
    main()
