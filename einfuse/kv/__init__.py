"""KV-cache sparsity for generation: ``compile_lm(model, ..., kv="kv-pages{budget=1024}")`` and
``einfuse generate ... --kv SPEC`` (docs/sparsity.md).

A policy decides which cached keys a decode step attends to, and so what the cache holds and
reads. Each is written as pipeline text, ``name{option=value,...}`` (:func:`parse_kv`):

- ``kv-window{sink=4,window=W}`` (StreamingLLM; the window part of ALISA's SWA): the first
  ``sink`` tokens and the last ``window`` ones. The cache holds only those (a bounded buffer, the
  window a ring), so its memory is flat for any generation length (:mod:`.policies`).
- ``kv-pages{page=16,budget=B,recent=R}`` (Quest): keys in pages of ``page`` tokens, each page's
  elementwise min and max kept beside the cache; a decode step attends to the last ``R`` tokens
  and the ``(B - R) / page`` pages whose bound on ``q . k`` is highest, reading only their keys
  and values (:mod:`.pages`).
- ``kv-select{k=K,sink=4,recent=64}`` (TokenSelect): every cached token scored by the heads' soft
  vote (the softmax of ``q . k`` per head, summed), the ``K`` best with the sinks and the recent
  tokens attended to, their values read only (:mod:`.select`).

A policy is applied where the decode step is captured: its attention (transformers' attention
function, replaced by einfuse's while the step is traced: ``lm.cached_attention``) is written
over the selected keys, so the decode program's cascade computes the selection (a top-k over
page bounds or votes: the ``select`` kernel) and the attention over the gathered keys.
:mod:`.quality` measures what a policy costs against dense attention. For encoders and vision
models, :mod:`.regions` routes attention by region (BiFormer): ``with routed("region-route{...}")``.
"""
from __future__ import annotations

from .policies import KVPolicy, Dense, KVWindow, parse_kv
from .pages import KVPages
from .select import KVSelect
from .regions import RegionRoute, routed

__all__ = ["KVPolicy", "Dense", "KVWindow", "KVPages", "KVSelect", "parse_kv", "RegionRoute", "routed"]
