"""Causal LMs compiled for generation: ``einfuse.compile_lm(model, max_len=...)`` (docs/generate.md).

Generation is a prefill (the prompt's tokens at once, compute-bound) and then one decode step per
new token (memory-bound: every weight and the KV cache read once per token). ``compile_lm``
captures a Hugging Face ``*ForCausalLM`` through its own modeling code, with a cache
class of ours (:class:`_StepCache`) in place of transformers' so that the cache is the programs'
inputs and outputs rather than state inside torch:

- ``prefill(ids[B,T], pos[B,T], keep[B,T]) -> (logits[B,V], k_0, v_0, ...)``, its masks made in the
  graph; ``T`` dynamic in :func:`programs`, a bucket's static length in ``compile_lm`` (16, 32, ...);
- ``decode(ids[B,1], pos[B,1], mask[M,B,1,1,L+1], k_0[L,B,Hkv,D], v_0, ...) -> (logits[B,V], k_0, v_0, ...)``,
  ``L`` (the tokens already cached) dynamic; each returned ``k_i``/``v_i`` is the new token's.

The KV cache is one preallocated buffer per layer and per K/V, laid out ``[max_len, B, Hkv, D]``:
the first ``L`` rows are a contiguous, aligned view that reaches TVM without a copy, and the
host writes each step's new rows after them (``B * Hkv * D`` numbers per layer and step: the
cache is never copied and never grows). The masks (``M`` of them: one per attention layer type of
a model that mixes full and sliding-window layers, as Gemma 2/3 do) are built from each row's
left padding and the window (by the prefill program itself, by the host for a decode step): additive, 0 where a query may see a key and the dtype's
lowest value elsewhere, as transformers' eager attention writes them.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache

from .errors import EinfuseError, InputError
from .frontends.torch_export import named_dynamic
from .kv import KVPolicy, parse_kv
from .kv.policies import merged_attention
from .kv.pages import update_bounds


ATTENTION = "einfuse_cached"   # (the name of :func:`cached_attention` among transformers' attention functions)


class _StepCache(Cache):
    """transformers' cache interface over one step's inputs: ``update`` keeps a layer's new keys
    and values (the program returns them) and returns them alone: :func:`cached_attention` reads
    the cached ones (``past``, ``[L, B, Hkv, D]`` each) where they are."""

    current: "_StepCache | None" = None   # (the step being traced: cached_attention's past)

    def __init__(self, past: Sequence[torch.Tensor], bounds: Sequence[torch.Tensor] = (),
                 sparse: KVPolicy | None = None) -> None:   # (not Cache.__init__: no layers of its own)
        self.layers, self.layer_class_to_replicate, self.offloading = [], None, False
        self.past, self.new = past, []
        self.bounds, self.sparse = bounds, sparse   # (a policy's step: the keys it chooses; kv-pages' bounds)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.new += [key_states, value_states]
        return key_states, value_states

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.past[0].shape[0] if self.past else 0


def cached_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' eager attention (``softmax(q k^T * scaling [softcapped] + mask) v``) over the
    cached keys and values followed by the step's new ones, without concatenating them: the
    scores of the two parts side by side (``L + T`` numbers per query row), each part multiplied
    by its values. A group of ``H / Hkv`` query heads shares its key/value head (GQA) as query
    rows of one product, so each cached head is read once per step, not once per query head."""
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise EinfuseError(f"compile_lm: {type(module).__name__}'s attention has sinks or a position bias, "
                           "which the decode program does not compute yet")
    cache = _StepCache.current
    k_past, v_past = (cache.past[2 * module.layer_idx + i] for i in (0, 1))   # type: ignore[union-attr]
    b, h, t, d = query.shape
    g, n = key.shape[1], k_past.shape[0]
    q = query.reshape(b, g, h // g * t, d)
    scale = d ** -0.5 if scaling is None else scaling
    if cache.sparse is not None:   # type: ignore[union-attr]
        bounds = cache.bounds[2 * module.layer_idx:2 * module.layer_idx + 2]   # type: ignore[union-attr]
        out = cache.sparse.attend(q, key, value, attention_mask, (k_past, v_past, *bounds), scale, softcap)
        return out.reshape(b, h, t, d).transpose(1, 2), None
    if attention_mask is not None:
        attention_mask = attention_mask.expand(b, h, t, n + t).reshape(b, g, h // g * t, n + t)
    # (a row at a time: torch's batched product would flatten rows and heads into one variable,
    # which the decode kernel does not follow; each row's attention is one kernel)
    rows = [_dense_attention(q[i:i + 1], key[i:i + 1], value[i:i + 1], k_past[:, i:i + 1], v_past[:, i:i + 1],
                             None if attention_mask is None else attention_mask[i:i + 1], scale, softcap)
            for i in range(b)]
    out = rows[0] if b == 1 else torch.cat(rows)
    return out.reshape(b, h, t, d).transpose(1, 2), None


def _dense_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_past: torch.Tensor,
                     v_past: torch.Tensor, mask: torch.Tensor | None, scale: float, softcap: float | None) -> torch.Tensor:
    """One row's attention over its cached keys and values (``[L, 1, Hkv, D]``) and its new ones."""
    n = k_past.shape[0]
    past = torch.einsum("lbgd,bgqd->bgql", k_past, q)
    masks = None if mask is None else (mask[..., :n], mask[..., n:])
    return merged_attention(q, past, v_past.permute(1, 2, 0, 3), key, value, masks, scale, softcap)


class _Step(torch.nn.Module):
    """One step of ``lm`` over tensors only: the last position's logits and each layer's new K, V.
    A prompt's step (no ``past``) takes which of its tokens are real (``mask``: ``keep[B, T]``) and
    makes its masks in the graph (the compiler sees their causal and window structure); a decode
    step takes them made (``[M, B, 1, 1, L + 1]``, :func:`additive_masks`)."""

    def __init__(self, lm: torch.nn.Module, mask_types: Sequence[str] | None, windows: Sequence[int | None],
                 dtype: torch.dtype, sparse: KVPolicy | None = None) -> None:
        super().__init__()
        self.lm, self.mask_types, self.windows, self.dtype = lm, mask_types, tuple(windows), dtype
        self.sparse = sparse   # (a decode step over the keys a policy chooses; kv-pages': ``past`` ends with the bounds)
        self.keep = "logits_to_keep" in inspect.signature(lm.forward).parameters

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, *past: torch.Tensor) -> tuple:
        bounds = past[len(past) // 2:] if self.sparse and self.sparse.page_bounds else ()
        cache = _StepCache(past[:len(past) - len(bounds)], bounds, self.sparse)
        if not past:
            mask = additive_masks(mask, torch.arange(ids.shape[1]), self.windows, self.dtype)
        masks = mask[0] if self.mask_types is None else {t: mask[i] for i, t in enumerate(self.mask_types)}
        extra = {"logits_to_keep": 1} if self.keep else {}
        with _attention(self.lm, ATTENTION if past else None, cache):
            out = self.lm(input_ids=ids, position_ids=pos, attention_mask=masks, cache=cache, use_cache=True, **extra)
        return (out.logits[:, -1], *cache.new)


def additive_masks(keys: torch.Tensor, queries: torch.Tensor, windows: Sequence[int | None],
                   dtype: torch.dtype, key_pos: torch.Tensor | None = None) -> torch.Tensor:
    """The masks ``[M, B, 1, Q, K]``, one per window (None: full attention), additive as
    transformers' eager attention makes them: 0 where the query at ``queries[q]`` sees key ``k``
    of row ``b`` at ``key_pos[k]`` (default ``k``): ``keys[b, k]`` (not padding),
    ``key_pos[k] <= queries[q]`` and, in a window ``w``, ``queries[q] - key_pos[k] < w``
    (transformers' rule); the dtype's lowest value elsewhere."""
    k = torch.arange(keys.shape[1]) if key_pos is None else key_pos
    causal = k[None, :] <= queries[:, None]
    out = []
    for w in windows:
        see = causal if w is None else causal & (queries[:, None] - k[None, :] < w)
        out.append(torch.where(see[None] & keys[:, None, :], 0.0, torch.finfo(dtype).min).to(dtype)[:, None])
    return torch.stack(out)


@contextlib.contextmanager
def _attention(lm: torch.nn.Module, name: str | None, cache: _StepCache) -> Iterator[None]:
    """Within: ``lm``'s attention layers call transformers' attention function ``name`` (None:
    their own) with ``cache`` as the step's; the model's configuration restored after."""
    configs = [m.config for m in lm.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    before = [c._attn_implementation for c in configs]
    _StepCache.current = cache
    try:
        if name is not None:
            AttentionInterface.register(name, cached_attention)
            for c in configs:
                c._attn_implementation_internal = name
        yield
    finally:
        _StepCache.current = None
        for c, b in zip(configs, before):
            c._attn_implementation_internal = b


@dataclass(frozen=True)
class LMShape:
    """What the host needs of a model to drive its programs."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: torch.dtype
    windows: tuple[int | None, ...]      # per mask the programs take: its sliding window (None: full)
    mask_types: tuple[str, ...] | None   # the layer types the masks are for, where the model maps them


def lm_shape(lm: torch.nn.Module) -> LMShape:
    """``lm``'s shape, read from a one-token eager step through :class:`_Step`."""
    config = lm.config
    base = getattr(lm, "base_model", lm)
    mapped = "causal_mask_mapping" in inspect.getsource(type(base).forward)
    types = tuple(dict.fromkeys(getattr(config, "layer_types", None) or ())) if mapped else None
    window = getattr(config, "sliding_window", None)
    windows = tuple(window if t == "sliding_attention" else None for t in types) if types else (window,)
    dtype = next(p.dtype for p in lm.parameters() if p.is_floating_point())
    with torch.no_grad():
        out = _Step(lm, types, windows, dtype)(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                                               torch.ones(1, 1, dtype=torch.bool))
    _, kv_heads, _, head_dim = out[1].shape
    return LMShape((len(out) - 1) // 2, kv_heads, head_dim, out[0].shape[-1], dtype, windows, types)


def programs(lm: torch.nn.Module, max_len: int, batch: int = 1, shape: LMShape | None = None,
             prompt: int | None = None, sparse: KVPolicy | None = None) -> tuple[tuple, tuple]:
    """The prefill and the decode step of ``lm`` as ``(module, example_args, dynamic_shapes)`` each,
    what :func:`einfuse.compile` and :func:`einfuse.kernels` take; the prefill's prompt length
    dynamic, or ``prompt`` tokens exactly (``compile_lm``'s buckets: 2.7x faster than the dynamic
    program at 512 tokens, its GEMMs tiled for known rows); with ``sparse``, the decode step
    attends to the keys that policy chooses (kv-pages': taking each layer's page bounds after the cache)."""
    s = shape or lm_shape(lm)
    if max_len < 3:
        raise EinfuseError(f"compile_lm: max_len={max_len}; it must be at least 3 (a 2-token prompt and a step)")
    step = _Step(lm, s.mask_types, s.windows, s.dtype).eval()
    m = len(s.windows)
    t = named_dynamic("T", 2, max_len)
    n = prompt or 4
    prefill = (step, (torch.zeros(batch, n, dtype=torch.long), torch.zeros(batch, n, dtype=torch.long),
                      torch.ones(batch, n, dtype=torch.bool)),
               None if prompt else {"ids": {1: t}, "pos": {1: t}, "mask": {1: t}})
    n = named_dynamic("L", 2, max_len - 1)
    past = tuple(torch.zeros(4, batch, s.kv_heads, s.head_dim, dtype=s.dtype) for _ in range(2 * s.layers))
    spec = tuple({0: n} for _ in past)
    if sparse is not None:
        past = tuple(torch.zeros(sparse.example_tokens(), *past[0].shape[1:], dtype=s.dtype)   # (distinct:
                     for _ in range(2 * s.layers))                                            # export merges one tensor's uses)
        if sparse.page_bounds:
            pages = sparse.page_count(sparse.example_tokens())
            past += tuple(torch.zeros(pages, batch, s.kv_heads, s.head_dim, dtype=s.dtype) for _ in range(2 * s.layers))
            spec += tuple({0: named_dynamic("P", 2, sparse.page_count(max_len))} for _ in range(2 * s.layers))
        step = _Step(lm, s.mask_types, s.windows, s.dtype, sparse).eval()
    length = past[0].shape[0] + 1
    decode = (step, (torch.zeros(batch, 1, dtype=torch.long), torch.zeros(batch, 1, dtype=torch.long),
                     torch.zeros(m, batch, 1, 1, length, dtype=s.dtype), *past),
              {"ids": None, "pos": None, "mask": {4: named_dynamic("L1", 3, max_len)}, "past": spec})
    return prefill, decode


@dataclass
class Phases:
    """The last generation's split: prefill and decode seconds, tokens generated."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    first_token_s: float = 0.0
    samples: list[float] = field(default_factory=list)

    def text(self) -> str:
        per = self.decode_s / self.decode_steps if self.decode_steps else 0.0
        return (f"prefill: {self.prompt_tokens} tokens in {self.prefill_s * 1e3:.2f} ms (first token after "
                f"{self.first_token_s * 1e3:.2f} ms); decode: {self.decode_steps} steps, "
                f"{per * 1e3:.3f} ms per step ({1 / per if per else 0:.1f} tokens/s)")


class CompiledLM:
    """A causal LM as its compiled prefill and decode programs over a KV cache held here."""

    def __init__(self, prefill: Callable[[int], Any], decode: Any, shape: LMShape, max_len: int, batch: int,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 policy: KVPolicy = KVPolicy(), sparse_decode: Any = None) -> None:
        """``prefill(n)`` compiles the prefill program of ``n`` tokens exactly (a bucket's);
        ``policy`` keeps the cache (:mod:`einfuse.kv`), ``sparse_decode`` the decode program over
        the keys it chooses (run where ``policy.sparse``: the cache holds more than it reads)."""
        from .codegen.runtime import aligned_empty
        self._compile_prefill, self.decode_model, self.shape = prefill, decode, shape
        self.prefill_programs: dict[int, Any] = {}   # bucket -> its compiled prefill
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id   # (generate's defaults)
        self.max_len, self.batch, self.policy, self.sparse_decode = max_len, batch, policy, sparse_decode
        self.rows = policy.rows(max_len)
        row = (batch, shape.kv_heads, shape.head_dim)
        self.cache = [aligned_empty((self.rows, *row), shape.dtype) for _ in range(2 * shape.layers)]
        pages = policy.page_count(max_len) if policy.page_bounds else 0
        self.bounds = [aligned_empty((pages, *row), shape.dtype) for _ in range(2 * shape.layers if pages else 0)]
        self.phases = Phases()
        self.reset()
        self.prefill_program(2)   # (the least bucket now: a model that cannot compile fails here)

    @property
    def kv_bytes(self) -> int:
        """The KV cache's bytes (all of it, preallocated; with kv-pages, the page bounds too)."""
        return sum(c.numel() * c.element_size() for c in self.cache + self.bounds)

    def reset(self) -> None:
        """Empty the cache (its memory is kept) for a new prompt."""
        self.length = 0   # (the tokens of the sequence so far, the prompt's padding included)
        self.valid = torch.zeros(self.batch, self.rows, dtype=torch.bool)   # rows holding a real token
        self.slot_pos = torch.zeros(self.rows, dtype=torch.long)   # each row's token: its place in the sequence
        self.next_pos = torch.zeros(self.batch, dtype=torch.long)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` cached tokens (forget the rest), as transformers' ``crop``."""
        if not 0 < length <= self.length:
            raise EinfuseError(f"crop({length}): the cache holds {self.length} tokens")
        if self.policy.bounded:
            raise EinfuseError(f"crop: a {self.policy.name} cache has dropped tokens; it cannot be cropped")
        self.next_pos -= self.length - length
        self.valid[:, length:] = False
        self.length = length

    # ---- the two programs -----------------------------------------------------------------------

    def bucket(self, tokens: int) -> int:
        """The prompt length ``tokens`` is padded to: 16, 32, 64, ... tokens, at most ``max_len``."""
        return min(self.max_len, max(16, 1 << (tokens - 1).bit_length()))

    def prefill_program(self, tokens: int) -> Any:
        """The compiled prefill of the bucket of ``tokens``, compiled on first use (and kept in the
        compile cache)."""
        n = self.bucket(tokens)
        if n not in self.prefill_programs:
            self.prefill_programs[n] = self._compile_prefill(n)
        return self.prefill_programs[n]

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt ``ids`` [batch, T] (left-padded where ``attention_mask`` has 0s) into an
        emptied cache; the last position's logits [batch, vocab]. The prompt runs padded on the
        left to its bucket's length; the padding's keys and values are not kept."""
        ids, keep = self._prompt(ids, attention_mask)
        self.reset()
        t = ids.shape[1]
        program, pad = self.prefill_program(t), self.bucket(t) - t
        ids = torch.cat([torch.zeros(self.batch, pad, dtype=torch.long), ids], 1)
        keep = torch.cat([torch.zeros(self.batch, pad, dtype=torch.bool), keep], 1)
        pos = (keep.cumsum(1) - 1).masked_fill(~keep, 1)
        out = program.run_trusted(ids, pos, keep)
        kept = self.policy.kept(t)
        self._store([kv[:, :, pad:][:, :, kept] for kv in out[1:]], kept, keep[:, pad:][:, kept])
        self.next_pos = pos[:, -1] + 1
        self.length = t
        return out[0]

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """One new token per row (``ids`` [batch] or [batch, 1]) after the cached ones; its logits."""
        ids = ids.reshape(-1, 1).to(torch.long)
        if ids.shape[0] != self.batch:
            raise InputError(f"decode takes one token per row: {self.batch} of them, got {ids.shape[0]}")
        n = self.length
        if n == 0:
            raise EinfuseError("decode before prefill: run prefill(ids) (or generate) first")
        if n >= self.max_len and not self.policy.bounded:
            raise EinfuseError(f"the KV cache is full: {n} tokens cached, max_len={self.max_len}; "
                               "compile with a larger max_len or reset()")
        rows = min(n, self.rows)
        keys = torch.cat([self.valid[:, :rows], torch.ones(self.batch, 1, dtype=torch.bool)], 1)
        masks = self._masks(keys, torch.tensor([n]), torch.cat([self.slot_pos[:rows], torch.tensor([n])]))
        program, past = self.decode_model, [c[:rows] for c in self.cache]
        if self.sparse_decode is not None and self.policy.sparse(rows):
            program = self.sparse_decode
            past += [b[:self.policy.page_count(rows)] for b in self.bounds]
        out = program.run_trusted(ids, self.next_pos[:, None].clone(), masks, *past)
        self._store(out[1:], [n], torch.ones(self.batch, 1, dtype=torch.bool))
        self.next_pos += 1
        self.length = n + 1
        return out[0]

    def _prompt(self, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt as ``(ids, keep)``, checked."""
        ids = torch.as_tensor(ids).to(torch.long)
        ids = ids[None] if ids.dim() == 1 else ids
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).to(torch.bool)
        if ids.dim() != 2 or ids.shape[0] != self.batch or keep.shape != ids.shape:
            raise InputError(f"prefill takes ids [batch={self.batch}, T] and a mask of their shape; got ids "
                             f"{tuple(ids.shape)}" + ("" if mask is None else f", mask {tuple(keep.shape)}"))
        if ids.shape[1] > self.max_len:
            raise InputError(f"the prompt has {ids.shape[1]} tokens; the cache holds max_len={self.max_len}")
        if (keep[:, 1:] < keep[:, :-1]).any() or not keep[:, -1].all():
            raise InputError("the attention mask must pad on the left (0s, then 1s, ending with a token)")
        return ids, keep

    def _masks(self, keys: torch.Tensor, queries: torch.Tensor, key_pos: torch.Tensor | None = None) -> torch.Tensor:
        return additive_masks(keys, queries, self.shape.windows, self.shape.dtype, key_pos)

    def _store(self, kv: Sequence[torch.Tensor], tokens: Sequence[int], real: torch.Tensor) -> None:
        """Keep the keys and values ``kv`` (``[batch, Hkv, n, D]`` each) of the sequence's tokens
        ``tokens`` (``real[b, i]``: token ``i`` of row ``b`` is no padding) in their rows."""
        slots = [self.policy.slot(n) for n in tokens]
        first = slots[0] if slots else 0
        whole = slots == list(range(first, first + len(slots)))
        for buf, new in zip(self.cache, kv):
            if whole:
                buf[first:first + len(slots)].copy_(new.permute(2, 0, 1, 3))
            else:
                buf.index_copy_(0, torch.tensor(slots), new.permute(2, 0, 1, 3))
        self.valid[:, slots] = real
        self.slot_pos[slots] = torch.tensor(tokens, dtype=torch.long)
        if self.bounds and slots:
            for i in range(self.shape.layers):
                update_bounds(self.bounds[2 * i], self.bounds[2 * i + 1], self.cache[2 * i], min(slots),
                              max(slots) + 1, self.policy.page)

    # ---- generation -----------------------------------------------------------------------------

    def generate(self, ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = -1,
                 pad_token_id: int | None = -1, attention_mask: torch.Tensor | None = None, streamer: Any = None,
                 seed: int | None = None) -> torch.Tensor:
        """``ids`` [batch, T] followed by up to ``max_new_tokens`` generated tokens, as transformers'
        ``model.generate`` returns them: greedy, or sampled (``temperature``, then ``top_k``, then
        ``top_p``) from a generator seeded with ``seed``; a row that produced ``eos_token_id`` goes
        on with ``pad_token_id`` until every row has (both default to the model's generation
        config, as in transformers; ``eos_token_id=None``: no end token; a missing pad is the
        first eos); ``streamer`` gets ``put(prompt)``, ``put(tokens)`` per step and ``end()``."""
        eos_token_id = self.eos_token_id if eos_token_id == -1 else eos_token_id
        pad_token_id = self.pad_token_id if pad_token_id == -1 else pad_token_id
        ids = torch.as_tensor(ids).to(torch.long)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.shape[1] + max_new_tokens - 1 > self.max_len and not self.policy.bounded:
            raise InputError(f"{ids.shape[1]} prompt tokens and {max_new_tokens} new ones need a cache of "
                             f"{ids.shape[1] + max_new_tokens - 1}; this model was compiled with max_len={self.max_len}")
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []))
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        pick = _sampler(do_sample, temperature, top_k, top_p, seed)
        if streamer is not None:
            streamer.put(ids)
        start = time.perf_counter()
        logits = self.prefill(ids, attention_mask)
        self.phases = Phases(prompt_tokens=ids.shape[1], prefill_s=time.perf_counter() - start)
        tokens, done = [ids], torch.zeros(ids.shape[0], dtype=torch.bool)
        for step in range(max_new_tokens):
            token = torch.where(done, pad, pick(logits))
            done |= torch.isin(token, eos)
            tokens.append(token[:, None])
            if step == 0:
                self.phases.first_token_s = time.perf_counter() - start
            if streamer is not None:
                streamer.put(token)
            if done.all() or step == max_new_tokens - 1:
                break
            t0 = time.perf_counter()
            logits = self.decode(token)
            self.phases.samples.append(time.perf_counter() - t0)
        self.phases.decode_steps = len(self.phases.samples)
        self.phases.decode_s = sum(self.phases.samples)
        if streamer is not None:
            streamer.end()
        return torch.cat(tokens, 1)

    # ---- inspection -----------------------------------------------------------------------------

    def report(self, prompt_len: int = 16, cached: int | None = None) -> str:
        """The programs' kernel tables (each kernel on the roofline: the cost model's estimate and
        what bounds it, beside its measured time), the prefill of ``prompt_len`` tokens' bucket and the
        decode step after ``cached`` ones (default: half the cache; with a KV policy that chooses
        keys there, its decode program too), then the last generation's phase split."""
        cached, n = min(cached or self.max_len // 2, self.rows), self.bucket(prompt_len)
        prefill_args = (torch.zeros(self.batch, n, dtype=torch.long),) * 2 + (torch.ones(self.batch, n, dtype=torch.bool),)
        decode_args = (torch.zeros(self.batch, 1, dtype=torch.long),) * 2 + \
            (self._masks(torch.ones(self.batch, cached + 1, dtype=torch.bool), torch.tensor([cached])),) + \
            tuple(c[:cached] for c in self.cache)
        lines = [f"prefill program ({n} tokens, the bucket of {prompt_len}):", self.prefill_program(n).report(prefill_args), "",
                 f"decode program (after {cached} cached tokens):", self.decode_model.report(decode_args), ""]
        if self.sparse_decode is not None and self.policy.sparse(cached):
            bounds = tuple(b[:self.policy.page_count(cached)] for b in self.bounds)
            lines += [f"{self.policy.spelled()} decode program (after {cached} cached tokens):",
                      self.sparse_decode.report(decode_args + bounds), ""]
        lines.append(f"KV cache: {self.kv_bytes / 2**20:.1f} MiB ({self.shape.layers} layers x K,V x "
                     f"[{self.rows}, {self.batch}, {self.shape.kv_heads}, {self.shape.head_dim}] {self.shape.dtype})"
                     + (f", page bounds {sum(b.numel() * b.element_size() for b in self.bounds) / 2**20:.1f} MiB"
                        if self.bounds else ""))
        if self.phases.prompt_tokens:
            lines.append("last generation: " + self.phases.text())
        return "\n".join(lines)


def _sampler(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
             seed: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The next token of each row of logits [batch, vocab]: the argmax, or a draw as transformers'
    processors make it (temperature, top-k, top-p in that order)."""
    if not do_sample:
        return lambda logits: logits.argmax(-1)
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed())

    def draw(logits: torch.Tensor) -> torch.Tensor:
        x = logits.float() / temperature
        if top_k:
            kth = x.topk(min(top_k, x.shape[-1]), -1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            srt, order = x.sort(-1)
            drop = srt.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[:, -1] = False
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(x.softmax(-1), 1, generator=gen)[:, 0]
    return draw


def compile_lm(model: torch.nn.Module, *, max_len: int, batch: int = 1, target: str = "cpu",
               quantize: str | None = None, kv: str | None = None, pipeline: str = "default",
               cache_dir: str | None = None) -> CompiledLM:
    """A Hugging Face causal LM (``*ForCausalLM``) compiled for generation: a prefill program (the
    prompt, up to ``max_len`` tokens) and a decode program (one token per row after up to
    ``max_len - 1`` cached ones) sharing a KV cache of ``max_len`` tokens for ``batch`` rows,
    each compiled for ``target`` through ``pipeline`` with ``quantize`` (docs/generate.md); ``kv``
    a KV-cache policy (``kv-window{sink=4,window=256}``, ``kv-pages{page=16,budget=1024}``:
    docs/sparsity.md)."""
    from .api import compile
    policy = parse_kv(kv)
    policy.check(max_len)
    if not hasattr(model, "config") or not hasattr(model, "generation_config"):
        raise EinfuseError(f"compile_lm takes a Hugging Face causal LM (*ForCausalLM); got {type(model).__name__}")
    model = model.eval()
    shape = lm_shape(model)
    options = dict(target=target, pipeline=pipeline, quantize=quantize, cache_dir=cache_dir)
    step, args, dynamic = programs(model, max_len, batch, shape)[1]
    decode = compile(step, args, dynamic_shapes=dynamic, **options)
    sparse = None
    if policy.sparse(max_len - 1):
        step, args, dynamic = programs(model, max_len, batch, shape, sparse=policy)[1]
        sparse = compile(step, args, dynamic_shapes=dynamic, **options)

    def prefill(n: int) -> Any:
        step, args, _ = programs(model, max_len, batch, shape, prompt=n)[0]
        return compile(step, args, **options)
    generation = model.generation_config
    return CompiledLM(prefill, decode, shape, max_len, batch, generation.eos_token_id, generation.pad_token_id,
                      policy, sparse)
