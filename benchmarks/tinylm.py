"""A tiny byte-level Llama trained here on the Python standard library's sources: a real model
whose quality (held-out perplexity, bits per byte) a compiled or quantized copy must keep.

    python -m benchmarks.tinylm [--minutes 10] [--eval]

trains (or loads from ``<cache>/tinylm/``, ``<cache>`` being einfuse's cache directory) a
decoder-only model: RMSNorm, rotary position embedding, SwiGLU MLP, causal attention through
``scaled_dot_product_attention``, an untied output head; width 256, 4 layers of 4 heads (head
dimension 64), 256 byte values as its vocabulary, context 1024. Its text is every ``.py`` file of
the standard library (``sysconfig.get_paths()["stdlib"]``, ``site-packages`` left out), in sorted
order: every 20th file is held out, never trained on. Training reads random windows of the other
files on 2 threads with AdamW for a wall-clock budget, the learning rate warming up over the first
steps and then following a cosine of the elapsed fraction of the budget. Most steps read 8 windows
of 256 bytes (``train_context``: 8 places in the text per step rather than 2; per byte, about as
fast as 1024-byte windows on a CPU); the last ``long_fraction`` of the budget reads 2 windows of
1024, so that positions up to 1024 have been trained on. Seeds are fixed; how many steps the budget
holds depends on the machine. ``--eval`` prints the held-out perplexity and bits per byte.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from einfuse.cache import default_cache_dir, json_loads, write_atomic

HOLDOUT_EVERY = 20


@dataclass(frozen=True)
class Config:
    """The model's shape and how it is trained."""

    width: int = 256
    layers: int = 4
    heads: int = 4
    hidden: int = 688            # SwiGLU width: 8/3 of 256, rounded up to a multiple of 16
    context: int = 1024
    vocab: int = 256
    rope_base: float = 10000.0
    train_context: int = 256
    long_fraction: float = 0.2   # the last part of the budget, in context-long windows
    batch: int = 8               # windows of train_context bytes per step
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0


