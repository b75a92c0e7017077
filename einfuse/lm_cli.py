"""``einfuse generate MODEL``: compile a causal LM's prefill and decode programs (``compile_lm``),
generate from a prompt and print what generation costs: time to first token, decode tokens per
second, the KV cache's bytes and the process's peak RSS (docs/generate.md)."""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import EinfuseError

Codec = tuple[Callable[[str], list[int]], Callable[[list[int]], str]]


def add_parser(sub: Any) -> None:
    """The ``generate`` subcommand's arguments."""
    gen = sub.add_parser("generate", help="compile a causal LM for generation, generate, print TTFT, tokens/s, KV bytes")
    gen.add_argument("model", help="a zoo causal LM (llama, qwen2, mistral, phi3, gemma2, gemma3, gpt2, gpt_neox, "
                                   "llama-1024), tinylm (the trained byte-level LM; from a repo checkout) or a "
                                   "Hugging Face model directory")
    gen.add_argument("--prompt", help="the prompt's text (a byte-vocabulary model or a directory with a tokenizer)")
    gen.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens where --prompt is not given")
    gen.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    gen.add_argument("--max-len", type=int, help="the KV cache's tokens (default: prompt + new tokens)")
    gen.add_argument("--quantize", metavar="FORMAT", help="store the weights quantized: a format (q4_0, int8, ...) or "
                     "the pass's options (format=q4_0,head=true,compute=int8: the fastest decode step on an x86 CPU)")
    gen.add_argument("--kv", metavar="SPEC", help="a KV-cache policy: kv-window{sink=4,window=256} or "
                                                  "kv-pages{page=16,budget=1024} (docs/sparsity.md)")
    gen.add_argument("--compare-dense", action="store_true", help="with --kv: also compile dense attention and print "
                     "the policy's error against it (top-1 agreement, KL, attention recall and output error)")
    gen.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.95, seed 0), not greedy")
    gen.add_argument("--target", default="cpu", help="compilation target (default: cpu, the host)")


def causal_lm(name: str) -> tuple[torch.nn.Module, Codec | None]:
    """The model ``name`` and, where it has one, its text codec (bytes, or a directory's tokenizer)."""
    from . import zoo
    if name in zoo.CAUSAL_LMS:
        return zoo.causal_lm(name), None
    if name == "tinylm":
        try:
            from benchmarks.tinylm import as_llama, load_tinylm
        except ImportError:
            raise EinfuseError("tinylm lives in the repository's benchmarks/: run from a checkout") from None
        model, config = load_tinylm(train_if_missing=False)
        return as_llama(model, config), (lambda s: list(s.encode()), lambda t: bytes(t).decode(errors="replace"))
    if Path(name).is_dir():
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float32).eval()
        try:
            tok = transformers.AutoTokenizer.from_pretrained(name)
            return model, (lambda s: tok(s)["input_ids"], lambda t: tok.decode(t))
        except (OSError, ValueError):
            return model, None
    raise EinfuseError(f"unknown causal LM '{name}': a zoo name ({', '.join(zoo.CAUSAL_LMS)}), tinylm, or a directory")


class Progress:
    """A streamer that keeps one line on stderr up to date: tokens generated of those asked for."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, -1, time.perf_counter()

    def put(self, tokens: torch.Tensor) -> None:
        self.done += 1
        if self.done:
            rate = self.done / (time.perf_counter() - self.start)
            print(f"\rgenerating: {self.done}/{self.total} tokens ({rate:.1f}/s)", end="", file=sys.stderr, flush=True)

    def end(self) -> None:
        print(file=sys.stderr)


def generate(args: argparse.Namespace) -> int:
    """``einfuse generate``: compile, generate, report."""
    from .lm import compile_lm
    model, codec = causal_lm(args.model)
    if args.prompt is not None and codec is None:
        raise EinfuseError(f"{args.model} has no tokenizer: give --prompt-len N instead of --prompt")
    vocab = model.config.vocab_size
    ids = torch.tensor([codec[0](args.prompt)]) if args.prompt is not None else \
        torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    max_len = args.max_len or ids.shape[1] + args.new_tokens
    if args.compare_dense and not args.kv:
        raise EinfuseError("--compare-dense compares a KV policy with dense attention: give --kv SPEC too")
    start = time.perf_counter()
    lm = compile_lm(model, max_len=max_len, target=args.target, quantize=args.quantize, kv=args.kv)
    print(f"compiled {args.model} (prefill and decode programs) in {time.perf_counter() - start:.1f} s")
    sample = dict(do_sample=True, temperature=0.8, top_p=0.95, seed=0) if args.sample else {}
    out = lm.generate(ids, args.new_tokens, streamer=Progress(args.new_tokens), **sample)
    p = lm.phases
    per = p.decode_s / p.decode_steps if p.decode_steps else float("nan")
    print(f"prompt: {p.prompt_tokens} tokens; time to first token: {p.first_token_s * 1e3:.2f} ms")
    print(f"decode: {p.decode_steps} steps, {per * 1e3:.3f} ms per token, {1 / per:.1f} tokens/s")
    print(f"KV cache: {lm.kv_bytes / 2**20:.2f} MiB ({lm.shape.layers} layers, max_len {max_len})")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if codec is not None:
        print("text: " + repr(codec[1](out[0].tolist())))
    if args.compare_dense:
        from .kv.quality import compare
        dense = compile_lm(model, max_len=max(max_len, ids.shape[1] + args.new_tokens), target=args.target,
                           quantize=args.quantize)   # (a bounded policy's generation may outrun max_len)
        print(f"{lm.policy.spelled()} " + compare(model, lm, dense, ids, args.new_tokens)[1].text())
    return 0