class TinyLMError(RuntimeError):
    """The cached model is missing or corrupt and training it was not allowed."""


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` [B, H, T, D]: its halves turned by each position's angles."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class Block(nn.Module):
    """Pre-norm attention with rotary positions, then a pre-norm SwiGLU MLP, each added to ``x``."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.heads = c.heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(c.width, eps=1e-5), nn.RMSNorm(c.width, eps=1e-5)
        self.qkv = nn.Linear(c.width, 3 * c.width, bias=False)
        self.out = nn.Linear(c.width, c.width, bias=False)
        self.gate_up = nn.Linear(c.width, 2 * c.hidden, bias=False)
        self.down = nn.Linear(c.hidden, c.width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, w))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyLM(nn.Module):
    """``forward(tokens: LongTensor[B, T]) -> logits [B, T, vocab]``, T at most ``context``."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab, c.width)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.RMSNorm(c.width, eps=1e-5)
        self.head = nn.Linear(c.width, c.vocab, bias=False)
        half = c.width // c.heads // 2
        angles = torch.outer(torch.arange(c.context, dtype=torch.float32),
                             c.rope_base ** (-torch.arange(half, dtype=torch.float32) / half))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos[:t], self.sin[:t])
        return self.head(self.norm(x))


# ---- data ----

@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """Every ``.py`` file of the standard library (not ``site-packages``), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def split_files() -> tuple[list[Path], list[Path]]:
    """``(training, held_out)``: every 20th file (the 1st, 21st, ...) is held out."""
    files = stdlib_files()
    return ([f for i, f in enumerate(files) if i % HOLDOUT_EVERY],
            [f for i, f in enumerate(files) if not i % HOLDOUT_EVERY])


@functools.lru_cache(maxsize=2)
def _corpus(held_out: bool) -> torch.Tensor:
    """The bytes of the training (or held-out) files one after another, as uint8."""
    data = b"".join(f.read_bytes() for f in split_files()[held_out])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def heldout_tokens(max_bytes: int) -> torch.Tensor:
    """The first ``max_bytes`` bytes of the held-out files, as a LongTensor [N]."""
    return _corpus(True)[:max_bytes].long()


def training_tokens(max_bytes: int, start: int = 0) -> torch.Tensor:
    """``max_bytes`` bytes of the training files from byte ``start`` on, as a LongTensor [N]
    (calibration data: never the held-out files)."""
    return _corpus(False)[start:start + max_bytes].long()


def _data_fingerprint() -> str:
    """Names and sizes of the stdlib files: where they differ (another Python), the cache key does."""
    digest = hashlib.sha256()
    for f in stdlib_files():
        digest.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


# ---- evaluation ----

def mean_nll(model_fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
             context: int = 1024, stride: int | None = None) -> float:
    """Mean negative log-likelihood (nats per byte) of ``tokens[1:]``, each predicted once.

    Windows of exactly ``context`` tokens (``model_fn`` sees one shape, [1, context], so a model
    compiled for that shape can be evaluated) start every ``stride`` tokens (``context // 2``
    unless given), the last one ending at the end; each scores the tokens the windows before it
    did not, which have at least ``context - stride`` tokens before them in it."""
    tokens, stride = tokens.reshape(-1), context // 2 if stride is None else stride
    n = tokens.numel()
    if n < context or not 0 < stride < context:
        raise ValueError(f"need at least context={context} tokens and 0 < stride < context, got {n}, {stride}")
    starts = list(range(0, n - context, stride)) + [n - context]
    total, scored = 0.0, 1   # (tokens[:scored] are predicted already: the first has no prediction)
    with torch.no_grad():
        for start in starts:
            logits = model_fn(tokens[None, start:start + context])[0, :-1].float()
            nll = F.cross_entropy(logits, tokens[start + 1:start + context], reduction="none")
            total += float(nll[scored - start - 1:].double().sum())
            scored = start + context
    return total / (n - 1)


def perplexity(model_fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
               context: int = 1024, stride: int | None = None) -> float:
    """``exp`` of :func:`mean_nll`: per-byte perplexity."""
    return math.exp(mean_nll(model_fn, tokens, context, stride))


def bits_per_byte(model_fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                  context: int = 1024, stride: int | None = None) -> float:
    """:func:`mean_nll` in bits."""
    return mean_nll(model_fn, tokens, context, stride) / math.log(2)


# ---- training ----

@dataclass
class Trained:
    """A trained model, the loss of each step, its speed, and where it was saved."""

    model: TinyLM
    config: Config
    losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    path: Path | None = None


def _lr(c: Config, step: int, elapsed: float) -> float:
    warm = min(1.0, (step + 1) / c.warmup_steps)
    return c.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(elapsed, 1.0))))


def _batch(c: Config, data: torch.Tensor, long: bool, gen: torch.Generator) -> torch.Tensor:
    """Random windows of training bytes, [batch, length + 1]; the long ones hold as many bytes."""
    length = c.context if long else c.train_context
    rows = max(1, c.batch * c.train_context // length)
    starts = torch.randint(0, data.numel() - length - 1, (rows, 1), generator=gen)
    return data[starts + torch.arange(length + 1)].long()


def _step(model: TinyLM, opt: torch.optim.Optimizer, batch: torch.Tensor, lr: float) -> float:
    """One AdamW step on ``batch`` [rows, length + 1] (each byte predicts the next); its loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def train(config: Config = Config(), seconds: float = 600.0, cache_dir: Path | None = None,
          log: Callable[[str], None] = print, threads: int = 2) -> Trained:
    """Train for ``seconds`` of wall clock on ``threads`` threads and save under ``<cache_dir>/tinylm/``
    (the threads are not in the cache key: the budget is)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trained = _train(config, seconds, log)
    finally:
        torch.set_num_threads(before)
    trained.path = _save(trained, seconds, cache_dir or default_cache_dir())
    return trained


def _train(c: Config, seconds: float, log: Callable[[str], None]) -> Trained:
    torch.manual_seed(c.seed)
    model, data, gen = TinyLM(c), _corpus(False), torch.Generator().manual_seed(c.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=c.lr, betas=(0.9, 0.95))
    trained, tokens, begin, shown = Trained(model, c), 0, time.monotonic(), time.monotonic()
    while (elapsed := (time.monotonic() - begin) / seconds) < 1.0:
        batch = _batch(c, data, elapsed >= 1.0 - c.long_fraction, gen)
        trained.losses.append(_step(model, opt, batch, _lr(c, len(trained.losses), elapsed)))
        tokens += batch[:, 1:].numel()
        trained.tokens_per_s = tokens / (time.monotonic() - begin)
        if time.monotonic() - shown >= 20:
            shown = time.monotonic()
            log(f"step {len(trained.losses)}  loss {trained.losses[-1]:.3f}  window {batch.shape[1] - 1}  "
                f"{trained.tokens_per_s:.0f} tokens/s")
    log(f"trained {len(trained.losses)} steps in {seconds:.0f} s, final loss {trained.losses[-1]:.3f}, "
        f"{trained.tokens_per_s:.0f} tokens/s")
    model.eval()
    return trained


# ---- the cache ----

def _paths(config: Config, seconds: float, cache_dir: Path) -> tuple[Path, Path]:
    key = json.dumps({"config": asdict(config), "seconds": float(seconds), "data": _data_fingerprint()}, sort_keys=True)
    stem = cache_dir / "tinylm" / hashlib.sha256(key.encode()).hexdigest()[:16]
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def _save(trained: Trained, seconds: float, cache_dir: Path) -> Path:
    weights, meta = _paths(trained.config, seconds, cache_dir)
    buffer = io.BytesIO()
    torch.save(trained.model.state_dict(), buffer)
    raw = buffer.getvalue()
    write_atomic(weights, raw)   # (a temporary name, then os.replace) before the JSON that vouches for it
    write_atomic(meta, json.dumps({"config": asdict(trained.config), "seconds": seconds,
                                   "sha256": hashlib.sha256(raw).hexdigest(), "steps": len(trained.losses),
                                   "final_loss": trained.losses[-1], "tokens_per_s": trained.tokens_per_s},
                                  indent=1))
    return weights


def _read(config: Config, seconds: float, cache_dir: Path) -> TinyLM:
    """The saved model; FileNotFoundError where nothing is saved, TinyLMError where it is corrupt."""
    weights, meta = _paths(config, seconds, cache_dir)
    try:
        record = json_loads(meta.read_text())
        raw = weights.read_bytes()
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise TinyLMError(f"{meta}: unreadable ({exc})") from None
    if not isinstance(record, dict) or hashlib.sha256(raw).hexdigest() != record.get("sha256"):
        raise TinyLMError(f"{weights} does not match the sha256 in {meta.name}: corrupt")
    model = TinyLM(config)
    model.load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))
    return model.eval()


def load(config: Config = Config(), seconds: float = 600.0, cache_dir: Path | None = None,
         train_if_missing: bool = True) -> TinyLM:
    """The model of ``config`` trained for ``seconds``, from the cache or (where allowed) trained
    now; a corrupt cached copy is retrained (with a warning) or is a :class:`TinyLMError`."""
    cache_dir = cache_dir or default_cache_dir()
    try:
        return _read(config, seconds, cache_dir)
    except (FileNotFoundError, TinyLMError) as exc:
        if not train_if_missing:
            raise TinyLMError(f"no usable tiny LM in {cache_dir / 'tinylm'} ({exc}); "
                              "train it with python -m benchmarks.tinylm") from None
        if isinstance(exc, TinyLMError):
            warnings.warn(f"{exc}; training it again", stacklevel=2)
    return train(config, seconds, cache_dir).model


def load_tinylm(train_if_missing: bool = True, minutes: float = 10) -> tuple[TinyLM, Config]:
    """The default tiny LM trained for ``minutes``, and its config."""
    config = Config()
    return load(config, minutes * 60, train_if_missing=train_if_missing), config


def as_llama(model: TinyLM, c: Config) -> torch.nn.Module:
    """``model`` as a transformers ``LlamaForCausalLM`` with the same weights and the same function
    (the same RMSNorm, rotary halves, SwiGLU and untied head), for ``einfuse.compile_lm`` and
    ``einfuse generate tinylm``; its vocabulary is bytes, so no token is an end of text."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=c.vocab, hidden_size=c.width, intermediate_size=c.hidden,
                         num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.heads,
                         max_position_embeddings=c.context, rms_norm_eps=1e-5, rope_theta=c.rope_base,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         attn_implementation="sdpa")
    llama = LlamaForCausalLM(config).eval()
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.head.weight}
    for i, b in enumerate(model.blocks):
        layer = f"model.layers.{i}."
        q, k, v = b.qkv.weight.chunk(3)
        gate, up = b.gate_up.weight.chunk(2)
        state.update({layer + "self_attn.q_proj.weight": q, layer + "self_attn.k_proj.weight": k,
                      layer + "self_attn.v_proj.weight": v, layer + "self_attn.o_proj.weight": b.out.weight,
                      layer + "mlp.gate_proj.weight": gate, layer + "mlp.up_proj.weight": up,
                      layer + "mlp.down_proj.weight": b.down.weight,
                      layer + "input_layernorm.weight": b.attn_norm.weight,
                      layer + "post_attention_layernorm.weight": b.mlp_norm.weight})
    missing, unexpected = llama.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise TinyLMError(f"as_llama: weights left over {unexpected} or missing {missing}")
    return llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--eval", action="store_true", help="print held-out perplexity and bits per byte")
    parser.add_argument("--eval-bytes", type=int, default=32768)
    opts = parser.parse_args()
    model, config = load_tinylm(minutes=opts.minutes)
    if opts.eval:
        torch.set_num_threads(2)
        nll = mean_nll(model, heldout_tokens(opts.eval_bytes), context=config.context)
        print(f"held-out ({opts.eval_bytes} bytes): perplexity {math.exp(nll):.3f}, "
              f"{nll / math.log(2):.3f} bits per byte")


if __name__ == "__main__":
    main()
